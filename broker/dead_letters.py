"""What `rlq dlq` does with dead letters for an operator: list them, requeue one to the stream it came from,
purge. Consumers write them with `broker.streams.send_dead_letter`."""

from __future__ import annotations

import logging
from typing import Any

import redis

from broker.schemas import DeadLetter, MessageError, decode
from broker.streams import PAYLOAD_FIELD, as_text, payload_of

log = logging.getLogger(__name__)


def dead_letter_ids(r: redis.Redis, dead_stream: str, page: int = 100) -> list[str]:
    """Every entry id of the dead stream, oldest first (paged, so a long dead stream is not one huge reply)."""
    ids: list[str] = []
    start = "-"
    while True:
        rows: Any = r.xrange(dead_stream, min=start, count=page)
        ids += [as_text(i) for i, _ in rows]
        if len(rows) < page:
            return ids
        start = "(" + ids[-1]


def requeue_dead(
    r: redis.Redis, dead_stream: str, entry_ids: list[str], *, allowed_prefix: str, force: bool = False
) -> dict[str, list[dict[str, str]]]:
    """Put the original payloads of the given dead letters back on their source streams and drop the letters.

    A letter is skipped (and kept) when it is not a DeadLetter, its source stream lies outside
    `allowed_prefix` or is the dead stream itself, or (unless `force`) its payload still does not decode, since
    it would only bounce straight back. Each move is one MULTI/EXEC: the payload is never in neither stream.
    """
    done: list[dict[str, str]] = []
    skipped: list[dict[str, str]] = []
    for dead_id in entry_ids:
        rows: Any = r.xrange(dead_stream, min=dead_id, max=dead_id)
        problem, letter = _requeue_problem(rows, dead_stream, allowed_prefix, force)
        if letter is None or problem:
            skipped.append({"dead_id": dead_id, "reason": problem or "not a dead letter"})
            continue
        pipe = r.pipeline(transaction=True)
        pipe.xadd(letter.source_stream, {PAYLOAD_FIELD: letter.payload})
        pipe.xdel(dead_stream, dead_id)
        new_id, _ = pipe.execute()
        done.append({"dead_id": dead_id, "source_stream": letter.source_stream, "new_id": as_text(new_id)})
        log.info("requeued dead letter %s onto %s as %s", dead_id, letter.source_stream, as_text(new_id))
    return {"requeued": done, "skipped": skipped}


def _requeue_problem(rows: Any, dead_stream: str, allowed_prefix: str, force: bool) -> tuple[str, Any]:
    if not rows:
        return "no such entry in the dead stream", None
    payload, problem = payload_of(rows[0][1])
    if problem:
        return problem, None
    try:
        letter: Any = decode(payload, DeadLetter)
    except MessageError as exc:
        return f"not a dead letter: {exc}", None
    if not letter.source_stream.startswith(allowed_prefix) or letter.source_stream == dead_stream:
        return f"source stream {letter.source_stream!r} is not a stream of this run", letter
    if "cut to its first" in letter.reason:
        return "the dead letter holds only the start of an oversize payload", letter
    if not force:
        try:
            decode(letter.payload)
        except MessageError as exc:
            return f"payload still does not decode ({exc}); use --force to requeue it anyway", letter
    return "", letter


def purge_dead(r: redis.Redis, dead_stream: str, entry_ids: list[str] | None) -> int:
    """Delete the given dead letters, or all of them with `entry_ids=None`; returns how many went."""
    if entry_ids is None:
        removed: Any = r.xtrim(dead_stream, maxlen=0, approximate=False)
    else:
        removed = r.xdel(dead_stream, *entry_ids) if entry_ids else 0
    log.info("purged %d dead letters from %s", int(removed), dead_stream)
    return int(removed)
