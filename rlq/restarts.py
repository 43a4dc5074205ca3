"""What `rlq train` does when one of its roles dies: the typed policy (`cluster.restarts`) and the bookkeeping of
one role's restarts (exponential backoff, a bound per time window). No processes here: rlq/supervisor.py acts on
the decisions, and the config module can import this one without pulling in subprocess handling.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_validator

from broker.typed import StrictModel


class RestartPolicy(StrictModel):
    """`cluster.restarts`: generation and judge workers that die are started again, the run going on meanwhile
    (their batches wait in the streams' pending lists); the learner's death ends the run unless `learner` says
    resume. docs/reliability.md, "Supervision"."""

    max_restarts: int = Field(
        5,
        ge=0,
        le=10_000,
        description="Restarts of one role allowed within window_s; its next death then ends the run, naming the "
        "role and the cause. 0: never restart (any death ends the run).",
    )
    window_s: float = Field(
        600.0,
        gt=0,
        le=7 * 86_400,
        description="Seconds over which restarts are counted against max_restarts; the backoff also starts again "
        "from backoff_initial_s after a window without a restart.",
    )
    backoff_initial_s: float = Field(
        1.0, ge=0, le=3_600, description="Wait before the first restart of a role within the window, in seconds."
    )
    backoff_max_s: float = Field(
        60.0,
        ge=0,
        le=3_600,
        description="Longest wait before a restart: the wait doubles with each restart within the window up to this.",
    )
    learner: Literal["stop", "resume"] = Field(
        "stop",
        description="When the learner dies: stop ends the run (one line naming the cause); resume starts it again "
        "under the same restart bound, and it resumes from its latest checkpoint (needs checkpointing.enabled).",
    )
    stop_grace_s: float = Field(
        8.0,
        gt=0,
        le=600,
        description="On SIGINT/SIGTERM to `rlq train`, or at the end of the run: seconds every role gets after its "
        "SIGTERM (the learner checkpoints, generation workers finish or release their batch) before SIGKILL. The "
        "default keeps the whole stop under 10 s.",
    )

    @model_validator(mode="after")
    def _check_backoff(self) -> RestartPolicy:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"cluster.restarts.backoff_max_s ({self.backoff_max_s}) is below backoff_initial_s "
                f"({self.backoff_initial_s})"
            )
        return self


@dataclass
class RestartBook:
    """The restarts of one role: how long to wait before the next, and whether the bound is reached."""

    policy: RestartPolicy
    recent: deque[float] = field(default_factory=deque)  # monotonic times of the restarts within the window
    total: int = 0  # every restart of the run

    def next_backoff(self, now: float) -> float | None:
        """Record a death at `now` (monotonic seconds). Returns the seconds to wait before restarting, or None when
        the role has already been restarted `max_restarts` times within `window_s` (the run must end)."""
        while self.recent and now - self.recent[0] > self.policy.window_s:
            self.recent.popleft()
        if len(self.recent) >= self.policy.max_restarts:
            return None
        backoff = min(self.policy.backoff_max_s, self.policy.backoff_initial_s * 2 ** len(self.recent))
        self.recent.append(now)
        self.total += 1
        return backoff
