"""Read-only inspection of the judges' Celery queue, straight from Redis (no Celery import).

The judge queue is a Celery queue on kombu's Redis transport. What kombu keeps there (kombu 5.x,
`kombu.transport.redis.Channel`; tests/unit/test_run_views.py checks these names against the installed kombu):

- the waiting messages: one list per priority step, named by the queue (`<queue>`, `<queue>\\x06\\x163`, ...);
- the delivered but not yet acknowledged ones (prefetched or running): one `unacked` hash, delivery tag ->
  JSON `[message, exchange, routing_key]`, shared by every queue of the database, and the `unacked_index`
  sorted set, delivery tag -> unix time of delivery.

Consumers are not on the broker (kombu's Redis transport has no consumer list): the alive judges of the run's
registry are counted instead; `rlq queues --celery` asks the workers themselves (Celery's `inspect
active_queues`).
"""

from __future__ import annotations

import time
from typing import Any

import redis

from broker.connection import eval_read_only
from broker.keys import Keys
from broker.registry import Registry

PRIORITY_SEP = "\x06\x16"
"""kombu's separator between a queue's name and its priority step."""
PRIORITY_STEPS = (0, 3, 6, 9)
"""kombu's default priority steps; step 0 is the queue's own name."""
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"

UNACKED_SCAN_LIMIT = 10_000
"""Entries of the shared `unacked` hash examined per report (each is one task's message)."""

# KEYS[1] unacked hash, KEYS[2] unacked index; ARGV[1] queue (routing key), ARGV[2] cap. Runs in the server, so
# the messages (a task carries up to 8 rollout groups, ~1 MB) never cross the network: only their last bytes are
# compared with `"<queue>"]`, the routing key that ends kombu's JSON triple.
_UNACKED_LUA = """
local suffix, cap = '"' .. ARGV[1] .. '"]', tonumber(ARGV[2])
local cursor, n, scanned, oldest = '0', 0, 0, nil
repeat
  local res = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', 100)
  cursor = res[1]
  local kv = res[2]
  for i = 1, #kv, 2 do
    scanned = scanned + 1
    if string.sub(kv[i + 1], -#suffix) == suffix then
      n = n + 1
      local at = tonumber(redis.call('ZSCORE', KEYS[2], kv[i]))
      if at and (oldest == nil or at < oldest) then oldest = at end
    end
  end
until cursor == '0' or scanned >= cap
return {n, scanned, tostring(oldest or '')}
"""


def priority_keys(queue: str) -> list[str]:
    """The lists kombu keeps one queue's waiting messages in, one per priority step."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def judge_queue_report(r: redis.Redis, keys: Keys) -> dict[str, Any]:
    """Depth (waiting), unacked (delivered, not acknowledged) with the oldest's age, and the consumers."""
    queue = keys.judge_queue
    pipe = r.pipeline(transaction=False)
    for key in priority_keys(queue):
        pipe.llen(key)
    depth = sum(int(n) for n in pipe.execute())
    reply: Any = eval_read_only(r, _UNACKED_LUA, 2, UNACKED_KEY, UNACKED_INDEX_KEY, queue, str(UNACKED_SCAN_LIMIT))
    unacked, scanned, oldest = int(reply[0]), int(reply[1]), reply[2]
    oldest_at = float(oldest) if oldest not in (b"", "", None) else None
    judges = [s.heartbeat.worker_id for s in Registry(r, keys).workers("judge") if s.alive]
    return {
        "queue": queue,
        "depth": depth,
        "unacked": unacked,
        "unacked_exact": scanned < UNACKED_SCAN_LIMIT,
        "oldest_unacked_age_s": None if oldest_at is None else round(max(0.0, time.time() - oldest_at), 3),
        "consumers": len(judges),
        "consumer_names": judges,
        "consumers_source": "registry",
    }
