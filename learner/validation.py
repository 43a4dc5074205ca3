"""In-run validation: a pass over the validation split per due version, sampled and scored by the run's own roles.

Right after the weights of a due version went out (`grpo.val_period`, the last step, and version 0 with
`grpo.val_at_start`), the learner publishes that pass's prompts as `PromptBatch(purpose="val")`. Generation
workers sample them only once they hold at least that version, the judges score them, and the learner's
Collector hands the scored groups here instead of to training. Training never waits for a pass: its metrics are
logged when its last group is in, as a record of their own in metrics.jsonl (under the step current then) with
`val/policy_version` naming the version validated. Workers may hold a newer version by the time they sample a
pass; `val/sampled_version_mean` says which versions did. After the last step the learner waits for the passes
still out (see `Coordinator.finish_validation`).

The pass a group belongs to is read from its batch id, so a restarted learner recognises groups of passes it
started before the restart and ignores them (it does not know how many to expect).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from broker.schemas import Prompt, PromptBatch, ScoredGroup
from learner.config import GRPOConfig

log = logging.getLogger(__name__)

_BATCH_ID = re.compile(r"-val(\d{7})-\d{5}$")

FINAL_WAIT_S = 300.0
"""After the last step, the learner stops waiting for a validation pass when none of its groups has come for this
long (or for learner.data_timeout_s, if shorter): a batch that went to the dead-letter stream never will."""


def validation_batch_id(run: str, version: int, index: int) -> str:
    return f"{run}-val{version:07d}-{index:05d}"


def version_of_batch(batch_id: str) -> int | None:
    """The version a validation batch id names, or None for any other id."""
    match = _BATCH_ID.search(batch_id)
    return int(match.group(1)) if match else None


def pass_metrics(groups: list[ScoredGroup], version: int, seconds: float) -> dict[str, float]:
    """val/* metrics of one complete pass (its scored groups, one per validation prompt)."""
    rewards = np.concatenate([g.rewards.to_numpy() for g in groups])  # [samples]
    samples = [s for g in groups for s in g.rollout.samples]
    verdicts = [v for g in groups for v in g.verdicts]
    return {
        "val/accuracy": float(rewards.mean()),
        "val/correct_fraction": float(np.mean([v == "correct" for v in verdicts])),
        "val/response_length_mean": float(np.mean([len(s.token_ids) for s in samples])),
        "val/truncated_fraction": float(np.mean([s.finish_reason == "length" for s in samples])),
        "val/prompts": float(len(groups)),
        "val/samples": float(len(rewards)),
        "val/policy_version": float(version),
        "val/sampled_version_mean": float(np.mean([g.rollout.policy_version for g in groups])),
        "val/seconds": seconds,
    }


@dataclass
class _Pass:
    version: int
    started: float
    groups: dict[str, ScoredGroup] = field(default_factory=dict)  # group id -> group (a redelivery counts once)


class Validator:
    """Starts validation passes and turns their scored groups into metrics (rank 0 of the learner)."""

    def __init__(
        self,
        publish_once: Callable[[str, PromptBatch], bool],
        prompts: list[Prompt],
        cfg: GRPOConfig,
        *,
        run: str,
    ) -> None:
        if not prompts:
            raise ValueError("validation needs at least one prompt")
        self.publish_once = publish_once
        self.prompts = prompts
        self.cfg = cfg
        self.run = run
        self.passes: dict[int, _Pass] = {}

    def due(self, version: int, last: bool = False) -> bool:
        if version == 0:
            return self.cfg.val_at_start
        period = self.cfg.val_period
        return period > 0 and (version % period == 0 or last)

    def start(self, version: int) -> None:
        """Publish the pass of `version` (idempotent: a batch published before is not sent again)."""
        if version in self.passes:
            return
        per = self.cfg.prompts_per_message
        for index, lo in enumerate(range(0, len(self.prompts), per)):
            batch_id = validation_batch_id(self.run, version, index)
            message = PromptBatch(
                batch_id=batch_id,
                prompts=self.prompts[lo : lo + per],
                n_samples=self.cfg.num_val_generations_per_prompt,
                min_policy_version=version,
                purpose="val",
            )
            self.publish_once(batch_id, message)
        self.passes[version] = _Pass(version, time.monotonic())
        log.info("validation of version %d: %d prompts out", version, len(self.prompts))

    def accept(self, group: ScoredGroup) -> None:
        version = version_of_batch(group.rollout.batch_id)
        current = self.passes.get(version) if version is not None else None
        if current is None:
            log.info("validation group %s belongs to no pass this learner started; ignored", group.group_id)
            return
        current.groups[group.group_id] = group

    def finished(self) -> list[tuple[int, dict[str, float]]]:
        """(version, metrics) of every pass whose groups are all in, oldest first; they are forgotten."""
        done = sorted(v for v, p in self.passes.items() if len(p.groups) >= len(self.prompts))
        out = []
        for version in done:
            current = self.passes.pop(version)
            seconds = time.monotonic() - current.started
            out.append((version, pass_metrics(list(current.groups.values()), version, seconds)))
        return out

    @property
    def outstanding(self) -> list[int]:
        """Versions whose pass is still out."""
        return sorted(self.passes)
