"""Judge-aware admission: how many prompts the feeder may have in flight when the judges fall behind.

The staleness window (`(max_staleness + 1) * num_prompts_per_step` prompts) bounds what the feeder publishes. When
the judges are the slowest stage, the groups beyond what they can score soon only wait in their Celery queue:
they add nothing to throughput, they age there, and any that a faster path overtakes (another worker, a
redelivered task) reach the learner too old and are dropped as stale. So while the judge queue has tasks waiting,
the feeder measures how long a group waits for its judge (scored `created_at` minus the rollout's, an EMA) in
learner steps (an EMA of the step time), and keeps the part of the window above the allowance unpublished. The
allowance is `judge_wait_steps` steps, or the refill time where that is longer: how long a prompt published now
takes to reach the judges (the learner's update and weight sync, when it publishes nothing, plus generation). So
the judge keeps enough queued to stay busy until the prompts released next arrive, and the prompts held back are
generated later, with newer weights. Pure pieces first; `JudgeAdmission` holds the measurements.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from learner.runtime_config import AdmissionConfig


def wait_steps(latency_s: float, step_s: float) -> float:
    """How many learner steps a group spends waiting for (and in) its judge; 0 before a step was timed."""
    if step_s <= 0 or latency_s <= 0:
        return 0.0
    return latency_s / step_s


def admitted_window(
    window: int, per_step: int, *, waited_steps: float, allowance_steps: float, min_steps: float, judge_waiting: bool
) -> int:
    """Prompts the feeder may have in flight: the staleness `window`, less `per_step` prompts for every step of
    judge wait above the allowance; never below `min_steps` steps of prompts (nor above `window`).

    Args:
        judge_waiting: whether the judge queue has tasks no judge has taken yet. Without any, the judges keep up
            and the latency figure is history: the whole window is admitted.
    """
    if not judge_waiting:
        return window
    excess = max(0.0, waited_steps - allowance_steps)
    floor = min(window, math.ceil(min_steps * per_step))
    return max(floor, window - math.ceil(excess * per_step))


def ema(old: float, new: float, weight: float) -> float:
    """Exponential moving average; the first sample (old <= 0) is taken as it is."""
    return new if old <= 0 else weight * new + (1 - weight) * old


class JudgeAdmission:
    """The feeder's judge-aware limit: scoring latency and step time averages, and the judge queue, polled.

    `probe` returns (tasks waiting in the judge queue, tasks delivered and not acknowledged) — broker/celery_inspect
    reads them from Redis without Celery.
    """

    def __init__(self, cfg: AdmissionConfig, per_step: int, probe: Callable[[], tuple[int, int]]) -> None:
        self.cfg = cfg
        self.per_step = per_step
        self.probe = probe
        self.latency_s = 0.0  # EMA: rollout handed to the judges -> scored
        self.step_s = 0.0  # EMA: wall time between two finished steps
        self.outside_s = 0.0  # EMA: the part of a step spent outside collecting (update, weight sync): no top-ups
        self.generate_s = 0.0  # EMA: prompt published -> its group handed to the judges
        self.waiting = 0  # judge tasks not taken yet, at the last poll
        self.unacked = 0  # judge tasks taken and not finished, at the last poll
        self.held_back = 0  # prompts the staleness window allowed and this limit did not, at the last top-up
        self._polled_at = -math.inf
        self._last_step_at: float | None = None

    def observe_latency(self, seconds: float) -> None:
        self.latency_s = ema(self.latency_s, max(0.0, seconds), self.cfg.latency_ema)

    def observe_generation(self, seconds: float) -> None:
        self.generate_s = ema(self.generate_s, max(0.0, seconds), self.cfg.latency_ema)

    def observe_step(self, collect_wait_s: float = 0.0) -> None:
        """A step finished; `collect_wait_s` of it went to collecting its groups (the feeder publishes only then)."""
        now = time.monotonic()
        if self._last_step_at is not None:
            interval = now - self._last_step_at
            self.step_s = ema(self.step_s, interval, self.cfg.latency_ema)
            self.outside_s = ema(self.outside_s, max(0.0, interval - collect_wait_s), self.cfg.latency_ema)
        self._last_step_at = now

    @property
    def refill_s(self) -> float:
        """Seconds from the moment the feeder would release held-back prompts to their groups reaching the judges."""
        return self.outside_s + self.generate_s

    def window(self, staleness_window: int) -> int:
        """The prompts in flight admitted now (<= `staleness_window`)."""
        now = time.monotonic()
        if now - self._polled_at >= self.cfg.judge_poll_s:
            self.waiting, self.unacked = self.probe()
            self._polled_at = now
        if not self.cfg.judge_aware:
            self.held_back = 0
            return staleness_window
        admitted = admitted_window(
            staleness_window, self.per_step, waited_steps=wait_steps(self.latency_s, self.step_s),
            allowance_steps=max(self.cfg.judge_wait_steps, wait_steps(self.refill_s, self.step_s)),
            min_steps=self.cfg.min_window_steps,
            judge_waiting=self.waiting > 0,
        )  # fmt: skip
        self.held_back = staleness_window - admitted
        return admitted

    def metrics(self) -> dict[str, float]:
        """queue/judge_* figures of the step (metrics.jsonl)."""
        return {
            "queue/judge_backlog": float(self.waiting + self.unacked),
            "queue/judge_waiting": float(self.waiting),
            "queue/judge_latency_s": self.latency_s,
            "queue/judge_wait_steps": wait_steps(self.latency_s, self.step_s),
            "queue/judge_held_back": float(self.held_back),
            "queue/judge_refill_s": self.refill_s,
        }
