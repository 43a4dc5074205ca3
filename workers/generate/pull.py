"""Capacity-aware pulls: how many prompt messages a generation worker takes per read.

A worker takes its share of what waits in the prompts stream, its share being its measured throughput over the
fleet's: `ceil(share * waiting)` messages, within [min_messages, max_messages]. Workers read when they are idle,
so each one comes back for more after about the same time whatever its speed, and a batch never sits on a slow
worker while a fast one idles (docs/architecture.md, "Capacity-aware pulls"). The throughputs are the ones the
heartbeats already carry (tokens/s, an EMA over recent batches); a worker with no measurement yet counts as the
fleet's mean, and a fleet with none at all shares equally.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from workers.generate.config import PullConfig


def fleet_share(own: float, others: Sequence[float]) -> float:
    """This worker's share in [0, 1] of the fleet's throughput (`others`: the other alive workers' tokens/s).

    Unmeasured throughputs (<= 0) count as the mean of the measured ones; with none measured, shares are equal.
    """
    known = [t for t in (own, *others) if t > 0]
    mean = sum(known) / len(known) if known else 1.0
    mine = own if own > 0 else mean
    total = mine + sum(t if t > 0 else mean for t in others)
    return mine / total


def pull_count(share: float, waiting: int, *, min_messages: int, max_messages: int) -> int:
    """Messages one read takes: this worker's share of the `waiting` ones, rounded up, within the bounds."""
    wanted = math.ceil(share * max(waiting, 0) - 1e-9)
    return max(min_messages, min(max_messages, wanted))


class PullSizer:
    """Sizes each read of one worker from its throughput, the fleet's (cached `fleet_refresh_s`) and the backlog.

    `fleet` returns the alive generation workers' (worker id, tokens/s); `waiting` the messages the consumer
    group has not read yet. Both are Redis reads the worker passes in, so this stays testable without Redis.
    """

    def __init__(
        self,
        cfg: PullConfig,
        worker_id: str,
        fleet: Callable[[], list[tuple[str, float]]],
        waiting: Callable[[], int],
    ) -> None:
        self.cfg = cfg
        self.worker_id = worker_id
        self._fleet = fleet
        self._waiting = waiting
        self._others: list[float] = []
        self._fetched_at = -math.inf
        self.share = 1.0  # last computed share, for the heartbeat and logs

    def count(self, own_throughput: float, taken: int = 0) -> int:
        """Messages the next read should take; with `taken`, how many more to add to the `taken` just read.

        The second form serves a worker that woke from a blocking read on the feeder's first message: the rest of
        the feeder's batch arrives right after, and the worker takes its share of all of it in the same engine call.
        """
        if not self.cfg.capacity_aware:
            return 0 if taken else self.cfg.min_messages
        now = time.monotonic()
        if now - self._fetched_at >= self.cfg.fleet_refresh_s:
            self._others = [t for wid, t in self._fleet() if wid != self.worker_id]
            self._fetched_at = now
        self.share = fleet_share(own_throughput, self._others)
        wanted = pull_count(self.share, self._waiting() + taken, min_messages=self.cfg.min_messages,
                            max_messages=self.cfg.max_messages)  # fmt: skip
        return max(0, wanted - taken)
