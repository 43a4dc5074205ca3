"""Redis streams with at-least-once delivery: producers, consumer groups, reclaim, dead letters, safe trimming.

Every entry carries exactly one field, `PAYLOAD_FIELD`, holding one encoded `broker.schemas` message. A
consumer reads through a consumer group, hands the message on, then XACKs it; an entry left pending by a dead
consumer is taken over with XAUTOCLAIM once it has been idle for `claim_idle_ms`. An entry that cannot be
decoded, or that has been delivered more than `max_deliveries` times, is copied to the dead-letter stream with
the reason and then acknowledged, so one bad message never stops a consumer and is never lost silently.
"""

from __future__ import annotations

import logging

import redis

from broker.schemas import DeadLetter, Message, encode

log = logging.getLogger(__name__)

PAYLOAD_FIELD = b"m"
"""The one field of every stream entry: the encoded message."""

DONE_TTL_S = 7 * 24 * 3600
"""How long the idempotency set of a stream outlives its last publish."""

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

    Returns:
        True if the entry was added, False if the key was already in the stream's done set.
    """
    script = r.register_script(_PUBLISH_ONCE_LUA)
    entry_id = script(keys=[stream, done_key(stream)], args=[idempotency_key, encode(message), int(done_ttl_s)])
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
) -> str:
    """Copy one failed entry (its original bytes untouched) to `dead_stream` with the reason; returns its id."""
    letter = DeadLetter(
        source_stream=source_stream,
        entry_id=entry_id,
        reason=reason,
        deliveries=deliveries,
        payload=bytes(payload),
        consumer=consumer,
    )
    dead_id = r.xadd(dead_stream, {PAYLOAD_FIELD: encode(letter)})
    log.warning("dead-lettered %s %s after %d deliveries: %s", source_stream, entry_id, deliveries, reason)
    return _text(dead_id)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
