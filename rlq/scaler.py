"""Carries out `rlq scale` on a running `rlq train`: more or fewer generation and judge processes, live.

The request is the run's `scale` hash in Redis (broker/scaling.py). On every tick the launcher compares it with
the roles it supervises: it starts the missing ones (the same commands as at start-up, with new indices) and
asks the surplus ones to leave with SIGTERM, newest first (a generation worker finishes or releases the batch in
hand; its prompts wait in the stream's pending list for the others). What it does goes to the log and to
`events.jsonl`. A request it cannot carry out (a GPU run asking for workers its placement has no GPU for) is
logged once and otherwise ignored.
"""

from __future__ import annotations

import logging
import re
import time

import redis

from broker.keys import Keys
from broker.scaling import desired_counts
from rlq.roles import RunRoles
from rlq.supervisor import RoleProcess, Supervisor

log = logging.getLogger(__name__)

POLL_S = 1.0
"""How often the request is read: a scale-up starts within about a second."""


class Scaler:
    def __init__(self, supervisor: Supervisor, roles: RunRoles, r: redis.Redis, keys: Keys) -> None:
        self.supervisor, self.roles, self.r, self.keys = supervisor, roles, r, keys
        self.next_index = {"generate": roles.cfg.cluster.generation_workers, "judge": 1}
        self._refused: dict[str, int] = {}
        self._read_at = 0.0

    def announce(self) -> None:
        """Record the counts the run starts with, so `rlq scale` shows them and a bare request changes one role."""
        current = {kind: len(self.supervisor.active(kind)) for kind in self.next_index}
        self.r.hset(self.keys.scale, mapping={kind: str(count) for kind, count in current.items()})

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._read_at < POLL_S:
            return
        self._read_at = now
        try:
            desired = desired_counts(self.r, self.keys)
        except redis.RedisError:
            return  # the broker is away for a moment: the workers notice it too; try again at the next tick
        for kind, want in desired.items():
            active = self.supervisor.active(kind)
            if len(active) < want:
                self._add(kind, want - len(active), want)
            elif len(active) > want:
                for role in sorted(active, key=_index, reverse=True)[: len(active) - want]:
                    self.supervisor.retire(role)
                    self.supervisor.record({"time": time.time(), "role": role.spec.name, "scaled": "down",
                                            "to": want})  # fmt: skip

    def _add(self, kind: str, missing: int, want: int) -> None:
        for _ in range(missing):
            index = self.next_index[kind]
            problem = self.roles.can_add_generation(index) if kind == "generate" else ""
            if problem:
                if self._refused.get(kind) != want:
                    log.warning("cannot scale %s to %d: %s", kind, want, problem)
                    self._refused[kind] = want
                return
            spec = self.roles.generate(index) if kind == "generate" else self.roles.judge(index)
            self.next_index[kind] = index + 1
            self.supervisor.start(spec)
            self.supervisor.record({"time": time.time(), "role": spec.name, "scaled": "up", "to": want})
            log.info("scaled %s up to %d: started %s", kind, want, spec.name)


def _index(role: RoleProcess) -> int:
    found = re.search(r"-(\d+)$", role.spec.name)
    return int(found.group(1)) if found else 0
