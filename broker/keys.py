"""Redis key names of one run. Every role derives its keys from here, so inspection sees what the roles use."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_run_name(run: str) -> str:
    if not _RUN_NAME.match(run):
        raise ValueError(f"run name {run!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
    return run


@dataclass(frozen=True)
class Keys:
    """Namespaced keys: `rlq:<run>:<name>`."""

    run: str

    def __post_init__(self) -> None:
        check_run_name(self.run)

    def _key(self, name: str) -> str:
        return f"rlq:{self.run}:{name}"

    @property
    def prompts(self) -> str:
        """Stream of PromptBatch: feeder -> generation workers."""
        return self._key("prompts")

    @property
    def scored(self) -> str:
        """Stream of ScoredGroup: judges -> learner."""
        return self._key("scored")

    @property
    def dead(self) -> str:
        """Stream of DeadLetter: anything that failed N deliveries or could not be decoded."""
        return self._key("dead")

    @property
    def policy(self) -> str:
        """Hash: current policy version, the latest WeightAnnouncement, checkpoint path."""
        return self._key("policy")

    @property
    def workers(self) -> str:
        """Hash worker_id -> WorkerHeartbeat bytes (liveness comes from the per-worker TTL key)."""
        return self._key("workers")

    def worker_alive(self, worker_id: str) -> str:
        """String key with a TTL, refreshed by each heartbeat."""
        return self._key(f"alive:{worker_id}")

    def done(self, stream: str) -> str:
        """Set of idempotency keys already handled for `stream` (e.g. group ids published once)."""
        return f"{stream}:done"

    @property
    def scale(self) -> str:
        """Hash role -> desired process count: `rlq scale` writes it, the run's launcher acts on it."""
        return self._key("scale")

    @property
    def judge_queue(self) -> str:
        """Celery queue the judges of this run consume."""
        return f"rlq.{self.run}.judge"

    def streams(self) -> list[str]:
        return [self.prompts, self.scored, self.dead]


# The weight-sync contract beyond the announcement itself (docs/weight_sync.md): fields of the policy hash and
# keys of the weight group's rendezvous store, shared by learner/broadcast.py and workers/generate/weights.py.
POLICY_VERSION = "version"
"""Policy-hash field: the learner's latest policy version."""
POLICY_UPDATED_AT = "learner_updated_at"
"""Policy-hash field: when the learner last published a version (unix seconds)."""
POLICY_CHECKPOINT = "checkpoint_path"
"""Policy-hash field: the learner's latest checkpoint directory (a joining worker starts from it)."""
POLICY_ANNOUNCEMENT = "announcement"
"""Policy-hash field: the encoded latest WeightAnnouncement."""
POLICY_JOIN_PREFIX = "join:"
"""Policy-hash fields `join:<worker_id>` = an encoded JoinRequest: a worker asks to receive the weights."""
POLICY_SHARED_SEQ = "shared_seq"
"""Policy-hash field: sequence number of the learner's shared weight buffers; odd while it rewrites them, so a
worker that loaded from them checks it after loading and loads again if it changed (a seqlock)."""
POLICY_SYNCED_PREFIX = "synced:"
"""Policy-hash fields `synced:<worker_id>` = the policy version that worker loaded last."""
WEIGHT_STORE_PREFIX = "rlq-weights/epoch"
"""Rendezvous-store prefix of one epoch's group, `<prefix><epoch>/`, so epochs never share keys."""
WEIGHT_TOKEN_ENV = "RLQ_WEIGHT_TOKEN"
"""The run's weight-group token (broker/acl.py derives it from the run secret), held by the learner and the
generation workers only: the rendezvous keys live under its digest, which the TCPStore cannot list."""
WEIGHT_JOINED_KEY = "joined/"
"""Rendezvous-store key `joined/<worker_id>`, set by a member before it joins, so absentees can be named."""


def weight_store_prefix(epoch: int, token: str | None) -> str:
    """Rendezvous prefix of `epoch`'s group: with a token, under its SHA-256, so a client of the store that lacks
    the token finds no key of the group (TCPStore has no key listing) and cannot take or forge a member's place."""
    if not token:
        return f"{WEIGHT_STORE_PREFIX}{epoch}/"
    return f"rlq-weights/{hashlib.sha256(token.encode()).hexdigest()}/epoch{epoch}/"
