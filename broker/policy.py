"""The policy hash of a run (`Keys.policy`): every field the learner and the generation workers share, in one place.

Fields: `version` (the learner's latest policy version), `announcement` (the latest WeightAnnouncement),
`checkpoint_path` (the learner's latest checkpoint directory), `shared_seq` (the seqlock of the shared weight
buffers, docs/weight_sync.md), `join:<worker>` (a JoinRequest) and `synced:<worker>` (the version a worker loaded
last). Only this module spells them; the learner writes through `PolicyHash`, workers and inspection read through it.

The checkpoint layout both roles read is here too: a learner checkpoint is `<dir>/step_<N>/` holding
`learner_state.json` (with the policy `version`) and the Hugging Face model in `policy/`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import redis

from broker.errors import UserError
from broker.keys import (
    POLICY_ANNOUNCEMENT,
    POLICY_CHECKPOINT,
    POLICY_JOIN_PREFIX,
    POLICY_SHARED_SEQ,
    POLICY_SYNCED_PREFIX,
    POLICY_UPDATED_AT,
    POLICY_VERSION,
    Keys,
)
from broker.schemas import JoinRequest, MessageError, WeightAnnouncement, decode, encode

log = logging.getLogger(__name__)

CHECKPOINT_POLICY_DIR = "policy"
"""Subdirectory of a checkpoint with the Hugging Face model (config, weights, tokenizer)."""
CHECKPOINT_STATE_FILE = "learner_state.json"
"""File of a checkpoint with the learner's state; its `version` is the policy version of the weights."""
LATEST = "latest"
"""File in the checkpoint directory naming the newest complete `step_<N>` directory."""


def checkpoint_model_dir(path: str | Path) -> str:
    """The model directory of a checkpoint (`<path>/policy`), or `path` itself when it has none."""
    path = Path(path)
    return str(path / CHECKPOINT_POLICY_DIR) if (path / CHECKPOINT_POLICY_DIR).is_dir() else str(path)


def checkpoint_version(model_dir: str | Path) -> int:
    """The policy version of a checkpoint's model directory (from the state file beside it), else 0."""
    state = Path(model_dir).parent / CHECKPOINT_STATE_FILE
    try:
        return int(json.loads(state.read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None. Raises UserError when `latest` names an incomplete one."""
    pointer = checkpoint_dir / LATEST
    if not pointer.exists():
        return None
    path = checkpoint_dir / pointer.read_text().strip()
    if not (path / CHECKPOINT_STATE_FILE).exists():
        raise UserError(
            f"{pointer} names {path}, which is not a complete checkpoint: point it at a complete step_<N> "
            "directory, or set checkpointing.checkpoint_dir to a new directory to start afresh"
        )
    return path


def finished_version(checkpoint_dir: Path, max_steps: int) -> int | None:
    """The newest checkpoint's version when it has reached `max_steps` (the run is done, nothing to train), else
    None. Raises UserError as `latest_checkpoint` does."""
    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        return None
    version = checkpoint_version(path / CHECKPOINT_POLICY_DIR)
    return version if version >= max_steps else None


def finished_message(checkpoint_dir: Path, version: int) -> str:
    return (
        f"{checkpoint_dir} holds a finished run (version {version}, grpo.max_num_steps reached): nothing to train. "
        "Raise grpo.max_num_steps to train on from it, or set checkpointing.checkpoint_dir to a new directory to "
        "start afresh"
    )


class PolicyHash:
    """Reads and writes of one run's policy hash."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r = r
        self.keys = keys

    # --- the learner writes -----------------------------------------------------------------------------------

    def set_version(self, version: int, at: float | None = None) -> None:
        """The learner's latest version, and when it was published (`at`, unix seconds) if given."""
        mapping: dict[str, float | int] = {POLICY_VERSION: version}
        if at is not None:
            mapping[POLICY_UPDATED_AT] = at
        self.r.hset(self.keys.policy, mapping=mapping)

    def announce(self, ann: WeightAnnouncement) -> None:
        """Publish `ann`; with shared buffers, their sequence number goes even in the same transaction."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.keys.policy, POLICY_ANNOUNCEMENT, encode(ann))  # type: ignore[arg-type]
        if ann.shared is not None:
            pipe.hset(self.keys.policy, POLICY_SHARED_SEQ, str(ann.shared.seq))
        pipe.execute()

    def withdraw(self) -> None:
        self.r.hdel(self.keys.policy, POLICY_ANNOUNCEMENT)

    def begin_shared_write(self, seq: int) -> None:
        """Mark the shared buffers as being rewritten (`seq` is odd): readers that overlap it load again."""
        self.r.hset(self.keys.policy, POLICY_SHARED_SEQ, str(seq))

    def set_checkpoint(self, path: str | Path) -> None:
        self.r.hset(self.keys.policy, POLICY_CHECKPOINT, str(Path(path).resolve()))

    def join_requested(self) -> bool:
        """Whether a worker waits to be admitted (the requests stay for `take_join_requests`)."""
        return any(k.decode().startswith(POLICY_JOIN_PREFIX) for k in self.r.hkeys(self.keys.policy))  # type: ignore[union-attr]

    def take_join_requests(self) -> dict[str, Any]:
        """Every pending join request (worker id -> raw value), removed from the hash."""
        fields: Any = self.r.hgetall(self.keys.policy)
        joins = {k.decode()[len(POLICY_JOIN_PREFIX) :]: v for k, v in fields.items()
                 if k.decode().startswith(POLICY_JOIN_PREFIX)}  # fmt: skip
        if joins:
            self.r.hdel(self.keys.policy, *[POLICY_JOIN_PREFIX + w for w in joins])
        return joins

    # --- workers write ----------------------------------------------------------------------------------------

    def ask_to_join(self, request: JoinRequest) -> None:
        self.r.hset(self.keys.policy, POLICY_JOIN_PREFIX + request.worker_id, encode(request))  # type: ignore[arg-type]

    def mark_synced(self, worker_id: str, version: int) -> None:
        self.r.hset(self.keys.policy, POLICY_SYNCED_PREFIX + worker_id, str(version))

    def forget(self, worker_id: str) -> None:
        """A worker that leaves takes back its join request."""
        self.r.hdel(self.keys.policy, POLICY_JOIN_PREFIX + worker_id)

    # --- anyone reads -----------------------------------------------------------------------------------------

    def announcement(self) -> WeightAnnouncement | None:
        """The latest announcement; a malformed one is logged and read as none."""
        raw: Any = self.r.hget(self.keys.policy, POLICY_ANNOUNCEMENT)
        if raw is None:
            return None
        try:
            ann = decode(raw, WeightAnnouncement)
        except MessageError as exc:
            log.error("the policy hash holds a bad weight announcement (%s); ignoring it", exc)
            return None
        return ann if isinstance(ann, WeightAnnouncement) else None

    def shared_seq(self) -> int:
        raw: Any = self.r.hget(self.keys.policy, POLICY_SHARED_SEQ)
        try:
            return int(raw) if raw is not None else -1
        except ValueError:
            return -1

    def checkpoint(self) -> str:
        """The learner's latest checkpoint directory, or ''."""
        raw: Any = self.r.hget(self.keys.policy, POLICY_CHECKPOINT)
        return (raw.decode() if isinstance(raw, bytes) else raw) if raw else ""

    def synced(self, worker_id: str) -> int | None:
        raw: Any = self.r.hget(self.keys.policy, POLICY_SYNCED_PREFIX + worker_id)
        return int(raw) if raw is not None else None
