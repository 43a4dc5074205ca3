"""Per-step metrics of the learner: namespaced keys (`rollout/`, `loss/`, `queue/`, `perf/`, `sync/`) written as
JSON lines to `<run_dir>/metrics.jsonl`.

The learner only appends lines; W&B and curves are drawn by `rlq.tracking` in another process, so a slow or
failing tracker can never stall training. `MetricsLogger` is the interface a different sink implements.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Protocol

from broker.errors import UserError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsLogger(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """Appends `{"step": N, "time": unix_s, **metrics}` per step; one flushed line per record."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / METRICS_FILE
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the logger
        except OSError as exc:  # the run directory the user's config names: one line before training starts
            raise UserError(
                f"cannot write {self.path} ({exc.strerror or exc}): set logger.log_dir (learner.run_dir in a "
                "learner-only config) to a writable place"
            ) from None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, "time": time.time(), **{k: _finite(v) for k, v in sorted(metrics.items())}}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class ConsoleSummary:
    """One log line per step with the figures a person watches."""

    KEYS = ("rollout/reward_mean", "loss/total", "perf/step_s", "queue/wait_s", "sync/broadcast_s")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        shown = " ".join(f"{k.split('/', 1)[1]}={metrics[k]:.4g}" for k in self.KEYS if k in metrics)
        if shown:  # a validation pass has none of them: the learner logs its own line for it
            log.info("step %d %s", step, shown)

    def close(self) -> None:
        pass


class MultiLogger:
    def __init__(self, *sinks: MetricsLogger) -> None:
        self.sinks = sinks

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _finite(value: float) -> float | None:
    """JSON has no NaN/inf; write null so every reader can parse the line."""
    value = float(value)
    return value if math.isfinite(value) else None
