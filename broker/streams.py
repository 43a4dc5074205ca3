"""Redis streams with at-least-once delivery: producers, consumer groups, reclaim, dead letters, safe trimming.

Every entry carries exactly one field, `PAYLOAD_FIELD`, holding one encoded `broker.schemas` message. A
consumer reads through a consumer group, hands the message on, then XACKs it; an entry left pending by a dead
consumer is taken over with XAUTOCLAIM once it has been idle for `claim_idle_ms`. An entry that cannot be
decoded, or that has been delivered more than `max_deliveries` times, is copied to the dead-letter stream with
the reason and then acknowledged, so one bad message never stops a consumer and is never lost silently.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import redis
from redis.exceptions import ResponseError

from broker.connection import SOCKET_TIMEOUT_S
from broker.schemas import DeadLetter, Message, MessageError, decode, encode
from broker.trim import ack_and_trim

log = logging.getLogger(__name__)

PAYLOAD_FIELD = b"m"
"""The one field of every stream entry: the encoded message."""

DONE_TTL_S = 7 * 24 * 3600
"""How long the idempotency set of a stream outlives its last publish."""

MAX_CLAIM_INTERVAL_S = 5.0
"""A consumer looks for entries of dead consumers at least this often (and every claim_idle_ms / 2)."""

MAX_BLOCK_MS = int(SOCKET_TIMEOUT_S * 1000) // 2
"""Longest XREADGROUP BLOCK, well inside the client's socket timeout."""

PEL_SCAN_PAGES = 100
"""Pages of 100 pending entries examined when looking for entries deleted while pending."""

MAX_DEAD_PAYLOAD_BYTES = 1024 * 1024
"""A dead letter keeps at most this much of the original payload, so it stays a decodable message itself."""

# KEYS[1] stream, KEYS[2] done set; ARGV[1] idempotency key, ARGV[2] payload, ARGV[3] ttl of the done set.
# One script, so a crash between "remember the key" and "add the entry" cannot lose or duplicate a message.
_PUBLISH_ONCE_LUA = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then
  return false
end
redis.call('EXPIRE', KEYS[2], ARGV[3])
return redis.call('XADD', KEYS[1], '*', 'm', ARGV[2])
"""


def done_key(stream: str) -> str:
    """The idempotency set of `stream` (the same name as `Keys.done`)."""
    return f"{stream}:done"


def publish_once(
    r: redis.Redis, stream: str, idempotency_key: str, message: Message, *, done_ttl_s: int = DONE_TTL_S
) -> bool:
    """XADD `message` to `stream` unless `idempotency_key` was published there before.

    One script call, atomic on its own, in one round trip (the judges and workers publish every group this way).

    Returns:
        True if the entry was added, False if the key was already in the stream's done set.
    """
    keys, args = _once_call(stream, idempotency_key, message, done_ttl_s)
    return _added(stream, idempotency_key, r.register_script(_PUBLISH_ONCE_LUA)(keys=keys, args=args))


def publish_all_once(
    r: redis.Redis, stream: str, items: list[tuple[str, Message]], *, done_ttl_s: int = DONE_TTL_S
) -> list[bool]:
    """`publish_once` for each (idempotency key, message), all in one MULTI/EXEC.

    Readers see all of them or none: a consumer blocked on the stream wakes to the whole set, not to its first
    entry (the feeder's top-up of a step, cut into several messages, then reaches one worker as one read and
    one engine call instead of two).

    Returns:
        Per item, True if its entry was added, False if its key was already in the stream's done set.
    """
    if len(items) <= 1:  # nothing to group: skip the transaction and the pipeline's SCRIPT EXISTS round trip
        return [publish_once(r, stream, key, message, done_ttl_s=done_ttl_s) for key, message in items]
    script = r.register_script(_PUBLISH_ONCE_LUA)
    pipe = r.pipeline(transaction=True)
    for key, message in items:
        keys, args = _once_call(stream, key, message, done_ttl_s)
        script(keys=keys, args=args, client=pipe)
    return [_added(stream, key, entry_id) for (key, _), entry_id in zip(items, pipe.execute(), strict=True)]


def _once_call(stream: str, idempotency_key: str, message: Message, done_ttl_s: int) -> tuple[list, list]:
    """Keys and arguments of _PUBLISH_ONCE_LUA."""
    return [stream, done_key(stream)], [idempotency_key, encode(message), int(done_ttl_s)]


def _added(stream: str, idempotency_key: str, entry_id: Any) -> bool:
    if entry_id is None:
        log.debug("duplicate %s on %s skipped", idempotency_key, stream)
        return False
    return True


def send_dead_letter(
    r: redis.Redis,
    dead_stream: str,
    *,
    source_stream: str,
    entry_id: str,
    reason: str,
    deliveries: int,
    payload: bytes,
    consumer: str = "",
    ack_group: str | None = None,
) -> str:
    """Copy one failed entry (its original bytes untouched) to `dead_stream` with the reason; returns its id.

    With `ack_group`, the source entry is acknowledged for that group in the same MULTI/EXEC, so an entry is
    never both dead-lettered and still pending (nor acknowledged without its letter).
    """
    if len(payload) > MAX_DEAD_PAYLOAD_BYTES:
        # The original stays in the source stream at entry_id until it is trimmed; copying all of it would
        # make the dead letter itself too big to decode.
        reason = f"{reason} (payload of {len(payload)} bytes cut to its first {MAX_DEAD_PAYLOAD_BYTES})"
        payload = payload[:MAX_DEAD_PAYLOAD_BYTES]
    letter = DeadLetter(
        source_stream=source_stream,
        entry_id=entry_id,
        reason=reason,
        deliveries=deliveries,
        payload=bytes(payload),
        consumer=consumer,
    )
    fields = {PAYLOAD_FIELD: encode(letter)}
    if ack_group is None:
        dead_id = r.xadd(dead_stream, fields)  # type: ignore[arg-type]
    else:
        pipe = r.pipeline(transaction=True)
        pipe.xadd(dead_stream, fields)  # type: ignore[arg-type]
        pipe.xack(source_stream, ack_group, entry_id)
        dead_id, _ = pipe.execute()
    log.warning("dead-lettered %s %s after %d deliveries: %s", source_stream, entry_id, deliveries, reason)
    return as_text(dead_id)


def as_text(value: Any) -> str:
    """A Redis reply (bytes or str: ids, names, types) as text; redis-py types every reply as `Awaitable | Any`."""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Delivery:
    """One decoded message handed to a consumer; XACK `entry_id` after the hand-off."""

    entry_id: str
    message: Message
    deliveries: int  # times Redis has delivered this entry to some consumer of the group, this one included
    payload: bytes = b""  # the entry's original bytes, for dead-lettering after a handler failure


class StreamProducer:
    """Appends encoded messages to one stream; `add_many` sends a whole batch in one round trip."""

    def __init__(self, r: redis.Redis, stream: str) -> None:
        self.r = r
        self.stream = stream

    def add(self, message: Message) -> str:
        return as_text(self.r.xadd(self.stream, {PAYLOAD_FIELD: encode(message)}))

    def add_many(self, messages: list[Message]) -> list[str]:
        return self.add_encoded([encode(m) for m in messages])

    def add_encoded(self, payloads: list[bytes]) -> list[str]:
        """XADD already-encoded payloads (e.g. a dead letter's original bytes), pipelined."""
        pipe = self.r.pipeline(transaction=False)
        for payload in payloads:
            pipe.xadd(self.stream, {PAYLOAD_FIELD: payload})
        return [as_text(i) for i in pipe.execute()]

    def publish_once(self, idempotency_key: str, message: Message) -> bool:
        return publish_once(self.r, self.stream, idempotency_key, message)


class StreamConsumer:
    """One member of a consumer group: reclaims entries of dead consumers, reads new ones, dead-letters bad ones.

    `read` never raises for a bad entry: an undecodable payload, a message of the wrong kind, or an entry
    delivered more than `max_deliveries` times is copied to `dead_stream` with the reason and acknowledged.
    """

    def __init__(
        self,
        r: redis.Redis,
        stream: str,
        group: str,
        consumer: str,
        *,
        expected: type | None = None,
        dead_stream: str,
        max_deliveries: int = 5,
        claim_idle_ms: int = 30_000,
        block_ms: int = 1_000,
        count: int = 64,
        trim_keep_acked: int | None = None,
    ) -> None:
        if max_deliveries < 1 or claim_idle_ms < 0 or block_ms < 0 or count < 1:
            raise ValueError("max_deliveries and count must be >= 1, claim_idle_ms and block_ms >= 0")
        if trim_keep_acked is not None and trim_keep_acked < 0:
            raise ValueError(f"trim_keep_acked must be >= 0 or None, got {trim_keep_acked}")
        self.r = r
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.expected = expected
        self.dead_stream = dead_stream
        self.max_deliveries = max_deliveries
        self.claim_idle_ms = claim_idle_ms
        self.block_ms = block_ms
        self.count = count
        self.trim_keep_acked = trim_keep_acked  # None: never trim; else every ack trims like `safe_trim`
        self._claim_cursor = "0-0"
        self._next_claim_at = 0.0  # monotonic seconds; XAUTOCLAIM costs a round trip, so it runs on a clock

    def ensure_group(self, start_id: str = "0") -> None:
        """Create the group (and the stream) if missing; `start_id` "0" lets it see entries added before it."""
        try:
            self.r.xgroup_create(self.stream, self.group, id=start_id, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, count: int | None = None, block_ms: int | None = None) -> list[Delivery]:
        """Up to `count` deliveries: reclaimed entries of dead consumers first, then new entries.

        Blocks up to `block_ms` only when there is nothing to reclaim.
        """
        count = count or self.count
        # Redis answers a blocked read only when it ends; past the socket timeout the client would give up first.
        block = min(self.block_ms if block_ms is None else block_ms, MAX_BLOCK_MS)
        raw = self._reclaim(count)  # [(entry_id, fields, deliveries)]
        if len(raw) < count:
            # BLOCK 0 would mean "forever" to Redis; block_ms=0 here means "do not wait".
            raw += self._read_new(count - len(raw), None if raw or block <= 0 else block)
        return self._decode_all(raw)

    def ack(self, entry_ids: list[str]) -> int:
        """XACK the ids (and trim, with `trim_keep_acked`) in one round trip; returns how many were still pending."""
        if not entry_ids:
            return 0
        return ack_and_trim(self.r, self.stream, self.group, entry_ids, self.trim_keep_acked)

    def waiting(self, cap: int = 1024) -> int:
        """Entries of the stream this consumer group has not read yet (at most `cap` counted on Redis < 7)."""
        try:
            groups: Any = self.r.xinfo_groups(self.stream)
        except ResponseError:  # no stream yet
            return 0
        info = next((g for g in groups if as_text(g["name"]) == self.group), None)
        if info is None:
            return 0
        if info.get("lag") is not None:  # Redis >= 7 keeps the count
            return int(info["lag"])
        after = "(" + as_text(info["last-delivered-id"])
        entries: Any = self.r.xrange(self.stream, min=after, max="+", count=cap)
        return len(entries)

    def release(self, entry_ids: list[str]) -> None:
        """Negative acknowledgement: make the entries reclaimable at once instead of after `claim_idle_ms`.

        They stay pending (nothing is lost); the next `read` of any consumer of the group takes them over and
        the delivery count goes up, so a message that keeps failing ends in the dead stream.
        """
        if entry_ids:
            ids: list[Any] = list(entry_ids)
            self.r.xclaim(self.stream, self.group, self.consumer, 0, ids, idle=self.claim_idle_ms, justid=True)
            self._next_claim_at = 0.0

    def dead_letter(self, delivery: Delivery, reason: str) -> str:
        """Give up on a decoded message (the handler rejected it for good): dead-letter it and acknowledge it."""
        return self._dead_letter(delivery.entry_id, delivery.payload, reason, delivery.deliveries)

    def _reclaim(self, count: int) -> list[tuple[str, dict | None, int]]:
        now_s = time.monotonic()
        if now_s < self._next_claim_at:
            return []
        self._next_claim_at = now_s + min(self.claim_idle_ms / 2000.0, MAX_CLAIM_INTERVAL_S)
        claimed: list[tuple[str, dict | None]] = []
        while len(claimed) < count:
            reply: Any = self.r.xautoclaim(
                self.stream, self.group, self.consumer, self.claim_idle_ms, self._claim_cursor, count - len(claimed)
            )
            self._claim_cursor = as_text(reply[0])
            claimed += [(as_text(i), f) for i, f in reply[1] if i is not None]
            if any(i is None for i, _ in reply[1]):
                # Redis < 7 hands back an entry deleted while pending as a bare nil, without its id.
                self._ack_deleted_pending()
            if self._claim_cursor == "0-0":
                break
        if not claimed:
            return []
        counts = self._delivery_counts([i for i, _ in claimed])
        log.info("reclaimed %d idle entries of %s/%s", len(claimed), self.stream, self.group)
        # No longer pending means its slow (not dead) first owner acknowledged it meanwhile: nothing to do.
        return [(i, f, counts[i]) for i, f in claimed if i in counts]

    def _ack_deleted_pending(self) -> None:
        """Acknowledge this consumer's pending entries that no longer exist (there is nothing left to deliver)."""
        start, gone = "-", []
        for _ in range(PEL_SCAN_PAGES):
            rows: Any = self.r.xpending_range(self.stream, self.group, start, "+", 100, consumername=self.consumer)
            if not rows:
                break
            ids = [as_text(row["message_id"]) for row in rows]
            pipe = self.r.pipeline(transaction=False)
            for entry_id in ids:
                pipe.xrange(self.stream, min=entry_id, max=entry_id)
            gone += [entry_id for entry_id, found in zip(ids, pipe.execute(), strict=True) if not found]
            start = "(" + ids[-1]
        if gone:
            log.warning(
                "%d pending entries of %s were deleted before delivery; acknowledging them", len(gone), self.stream
            )
            self.ack(gone)

    def _delivery_counts(self, entry_ids: list[str]) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xpending_range(self.stream, self.group, entry_id, entry_id, 1)
        rows = [row for reply in pipe.execute() for row in reply]
        return {as_text(row["message_id"]): int(row["times_delivered"]) for row in rows}

    def _read_new(self, count: int, block_ms: int | None) -> list[tuple[str, dict | None, int]]:
        try:
            reply: Any = self.r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("group %s of %s is missing; recreating it", self.group, self.stream)
            self.ensure_group()
            return []
        # A fresh entry has been delivered exactly once: this time.
        return [(as_text(i), f, 1) for _, entries in reply or [] for i, f in entries]

    def _decode_all(self, raw: list[tuple[str, dict | None, int]]) -> list[Delivery]:
        out: list[Delivery] = []
        for entry_id, fields, deliveries in raw:
            payload, problem = payload_of(fields)
            if problem is None and deliveries > self.max_deliveries:
                problem = f"delivered {deliveries} times without an ack (max_deliveries={self.max_deliveries})"
            if problem is None:
                try:
                    out.append(Delivery(entry_id, decode(payload, self.expected), deliveries, payload))
                    continue
                except MessageError as exc:
                    problem = str(exc)
            if fields is None:  # deleted while pending: there is nothing left to deliver or to save
                log.warning("pending entry %s of %s no longer exists; acknowledging it", entry_id, self.stream)
                self.ack([entry_id])
                continue
            self._dead_letter(entry_id, payload, problem, deliveries)
        return out

    def _dead_letter(self, entry_id: str, payload: bytes, reason: str, deliveries: int) -> str:
        return send_dead_letter(
            self.r,
            self.dead_stream,
            source_stream=self.stream,
            entry_id=entry_id,
            reason=reason,
            deliveries=deliveries,
            payload=payload,
            consumer=self.consumer,
            ack_group=self.group,
        )


def payload_of(fields: dict | None) -> tuple[bytes, str | None]:
    """The entry's payload, or its raw fields re-packed and the reason it is not a valid entry."""
    if fields is None:
        return b"", "entry was deleted while pending"
    payload = fields.get(PAYLOAD_FIELD)
    if payload is not None and len(fields) == 1:
        return payload, None
    # Keep whatever was there so `rlq dlq list` can show it; msgpack of the raw field map.
    return msgspec.msgpack.encode(fields), f"entry fields {sorted(fields)} are not exactly [{PAYLOAD_FIELD!r}]"


# Trimming ----------------------------------------------------------------------------------------------------

# KEYS[1] stream; ARGV[1] group, ARGV[2] keep_acked (-1: do not trim), ARGV[3..] ids to XACK first (may be none).
