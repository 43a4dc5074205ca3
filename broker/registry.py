"""Worker registry: who is in the run, on which node and accelerator, and whether it is still alive.

Each role calls `Registry.heartbeat` every few seconds. The heartbeat is stored twice: the full message in one
hash (`Keys.workers`, field = worker id) so inspection can list every worker in one read, and a small string key
with a TTL (`Keys.worker_alive`) whose expiry is the liveness signal, so a worker that dies without saying
goodbye drops out on its own after `ttl_s`. `prune` removes the hash entries of workers dead for a while.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import redis

from broker.keys import Keys
from broker.schemas import MessageError, WorkerHeartbeat, decode, encode

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 15.0
"""A worker that has not sent a heartbeat for this long is considered dead."""

DEFAULT_PRUNE_AFTER_S = 600.0
"""A dead worker's last heartbeat stays visible in `rlq queues` this long, then `prune` removes it."""


class WorkerState(NamedTuple):
    """One registry entry as seen now; unpacks as (heartbeat, age_s, alive)."""

    heartbeat: WorkerHeartbeat
    age_s: float  # seconds since the worker sent this heartbeat (by its own clock)
    alive: bool  # the TTL key still exists


class Registry:
    """Heartbeats of one run's workers, stored under that run's keys."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r = r
        self.keys = keys

    def heartbeat(self, beat: WorkerHeartbeat, ttl_s: float = DEFAULT_TTL_S) -> None:
        """Record `beat` and keep the worker alive for `ttl_s` more seconds (one round trip)."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.keys.workers, mapping={beat.worker_id: encode(beat)})
        pipe.set(self.keys.worker_alive(beat.worker_id), repr(beat.sent_at), px=max(1, int(ttl_s * 1000)))
        pipe.execute()

    def workers(self, role: str | None = None) -> list[WorkerState]:
        """Every registered worker (optionally of one role), sorted by worker id."""
        raw: Any = self.r.hgetall(self.keys.workers)
        beats: list[WorkerHeartbeat] = []
        for worker_id, payload in sorted(raw.items()):
            try:
                beats.append(decode(payload, WorkerHeartbeat))  # type: ignore[arg-type]
            except MessageError as exc:
                log.warning("registry entry %r is not a heartbeat (%s); ignoring it", worker_id, exc)
        if role is not None:
            beats = [b for b in beats if b.role == role]
        pipe = self.r.pipeline(transaction=False)
        for beat in beats:
            pipe.exists(self.keys.worker_alive(beat.worker_id))
        alive = pipe.execute()
        now_s = time.time()
        return [WorkerState(b, max(0.0, now_s - b.sent_at), bool(a)) for b, a in zip(beats, alive, strict=True)]

    def alive(self, role: str | None = None) -> list[WorkerHeartbeat]:
        return [state.heartbeat for state in self.workers(role) if state.alive]

    def remove(self, worker_id: str) -> bool:
        """Forget a worker (a clean shutdown); returns whether it was registered."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(self.keys.workers, worker_id)
        pipe.delete(self.keys.worker_alive(worker_id))
        removed, _ = pipe.execute()
        return bool(removed)

    def prune(self, older_than_s: float = DEFAULT_PRUNE_AFTER_S) -> list[str]:
        """Remove workers whose TTL expired and whose last heartbeat is older than `older_than_s`."""
        gone = [s.heartbeat.worker_id for s in self.workers() if not s.alive and s.age_s >= older_than_s]
        if gone:
            self.r.hdel(self.keys.workers, *gone)
            log.info("pruned %d dead workers: %s", len(gone), ", ".join(gone))
        return gone
