"""Follows a run's `metrics.jsonl`: forwards each record to W&B and draws PNG curves in the run directory.

The learner only appends JSON lines to a file; everything slow or fallible (W&B's network, matplotlib) happens
here, in another process, so a tracking problem can never stall or crash training. W&B mode follows the
tutorial: online when `WANDB_API_KEY` is set, offline otherwise (synced later with `wandb sync`), or off.

The curves are redrawn at each validation pass as well as at the end, the reward's raw points under a smoothed
line. Each new part of the rollout log (`<run_dir>/rollouts/`, learner/rollout_log.py) sends a few sample
completions per step to W&B as a table (`rollouts/samples`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CURVES: dict[str, tuple[str, ...]] = {
    "reward.png": ("rollout/reward_mean", "val/accuracy"),
    "staleness.png": ("rollout/staleness_mean", "rollout/staleness_max"),
    "sync_time.png": ("sync/broadcast_s", "sync/wait_s", "perf/step_s"),
}
"""PNG name -> metric keys drawn on it (keys missing from the run are skipped)."""
SMOOTHED = frozenset({"rollout/reward_mean"})
"""Keys drawn as faint raw points under a smoothed line (a step's reward is a noisy 128-sample mean)."""
SMOOTHING = 0.9
"""Weight of the past in the smoothed line (TensorBoard's slider; about a 10-step window)."""
SAMPLES_PER_STEP = 4
"""Completions of each step sent to W&B's `rollouts/samples` table: one from each of the first groups."""
SAMPLE_COLUMNS = ("step", "group_id", "policy_version", "staleness", "prompt_text", "completion_text", "reward",
                  "advantage", "verdict", "finish_reason")  # fmt: skip


@dataclass
class WandbSettings:
    enabled: bool = True
    project: str = "rlq"
    name: str | None = None
    entity: str | None = None
    mode: str | None = None  # "online" | "offline" | "disabled"; None = online iff WANDB_API_KEY is set


def wandb_mode(settings: WandbSettings) -> str:
    if not settings.enabled:
        return "disabled"
    if settings.mode:
        return settings.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


@dataclass
class MetricsFollower:
    """Reads new lines of `metrics.jsonl` each `poll()`; keeps every record for the curves."""

    metrics_path: Path
    wandb: WandbSettings = field(default_factory=WandbSettings)
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    samples_per_step: int = SAMPLES_PER_STEP
    _offset: int = 0
    _run: Any = None
    _wandb_failed: bool = False
    _parts_seen: set[str] = field(default_factory=set)

    def poll(self) -> list[dict[str, Any]]:
        new = list(self._read_new())
        self.records.extend(new)
        for record in new:
            self._log_wandb(record)
        if self._run is not None:
            self._log_samples()
        if any("val/accuracy" in record for record in new):  # a validation pass: the curves so far
            draw_curves(self.records, self.metrics_path.parent)
        return new

    def _read_new(self) -> Iterable[dict[str, Any]]:
        if not self.metrics_path.exists():
            return
        with open(self.metrics_path, "rb") as fh:
            fh.seek(self._offset)
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break  # a line still being written: read it next time
                self._offset += len(raw)
                try:
                    yield json.loads(raw)
                except json.JSONDecodeError:
                    log.warning("skipping a malformed line in %s", self.metrics_path)

    def _log_wandb(self, record: dict[str, Any]) -> None:
        if self._wandb_failed or wandb_mode(self.wandb) == "disabled":
            return
        try:
            if self._run is None:
                import wandb

                self._run = wandb.init(
                    project=self.wandb.project, name=self.wandb.name, entity=self.wandb.entity,
                    mode=wandb_mode(self.wandb), dir=str(self.metrics_path.parent), config=self.config,
                    settings=wandb.Settings(init_timeout=30, silent=True),
                )  # fmt: skip
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self._run.log(numbers, step=int(record.get("step", 0)))
        except Exception as exc:  # W&B must never stop a run: note it once and carry on without it.
            self._wandb_failed = True
            log.warning("W&B logging disabled for this run: %s", str(exc).splitlines()[0] if str(exc) else exc)

    def _log_samples(self) -> None:
        """A W&B table of a few completions per step from each rollout-log part not sent yet."""
        from learner.rollout_log import ROLLOUT_DIR, part_files

        parts = [p for p in part_files(self.metrics_path.parent / ROLLOUT_DIR) if p.name not in self._parts_seen]
        if not parts or self._wandb_failed:
            return
        try:
            import pyarrow.parquet as pq
            import wandb

            rows = []
            for part in parts:
                self._parts_seen.add(part.name)
                rows += pick_samples(pq.read_table(part, columns=[*SAMPLE_COLUMNS, "dropped_reason", "group_index"])
                                     .to_pylist(), self.samples_per_step)  # fmt: skip
            if rows:
                data = [[row[c] for c in SAMPLE_COLUMNS] for row in rows]
                step = max((int(r.get("step", 0)) for r in self.records), default=0)
                self._run.log({"rollouts/samples": wandb.Table(columns=list(SAMPLE_COLUMNS), data=data)}, step=step)
        except Exception as exc:  # as _log_wandb: never stop a run for W&B
            log.warning("W&B rollout samples not logged: %s", str(exc).splitlines()[0] if str(exc) else exc)

    def close(self) -> None:
        self.poll()
        if self._run is not None:
            try:
                self._run.finish()
            except Exception as exc:
                log.warning("W&B finish failed: %s", exc)
        draw_curves(self.records, self.metrics_path.parent)


def pick_samples(rows: list[dict[str, Any]], per_step: int) -> list[dict[str, Any]]:
    """Of a rollout-log part's rows, the first sample of each of the first `per_step` trained groups of a step."""
    seen: dict[int, set[int]] = {}
    out = []
    for row in sorted(rows, key=lambda r: (r["step"], r["group_index"])):
        groups = seen.setdefault(row["step"], set())
        if row["dropped_reason"] is None and row["group_index"] not in groups and len(groups) < per_step:
            groups.add(row["group_index"])
            out.append(row)
    return out


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing (the first points are not pulled toward 0)."""
    out, ema = [], 0.0
    for i, value in enumerate(values, start=1):
        ema = weight * ema + (1 - weight) * value
        out.append(ema / (1 - weight**i))
    return out


def draw_curves(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write one PNG per entry of CURVES that has data; returns the files written."""
    if not records:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for filename, keys in CURVES.items():
        series = {k: [(r["step"], r[k]) for r in records if k in r and "step" in r] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, points in series.items():
            steps, values = zip(*points, strict=True)
            if key in SMOOTHED and None not in values:
                raw = ax.plot(steps, values, marker=".", linestyle="none", alpha=0.3)[0]
                ax.plot(steps, smooth(list(values)), color=raw.get_color(), label=f"{key} (smoothed)")
            else:
                ax.plot(steps, values, marker=".", label=key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
