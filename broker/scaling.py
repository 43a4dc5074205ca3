"""Scaling a live run: the desired number of worker processes per role, asked for by `rlq scale` from any
terminal and carried out by the launcher that supervises the run (`rlq train`, rlq/scaler.py).

The request is a Redis hash (`Keys.scale`: role -> count) rather than a signal or a file, so it works from any
machine that reaches the broker, survives a launcher that is busy for a moment, and `rlq queues` or redis-cli
can read it back. The launcher reports what it did in its log and in `events.jsonl`.
"""

from __future__ import annotations

from typing import Any

import redis

from broker.keys import Keys

SCALABLE_ROLES = ("generate", "judge")
MAX_PROCESSES = 256
"""A bound on one role's processes on one launcher: a typo (generate=2000) is refused, not obeyed."""


def check_request(role: str, count: int) -> None:
    """Raises ValueError (one line: what is wrong and what is allowed) for a request no launcher should act on."""
    if role not in SCALABLE_ROLES:
        raise ValueError(f"cannot scale {role!r}: roles are {', '.join(SCALABLE_ROLES)}")
    if not 1 <= count <= MAX_PROCESSES:
        raise ValueError(f"{role}={count}: a run needs 1 to {MAX_PROCESSES} {role} processes (stop it to have none)")


def request_scale(r: redis.Redis, keys: Keys, counts: dict[str, int]) -> None:
    """Ask the run's launcher for `counts` processes per role (validated first; nothing is written on error)."""
    for role, count in counts.items():
        check_request(role, count)
    r.hset(keys.scale, mapping={role: str(count) for role, count in counts.items()})


def desired_counts(r: redis.Redis, keys: Keys) -> dict[str, int]:
    """The counts asked for so far; entries that are not a valid request are left out (the launcher logs them)."""
    raw: Any = r.hgetall(keys.scale)
    out = {}
    for role, count in raw.items():
        role = role.decode() if isinstance(role, bytes) else str(role)
        try:
            number = int(count)
            check_request(role, number)
        except ValueError:
            continue
        out[role] = number
    return out
