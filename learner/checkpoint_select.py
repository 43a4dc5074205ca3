"""Which checkpoints stay: the newest `keep_last`, the best `keep_top_k` by a validation metric, and the latest.

NeMo RL's `checkpointing.keep_top_k` + `metric_name` + `higher_is_better` (nemo_rl/utils/checkpoint.py
`remove_old_checkpoints`: sort by (metric, step), keep the first k, never the latest), with two differences
that follow from rlq's validation being asynchronous (learner/validation.py):

- A checkpoint's metric is the one of the validation pass of its own version, and that pass completes a few
  steps after the save. It is written into the checkpoint as `val_metrics.json` when it arrives, and the
  checkpoints are pruned again then. Until it arrives a checkpoint whose pass is still out is kept, whatever
  `keep_last` says, so a slow pass cannot lose a checkpoint that would have ranked first.
- `keep_last` still holds alongside: the newest checkpoints stay whatever their metric (NeMo RL keeps only the
  top k), so resuming after a crash never has to go back further than it did before top-k existed.

A checkpoint with no metric (its version was not validated, or the learner restarted before the pass came back)
only ever stays as one of the newest. Ties rank the newer checkpoint first, as NeMo RL does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import UserError

log = logging.getLogger(__name__)

VAL_METRICS_FILE = "val_metrics.json"
"""In a step_<N> directory: the val/* metrics of version N's validation pass (written when the pass completes)."""
STEP_PREFIX = "step_"


@dataclass(frozen=True)
class Retention:
    """What pruning keeps; `awaiting` are the steps whose validation pass is still out."""

    keep_last: int = 3
    keep_top_k: int | None = None
    metric_name: str = "val/accuracy"
    higher_is_better: bool = True
    awaiting: frozenset[int] = field(default_factory=frozenset)


def retention(ckpt, awaiting: Iterable[int] = ()) -> Retention:
    """The `Retention` of a `learner.config.CheckpointConfig` (duck-typed: no config import needed here)."""
    return Retention(ckpt.keep_last, ckpt.keep_top_k, ckpt.metric_name, ckpt.higher_is_better, frozenset(awaiting))


def steps_to_keep(steps: Iterable[int], metrics: dict[int, float], policy: Retention) -> set[int]:
    """The steps that stay, of the checkpoints `steps` whose metric (where known) is `metrics[step]`.

    Args:
        steps: steps of the complete checkpoints on disk.
        metrics: step -> value of `policy.metric_name`; steps without one are absent (NaN counts as absent).
        policy: the retention settings.
    Returns:
        the latest step, the newest `keep_last`, the best `keep_top_k` ranked steps and every awaited step.
    """
    ordered = sorted(set(steps))
    if not ordered:
        return set()
    keep = set(ordered[-policy.keep_last :]) | {ordered[-1]}
    if policy.keep_top_k is None:
        return keep
    keep |= policy.awaiting & set(ordered)
    ranked = [s for s in ordered if s in metrics and not math.isnan(metrics[s])]
    sign = 1.0 if policy.higher_is_better else -1.0
    ranked.sort(key=lambda s: (sign * metrics[s], s), reverse=True)  # best first; a tie: the newer first
    return keep | set(ranked[: policy.keep_top_k])


def checkpoint_steps(checkpoint_dir: Path) -> dict[int, Path]:
    """step -> directory of every `step_<N>` directory (complete ones: temporary saves are `.step_*`)."""
    out = {}
    for path in Path(checkpoint_dir).glob(f"{STEP_PREFIX}*"):
        suffix = path.name[len(STEP_PREFIX) :]
        if path.is_dir() and suffix.isdigit():
            out[int(suffix)] = path
    return out


def read_metric(step_path: Path, name: str) -> float | None:
    """`name` from a checkpoint's `val_metrics.json`, or None (no pass recorded, or the metric missing)."""
    try:
        value = json.loads((step_path / VAL_METRICS_FILE).read_text()).get(name)
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def prune(checkpoint_dir: Path, policy: Retention) -> list[int]:
    """Delete the checkpoints `steps_to_keep` leaves out; returns their steps."""
    found = checkpoint_steps(checkpoint_dir)
    metrics = {}
    if policy.keep_top_k is not None:
        metrics = {s: v for s, p in found.items() if (v := read_metric(p, policy.metric_name)) is not None}
    keep = steps_to_keep(found, metrics, policy)
    gone = sorted(set(found) - keep)
    for step in gone:
        shutil.rmtree(found[step], ignore_errors=True)
    return gone


def record_validation(checkpoint_dir: Path, step: int, metrics: dict[str, float], policy: Retention) -> bool:
    """Write version `step`'s validation metrics into its checkpoint (if there is one) and prune with them.

    Returns whether the checkpoint existed. Written atomically: a crash leaves the old file or none.
    """
    path = checkpoint_steps(checkpoint_dir).get(step)
    if path is None:
        return False
    if policy.metric_name not in metrics:
        log.warning("validation of version %d has no %s: checkpointing.metric_name names no val/* metric (%s)",
                    step, policy.metric_name, ", ".join(sorted(metrics)))  # fmt: skip
    tmp = path / f".{VAL_METRICS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(metrics, sort_keys=True))
    os.replace(tmp, path / VAL_METRICS_FILE)
    gone = prune(checkpoint_dir, policy)
    if gone:
        log.info("checkpoints of steps %s removed (keep_last %d, keep_top_k %s by %s)", gone, policy.keep_last,
                 policy.keep_top_k, policy.metric_name)  # fmt: skip
    return True


def best_checkpoint(checkpoint_dir: Path, metric_name: str = "val/accuracy", higher_is_better: bool = True) -> Path:
    """The checkpoint with the best recorded `metric_name` (the newer one of a tie). Raises UserError if none."""
    found = checkpoint_steps(checkpoint_dir)
    scored = {s: v for s, p in found.items() if (v := read_metric(p, metric_name)) is not None and not math.isnan(v)}
    if not scored:
        raise UserError(f"no checkpoint in {checkpoint_dir} has a recorded {metric_name}")
    sign = 1.0 if higher_is_better else -1.0
    return found[max(scored, key=lambda s: (sign * scored[s], s))]
