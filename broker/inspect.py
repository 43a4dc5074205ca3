"""Read-only queue inspection: what `rlq queues` and `rlq peek` show, as plain JSON-ready dicts.

Nothing here changes delivery state: only XINFO, XPENDING, XRANGE/XREVRANGE, XLEN, SCAN, HGETALL and EXISTS
are used (a consumer-group lag that Redis < 7 does not report is counted by a small script that only calls
XRANGE inside the server). Never XREADGROUP or XCLAIM: those would bump delivery counts and idle times, and an
inspection tool must not disturb what it measures. The field names of every dict are the stable `--json`
schema documented in docs/queues.md; add fields, never rename them.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import msgspec
import numpy as np
import redis

from broker.celery_inspect import judge_queue_report
from broker.connection import eval_read_only
from broker.keys import Keys
from broker.registry import Registry
from broker.schemas import Array, MessageError, decode, kind_of
from broker.streams import PAYLOAD_FIELD, as_text

log = logging.getLogger(__name__)

JSON_VERSION = 1
"""Version of the `--json` layout; bumped only if a field changes meaning."""

PENDING_SCAN_LIMIT = 10_000
"""Pending entries examined per group for the oldest idle time and highest delivery count."""

LAG_COUNT_LIMIT = 1_000
"""A lag that Redis < 7 does not report is counted up to this many entries (then `lag_exact` is false). The
count runs inside the server and touches every entry (~130 KB for a rollout), so it is kept short."""

# KEYS[1] stream; ARGV[1] last-delivered id, ARGV[2] cap. Counts entries after ARGV[1] without sending them.
_COUNT_AFTER_LUA = """
local n, start, cap = 0, '(' .. ARGV[1], tonumber(ARGV[2])
while n < cap do
  local rows = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 64)
  if #rows == 0 then break end
  n = n + #rows
  start = '(' .. rows[#rows][1]
end
return n
"""


def queues_report(r: redis.Redis, keys: Keys, *, broker: str = "") -> dict[str, Any]:
    """Every stream of the run with its groups, the dead-letter count, the registered workers and the judge queue."""
    streams = [stream_report(r, name, keys) for name in stream_names(r, keys)]
    return {
        "version": JSON_VERSION,
        "broker": broker,
        "run": keys.run,
        "time": time.time(),
        "streams": streams,
        "dead_letters": int(_any(r.xlen(keys.dead))),
        "workers": workers_report(r, keys),
        "judge_queue": judge_queue_report(r, keys),  # the Celery queue (broker/celery_inspect.py)
    }


def stream_names(r: redis.Redis, keys: Keys) -> list[str]:
    """The run's well-known streams, then any other stream under its prefix."""
    known = keys.streams()
    prefix = f"rlq:{keys.run}:"
    found = {as_text(k) for k in r.scan_iter(match=f"{prefix}*", count=1000, _type="stream")}
    return known + sorted(found - set(known))


def short_name(stream: str, keys: Keys) -> str:
    prefix = f"rlq:{keys.run}:"
    return stream[len(prefix) :] if stream.startswith(prefix) else stream


def resolve_stream(name: str, keys: Keys) -> str:
    """`prompts` -> `rlq:<run>:prompts`; a full key (containing ':') is taken as is."""
    return name if ":" in name else f"rlq:{keys.run}:{name}"


def stream_report(r: redis.Redis, stream: str, keys: Keys) -> dict[str, Any]:
    report: dict[str, Any] = {
        "stream": stream,
        "name": short_name(stream, keys),
        "exists": False,
        "length": 0,
        "first_id": None,
        "last_id": None,
        "last_generated_id": None,
        "groups": [],
    }
    if as_text(_any(r.type(stream))) != "stream":
        return report
    info: Any = r.xinfo_stream(stream)
    first, last = info.get("first-entry"), info.get("last-entry")
    report.update(
        exists=True,
        length=int(info["length"]),
        first_id=as_text(first[0]) if first else None,
        last_id=as_text(last[0]) if last else None,
        last_generated_id=as_text(info["last-generated-id"]),
    )
    groups: Any = r.xinfo_groups(stream)
    report["groups"] = [group_report(r, stream, g, report) for g in groups]
    return report


def group_report(r: redis.Redis, stream: str, info: dict, stream_info: dict) -> dict[str, Any]:
    """One consumer group: its consumers, pending entries, lag, oldest idle time, highest delivery count."""
    name = as_text(info["name"])
    last_delivered = as_text(info["last-delivered-id"])
    lag, exact = _lag(r, stream, info, last_delivered, stream_info)
    scan = _scan_pending(r, stream, name, int(info["pending"]))
    consumers: Any = r.xinfo_consumers(stream, name)
    return {
        "group": name,
        "consumers": [
            {"name": as_text(c["name"]), "pending": int(c["pending"]), "idle_ms": int(c["idle"])} for c in consumers
        ],
        "pending": int(info["pending"]),
        "lag": lag,
        "lag_exact": exact,
        "last_delivered_id": last_delivered,
        **scan,
    }


def _lag(r: redis.Redis, stream: str, info: dict, last_delivered: str, stream_info: dict) -> tuple[int, bool]:
    """Entries the group has not read yet: Redis >= 7 reports it, older servers get counted in-server."""
    if info.get("lag") is not None:
        return int(info["lag"]), True
    if stream_info["length"] == 0 or _id_key(last_delivered) >= _id_key(stream_info["last_id"]):
        return 0, True
    if _id_key(last_delivered) < _id_key(stream_info["first_id"]):
        return stream_info["length"], True
    n = int(_any(eval_read_only(r, _COUNT_AFTER_LUA, 1, stream, last_delivered, str(LAG_COUNT_LIMIT))))
    return n, n < LAG_COUNT_LIMIT


def _scan_pending(r: redis.Redis, stream: str, group: str, pending: int) -> dict[str, Any]:
    oldest_id, oldest_idle, max_deliveries, scanned = None, None, 0, 0
    start = "-"
    while scanned < min(pending, PENDING_SCAN_LIMIT):
        rows: Any = r.xpending_range(stream, group, start, "+", min(1000, PENDING_SCAN_LIMIT - scanned))
        if not rows:
            break
        for row in rows:
            idle, times = int(row["time_since_delivered"]), int(row["times_delivered"])
            if oldest_id is None:
                oldest_id = as_text(row["message_id"])  # the PEL is ordered by id: the first is the oldest entry
            oldest_idle = idle if oldest_idle is None else max(oldest_idle, idle)
            max_deliveries = max(max_deliveries, times)
        scanned += len(rows)
        start = "(" + as_text(rows[-1]["message_id"])
    return {
        "oldest_pending_id": oldest_id,
        "oldest_pending_idle_ms": oldest_idle,
        "max_deliveries": max_deliveries,
        "pending_scanned": scanned,
    }


def pull_shares(workers: list[tuple[str, str, float, bool]]) -> dict[str, float]:
    """Each alive generation worker's share of the fleet's throughput: (worker id, role, tokens/s, alive) -> share.

    It is the share of the waiting prompt messages each one takes per read (capacity-aware pulls,
    workers/generate/pull.py), so it is also its share of the work."""
    fleet = {wid: t for wid, role, t, alive in workers if role == "generate" and alive}
    total = sum(fleet.values())
    return {wid: (t / total if total > 0 else 1 / len(fleet)) for wid, t in fleet.items()}


def workers_report(r: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    states = Registry(r, keys).workers()
    shares = pull_shares([(b.worker_id, b.role, b.throughput, alive) for b, _, alive in states])
    out = []
    for beat, age_s, alive in states:
        out.append(
            {
                "worker_id": beat.worker_id,
                "role": beat.role,
                "node": beat.node,
                "pid": beat.pid,
                "accelerator": beat.accelerator,
                "capacity": beat.capacity,
                "status": beat.status,
                "policy_version": beat.policy_version,
                "throughput": beat.throughput,
                "share": round(shares.get(beat.worker_id, 0.0), 4),
                "heartbeat_age_s": round(age_s, 3),
                "alive": alive,
            }
        )
    return out


# Peek --------------------------------------------------------------------------------------------------------


def peek(r: redis.Redis, stream: str, *, count: int = 10, last: bool = False) -> list[dict[str, Any]]:
    """The first (or, with `last`, the newest) `count` entries, decoded and summarised, oldest first.

    Each entry also says, per consumer group, whether it is unread, pending (with owner, idle time and
    delivery count) or acknowledged.
    """
    kind = as_text(_any(r.type(stream)))
    if kind not in ("stream", "none"):
        raise ValueError(f"{stream} is a {kind}, not a stream")
    rows: Any = r.xrevrange(stream, count=count) if last else r.xrange(stream, count=count)
    if last:
        rows = rows[::-1]
    groups: Any = r.xinfo_groups(stream) if rows else []
    states = _entry_states(r, stream, [as_text(i) for i, _ in rows], groups)
    now_ms = time.time() * 1000
    return [_entry(as_text(i), fields, states[as_text(i)], now_ms) for i, fields in rows]


def _entry(entry_id: str, fields: dict, groups: list[dict], now_ms: float) -> dict[str, Any]:
    payload = fields.get(PAYLOAD_FIELD)
    out: dict[str, Any] = {
        "id": entry_id,
        "age_s": round(max(0.0, now_ms - _id_key(entry_id)[0]) / 1000, 3),
        "bytes": len(payload) if payload is not None else None,
        "kind": None,
        "message": None,
        "error": None,
        "groups": groups,
    }
    if payload is None:
        out["error"] = f"entry has no {PAYLOAD_FIELD!r} field (fields: {sorted(as_text(k) for k in fields)})"
        return out
    try:
        message = decode(payload)
    except MessageError as exc:
        out["error"] = str(exc)
        return out
    out["kind"] = kind_of(message)
    out["message"] = summarize(message)
    return out


def _entry_states(r: redis.Redis, stream: str, ids: list[str], groups: list[dict]) -> dict[str, list[dict]]:
    pipe = r.pipeline(transaction=False)
    for group in groups:
        for entry_id in ids:
            pipe.xpending_range(stream, group["name"], entry_id, entry_id, 1)
    replies = iter(pipe.execute())
    states: dict[str, list[dict]] = {i: [] for i in ids}
    for group in groups:
        name, last_delivered = as_text(group["name"]), _id_key(as_text(group["last-delivered-id"]))
        for entry_id in ids:
            rows = next(replies)
            state: dict[str, Any] = {"group": name, "state": "acked"}
            if rows:
                row = rows[0]
                state.update(
                    state="pending",
                    consumer=as_text(row["consumer"]),
                    idle_ms=int(row["time_since_delivered"]),
                    deliveries=int(row["times_delivered"]),
                )
            elif _id_key(entry_id) > last_delivered:
                state["state"] = "unread"
            states[entry_id].append(state)
    return states


def summarize(obj: Any) -> Any:
    """A JSON-ready view of a message: arrays as dtype/shape/min/max, raw bytes as their length."""
    if isinstance(obj, Array):
        return summarize_array(obj)
    if isinstance(obj, msgspec.Struct):
        out: dict[str, Any] = {}
        tag = type(obj).__struct_config__.tag
        if isinstance(tag, str):
            out["kind"] = tag
        for name in obj.__struct_fields__:
            out[name] = summarize(getattr(obj, name))
        if out.get("kind") == "dead_letter":
            out["payload"] = summarize_payload(getattr(obj, "payload"))  # noqa: B009
        return out
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"bytes": len(obj)}
    if isinstance(obj, (list, tuple)):
        return [summarize(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): summarize(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def summarize_array(arr: Array) -> dict[str, Any]:
    values = arr.to_numpy()
    out: dict[str, Any] = {"dtype": arr.dtype, "shape": list(arr.shape), "min": None, "max": None}
    if values.size:
        lo, hi = np.min(values), np.max(values)
        out["min"], out["max"] = _scalar(lo), _scalar(hi)
    return out


def summarize_payload(payload: bytes) -> dict[str, Any]:
    """A dead letter's original bytes: their size and, if they decode now, what they are."""
    out: dict[str, Any] = {"bytes": len(payload), "kind": None, "error": None}
    try:
        out["kind"] = kind_of(decode(payload))
    except MessageError as exc:
        out["error"] = str(exc)
    return out


def _scalar(value: Any) -> float | int | None:
    item = value.item()
    if isinstance(item, float) and not math.isfinite(item):
        return None
    return item


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _any(value: Any) -> Any:
    # redis-py types replies as `Awaitable | Any`; this client is synchronous.
    return value


def dead_letters(r: redis.Redis, dead_stream: str, *, count: int = 100, last: bool = False) -> list[dict[str, Any]]:
    """The dead stream's letters, flattened for `rlq dlq list`: where each came from, why, and its payload."""
    out = []
    for entry in peek(r, dead_stream, count=count, last=last):
        message = entry["message"] or {}
        out.append(
            {
                "id": entry["id"],
                "age_s": entry["age_s"],
                "source_stream": message.get("source_stream"),
                "entry_id": message.get("entry_id"),
                "reason": message.get("reason") or entry["error"],
                "deliveries": message.get("deliveries"),
                "consumer": message.get("consumer"),
                "failed_at": message.get("failed_at"),
                "payload": message.get("payload"),
            }
        )
    return out
