"""Replay: re-run the learner from a run's rollout log (learner/rollout_log.py), in the logged order.

The groups each step trained on are rebuilt as `ScoredGroup`s from the log (token ids, behaviour logprobs and
rewards are stored at their wire dtypes, so nothing is rounded) and fed, step by step, to the same code a live
run uses: `Coordinator.prepare` (advantages, samples, rank shares) and `train._loop` (the update, its statistics).
Only the source differs: a `LoggedGroups` collector instead of the scored stream, and no Redis, weight sync,
validation, checkpoints or ledger. With the run's config and initial weights the loss curve comes out the same
(tests/integration/test_replay.py: equal to 1e-6 on CPU). Replay starts from `policy.model_name`; a run that
resumed from a checkpoint replays as if it had not stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from broker.errors import UserError
from broker.schemas import Array, Prompt, RolloutGroup, Sample, ScoredGroup
from learner.config import LearnerConfig
from learner.coordinator import Coordinator
from learner.metrics import ConsoleSummary, JsonlLogger, MultiLogger
from learner.rollout_io import CollectResult
from learner.rollout_log import ROLLOUT_DIR, part_files

log = logging.getLogger(__name__)

GROUP_COLUMNS = ("group_id", "batch_id", "prompt_id", "prompt_ids", "prompt_text", "ground_truth", "policy_version",
                 "worker_id", "temperature", "judge_id")  # fmt: skip
SAMPLE_COLUMNS = ("completion_ids", "behaviour_logprobs", "finish_reason", "completion_text", "reward", "verdict")


def rebuild_group(rows: list[dict]) -> ScoredGroup:
    """One ScoredGroup from its rows (one per sample, in sample order)."""
    first = rows[0]
    prompt = Prompt(first["prompt_id"], Array.from_numpy(np.asarray(first["prompt_ids"], np.int32), "int32"),
                    first["ground_truth"], text=first["prompt_text"] or "")  # fmt: skip
    samples = [
        Sample(
            Array.from_numpy(np.asarray(r["completion_ids"], np.int32), "int32"),
            Array.from_numpy(np.asarray(r["behaviour_logprobs"], np.float32), "float32"),
            r["finish_reason"],
            text=r["completion_text"] or "",
        )  # fmt: skip
        for r in rows
    ]
    rollout = RolloutGroup(group_id=first["group_id"], batch_id=first["batch_id"], prompt=prompt, samples=samples,
                           policy_version=first["policy_version"], worker_id=first["worker_id"],
                           temperature=first["temperature"])  # fmt: skip
    rewards = Array.from_numpy(np.asarray([r["reward"] for r in rows], np.float32), "float32")
    return ScoredGroup(rollout=rollout, rewards=rewards, verdicts=[r["verdict"] for r in rows],
                       judge_id=first["judge_id"])  # fmt: skip


def trained_steps(run_dir: Path) -> dict[int, list[ScoredGroup]]:
    """step -> the groups it trained on, in batch order. A step logged twice (a resumed run re-trained it) keeps
    the later part's groups: those are the ones the surviving timeline trained on."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parts = part_files(Path(run_dir) / ROLLOUT_DIR)
    if not parts:
        raise UserError(f"{Path(run_dir) / ROLLOUT_DIR} holds no rollout log to replay")
    columns = ["step", "dropped_reason", "group_index", "sample_index", *GROUP_COLUMNS, *SAMPLE_COLUMNS]
    steps: dict[int, list[ScoredGroup]] = {}
    for part in parts:
        table = pq.read_table(part, columns=columns)
        table = table.filter(pc.is_null(table["dropped_reason"]))
        table = table.sort_by([("step", "ascending"), ("group_index", "ascending"), ("sample_index", "ascending")])
        by_step: dict[int, dict[int, list[dict]]] = {}
        for row in table.to_pylist():
            by_step.setdefault(row["step"], {}).setdefault(row["group_index"], []).append(row)
        for step, groups in by_step.items():
            steps[step] = [rebuild_group(rows) for _, rows in sorted(groups.items())]
    return steps


def check_complete(steps: dict[int, list[ScoredGroup]], cfg: LearnerConfig) -> int:
    """The last step of a replayable log: steps 1..N all there, each with a full batch; else UserError."""
    last = max(steps, default=0)
    missing = [s for s in range(1, last + 1) if s not in steps]
    need, size = cfg.grpo.num_prompts_per_step, cfg.grpo.num_generations_per_prompt
    short = [s for s, groups in steps.items() if len(groups) != need or any(len(g.rollout.samples) != size
                                                                             for g in groups)]  # fmt: skip
    if not last or missing or short:
        raise UserError(f"the rollout log cannot be replayed exactly: steps missing {missing[:10]}, incomplete "
                        f"{sorted(short)[:10]} (rows lost: see rollout/log_rows_lost in metrics.jsonl)")  # fmt: skip
    return last


@dataclass
class LoggedGroups:
    """Stands in for `rollout_io.Collector`: `collect` hands out the groups the log says the next step trained."""

    steps: dict[int, list[ScoredGroup]]

    def collect(
        self, learner_version: int, *, timeout_s: float, should_stop=None, on_idle=None
    ) -> CollectResult | None:
        # on_idle is never called: the log holds every step's groups, nothing is waited for
        groups = self.steps.get(learner_version + 1)
        return None if groups is None else CollectResult(groups=groups)


class ReplayCoordinator(Coordinator):
    """Rank 0's side of a replay: `prepare` is the live one (inherited); the rest only writes metrics."""

    def __init__(self, cfg: LearnerConfig, out_dir: Path, steps: dict[int, list[ScoredGroup]]) -> None:
        # No super().__init__: it connects to Redis. `prepare` needs only `cfg` and `collector`.
        self.cfg = cfg
        self.collector = LoggedGroups(steps)  # type: ignore[assignment]
        self.metrics = MultiLogger(JsonlLogger(out_dir), ConsoleSummary())
        self.weights, self.validator, self.rollout_log, self.last_saved = None, None, None, -1

    def plan(self, version: int, last: bool) -> tuple[bool, bool]:
        return False, False  # no workers to feed, nothing to resume

    def finish(self, version: int, info: dict, metrics: dict[str, float], **_) -> None:
        metrics.update(info["metrics"])
        self.metrics.log(version, metrics)

    def close(self) -> None:
        self.metrics.close()


def replay(cfg: LearnerConfig, run_dir: Path, out_dir: Path) -> int:
    """Train on `run_dir`'s rollout log as its learner did; metrics to `out_dir`/metrics.jsonl. Returns the steps."""
    from learner.distributed import init_distributed
    from learner.train import _loop, _StopFlag, build_trainer

    steps = trained_steps(run_dir)
    cfg = cfg.model_copy(deep=True)
    cfg.grpo.max_num_steps = check_complete(steps, cfg)
    cfg.checkpointing.enabled = False
    info = init_distributed(cfg.learner.dist_backend)
    if info.world_size != 1:
        raise UserError("rlq replay runs as one process (the step's maths does not depend on the rank count)")
    torch.manual_seed(cfg.grpo.seed)  # as learner.train.run
    trainer, _ = build_trainer(cfg, info, None)
    out_dir.mkdir(parents=True, exist_ok=True)
    coordinator = ReplayCoordinator(cfg, out_dir, steps)
    log.info("replaying %d steps of %s into %s", cfg.grpo.max_num_steps, run_dir, out_dir)
    try:
        return _loop(cfg, info, trainer, coordinator, _StopFlag(), 0)
    finally:
        coordinator.close()
