"""At-least-once delivery over a real redis-server: reclaim, dead letters, malformed input, trimming, dedup."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import threading
import time

import msgspec
import numpy as np
import pytest

from broker.connection import connect
from broker.keys import Keys
from broker.schemas import (
    SCHEMA_VERSION,
    Array,
    DeadLetter,
    Prompt,
    PromptBatch,
    WorkerHeartbeat,
    decode,
    encode,
)
from broker.streams import (
    PAYLOAD_FIELD,
    StreamConsumer,
    StreamProducer,
    publish_all_once,
    publish_once,
    send_dead_letter,
)
from broker.trim import safe_trim


@pytest.fixture
def r(redis_url: str):
    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def keys(run_name: str) -> Keys:
    return Keys(run_name)


def batch(i: int) -> PromptBatch:
    prompt = Prompt(prompt_id=f"p{i}", token_ids=Array.from_numpy(np.arange(5), "int32"), ground_truth=str(i))
    return PromptBatch(batch_id=f"b{i}", prompts=[prompt], n_samples=4)


def consumer(r, keys: Keys, name: str, **kwargs) -> StreamConsumer:
    c = StreamConsumer(r, keys.prompts, "gen", name, expected=PromptBatch, dead_stream=keys.dead, **kwargs)
    c.ensure_group()
    return c


def dead_letters(r, keys: Keys) -> list[DeadLetter]:
    return [decode(fields[PAYLOAD_FIELD], DeadLetter) for _, fields in r.xrange(keys.dead)]


def pending_ids(r, keys: Keys, group: str = "gen") -> list[str]:
    return [row["message_id"].decode() for row in r.xpending_range(keys.prompts, group, "-", "+", 1000)]


def test_ensure_group_is_idempotent(r, keys) -> None:
    c = consumer(r, keys, "a")
    c.ensure_group()
    assert [g["name"] for g in r.xinfo_groups(keys.prompts)] == [b"gen"]


def test_round_trip_and_ack(r, keys) -> None:
    producer = StreamProducer(r, keys.prompts)
    ids = producer.add_many([batch(i) for i in range(10)])
    c = consumer(r, keys, "a")
    got = c.read(count=100, block_ms=0)
    assert [d.entry_id for d in got] == ids
    assert [d.message.batch_id for d in got] == [f"b{i}" for i in range(10)]
    assert all(d.deliveries == 1 for d in got)
    assert c.ack([d.entry_id for d in got]) == 10
    assert pending_ids(r, keys) == []


def test_consumer_killed_after_read_is_reclaimed_and_processed_once(r, keys) -> None:
    StreamProducer(r, keys.prompts).add_many([batch(i) for i in range(5)])
    dying = consumer(r, keys, "dying", claim_idle_ms=50)
    taken = dying.read(count=3, block_ms=0)  # reads 3, then "dies" without acking
    assert len(taken) == 3
    del dying

    survivor = consumer(r, keys, "survivor", claim_idle_ms=50)
    processed: list[str] = []
    time.sleep(0.1)  # past claim_idle_ms: the dead consumer's entries become claimable
    for _ in range(5):
        deliveries = survivor.read(count=10, block_ms=10)
        processed += [d.message.batch_id for d in deliveries]
        survivor.ack([d.entry_id for d in deliveries])
    assert sorted(processed) == [f"b{i}" for i in range(5)], "every message exactly once"
    assert pending_ids(r, keys) == []
    reclaimed = {d.message.batch_id for d in taken}
    assert reclaimed <= set(processed)


def test_reclaimed_entries_carry_their_delivery_count(r, keys) -> None:
    StreamProducer(r, keys.prompts).add(batch(0))
    first = consumer(r, keys, "a", claim_idle_ms=10)
    assert first.read(block_ms=0)[0].deliveries == 1
    time.sleep(0.05)
    second = consumer(r, keys, "b", claim_idle_ms=10)
    (again,) = second.read(block_ms=0)
    assert again.deliveries == 2
    assert again.message.batch_id == "b0"


def test_poison_message_is_dead_lettered_after_max_deliveries(r, keys) -> None:
    original = encode(batch(0))
    (entry_id,) = StreamProducer(r, keys.prompts).add_encoded([original])
    c = consumer(r, keys, "a", claim_idle_ms=10, max_deliveries=3)
    tries = 0
    for _ in range(10):
        got = c.read(block_ms=0)
        tries += len(got)  # the handler "crashes" on every delivery: never acks
        c.release([d.entry_id for d in got])
    assert tries == 3
    (letter,) = dead_letters(r, keys)
    assert letter.entry_id == entry_id
    assert letter.deliveries == 4
    assert "max_deliveries=3" in letter.reason
    assert letter.payload == original, "original bytes kept"
    assert pending_ids(r, keys) == []


def test_handler_can_dead_letter_a_decoded_message(r, keys) -> None:
    StreamProducer(r, keys.prompts).add(batch(0))
    c = consumer(r, keys, "a")
    (delivery,) = c.read(block_ms=0)
    c.dead_letter(delivery, "prompt too long for the engine")
    (letter,) = dead_letters(r, keys)
    assert letter.reason == "prompt too long for the engine"
    assert pending_ids(r, keys) == []


MALFORMED = {
    "truncated": encode(batch(0))[:-3],
    "byte 0xc1": b"\xc1",
    "array header claiming 2^32 items": b"\xdd\xff\xff\xff\xff",
    "2000-deep nesting": b"\x91" * 2000 + b"\x00",
    "100 MB string": b"\xdb" + (100_000_000).to_bytes(4, "big") + bytes(100_000_000),
    "unknown ext type": msgspec.msgpack.encode(msgspec.msgpack.Ext(42, b"boom")),
    "pickled bytes": pickle.dumps(batch(0)),
    "wrong schema version": msgspec.msgpack.encode(
        {**msgspec.msgpack.decode(encode(batch(0))), "schema": SCHEMA_VERSION + 1}
    ),
    "wrong kind for this stream": encode(WorkerHeartbeat(worker_id="w", role="judge")),
}


def test_each_malformed_entry_is_dead_lettered_and_the_consumer_keeps_going(r, keys) -> None:
    producer = StreamProducer(r, keys.prompts)
    expected_good = []
    for i, payload in enumerate(MALFORMED.values()):
        producer.add_encoded([payload])
        producer.add(batch(i))
        expected_good.append(f"b{i}")
    r.xadd(keys.prompts, {b"other": b"field"})  # an entry someone wrote without the payload field
    c = consumer(r, keys, "a", count=4)
    good = []
    for _ in range(20):
        deliveries = c.read(block_ms=0)
        good += [d.message.batch_id for d in deliveries]
        c.ack([d.entry_id for d in deliveries])
    assert good == expected_good
    letters = dead_letters(r, keys)
    assert len(letters) == len(MALFORMED) + 1
    assert all(letter.reason and letter.source_stream == keys.prompts for letter in letters)
    by_reason = " | ".join(letter.reason for letter in letters)
    assert "oversize" in by_reason
    assert f"schema version {SCHEMA_VERSION + 1}" in by_reason
    assert "not exactly" in by_reason
    small = [letter for letter in letters if "oversize" not in letter.reason and "not exactly" not in letter.reason]
    assert [letter.payload for letter in small] == [p for name, p in MALFORMED.items() if name != "100 MB string"]
    big = next(letter for letter in letters if "oversize" in letter.reason)
    assert len(big.payload) <= 1024 * 1024 and "cut to" in big.reason
    assert pending_ids(r, keys) == []


def test_safe_trim_never_drops_pending_or_unread_entries(r, keys) -> None:
    producer = StreamProducer(r, keys.prompts)
    ids = producer.add_many([batch(i) for i in range(20)])
    fast = consumer(r, keys, "a")
    got = fast.read(count=10, block_ms=0)
    fast.ack([d.entry_id for d in got[:4] + got[6:]])  # entries 4 and 5 stay pending
    assert safe_trim(r, keys.prompts) == 4
    assert [i.decode() for i, _ in r.xrange(keys.prompts)] == ids[4:]
    assert set(pending_ids(r, keys)) == {ids[4], ids[5]}

    fast.ack([ids[4], ids[5]])
    assert safe_trim(r, keys.prompts, keep_acked=3) == 3  # 6 acked entries, keep the newest 3
    assert [i.decode() for i, _ in r.xrange(keys.prompts)] == ids[7:]

    # A second group that has read nothing pins every entry.
    r.xgroup_create(keys.prompts, "late", id="0")
    fast.ack([d.entry_id for d in fast.read(count=100, block_ms=0)])
    assert safe_trim(r, keys.prompts) == 0
    assert r.xlen(keys.prompts) == 13


def test_ack_of_many_ids_trims_in_one_script(r, keys) -> None:
    """More ids than one XACK inside the script takes (1000): all acknowledged, then trimmed to nothing."""
    StreamProducer(r, keys.prompts).add_encoded([b"x"] * 2500)
    c = consumer(r, keys, "a", trim_keep_acked=0)
    raw = r.xreadgroup("gen", "a", {keys.prompts: ">"}, count=2500)
    ids = [i.decode() for _, entries in raw for i, _ in entries]
    assert len(ids) == 2500
    assert c.ack(ids) == 2500
    assert r.xlen(keys.prompts) == 0 and pending_ids(r, keys) == []


def test_safe_trim_without_groups_keeps_everything(r, keys) -> None:
    StreamProducer(r, keys.prompts).add_many([batch(i) for i in range(3)])
    assert safe_trim(r, keys.prompts) == 0
    assert r.xlen(keys.prompts) == 3


def test_publish_once_dedups(r, keys) -> None:
    assert publish_once(r, keys.scored, "g1", batch(1)) is True
    assert publish_once(r, keys.scored, "g1", batch(1)) is False
    assert publish_once(r, keys.scored, "g2", batch(2)) is True
    assert r.xlen(keys.scored) == 2
    assert r.sismember(keys.done(keys.scored), "g1")
    assert 0 < r.ttl(keys.done(keys.scored)) <= 7 * 24 * 3600


def test_publish_all_once_wakes_a_blocked_reader_to_every_message_at_once(r, keys, redis_url) -> None:
    reader = consumer(connect(redis_url), keys, "worker")
    got: list = []
    thread = threading.Thread(target=lambda: got.extend(reader.read(count=16, block_ms=5000)))
    thread.start()
    deadline = time.monotonic() + 5
    while r.info("clients")["blocked_clients"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)  # until the reader is parked in XREADGROUP BLOCK
    added = publish_all_once(r, keys.prompts, [(f"k{i}", batch(i)) for i in range(4)])
    thread.join(10)
    assert added == [True] * 4
    assert [d.message.batch_id for d in got] == ["b0", "b1", "b2", "b3"]  # one read, not the first entry alone
    assert publish_all_once(r, keys.prompts, [("k1", batch(1)), ("k9", batch(9))]) == [False, True]
    assert r.xlen(keys.prompts) == 5


def test_send_dead_letter_returns_an_id_in_the_dead_stream(r, keys) -> None:
    dead_id = send_dead_letter(
        r, keys.dead, source_stream=keys.scored, entry_id="1-1", reason="judge timeout", deliveries=2, payload=b"x"
    )
    ((entry_id, fields),) = r.xrange(keys.dead)
    assert entry_id.decode() == dead_id
    letter = decode(fields[PAYLOAD_FIELD], DeadLetter)
    assert (letter.source_stream, letter.reason, letter.deliveries, letter.payload) == (
        keys.scored,
        "judge timeout",
        2,
        b"x",
    )


def test_entry_deleted_while_pending_is_acknowledged_on_reclaim(r, keys) -> None:
    ids = StreamProducer(r, keys.prompts).add_many([batch(i) for i in range(3)])
    dying = consumer(r, keys, "dying", claim_idle_ms=10)
    assert len(dying.read(block_ms=0)) == 3
    r.xdel(keys.prompts, ids[1])  # someone deleted it by hand (safe_trim never does)
    time.sleep(0.05)
    survivor = consumer(r, keys, "survivor", claim_idle_ms=10)
    got = []
    for _ in range(3):
        deliveries = survivor.read(block_ms=0)
        got += [d.message.batch_id for d in deliveries]
        survivor.ack([d.entry_id for d in deliveries])
    assert got == ["b0", "b2"]
    assert pending_ids(r, keys) == [], "the deleted entry does not stay pending forever"
    assert r.xlen(keys.dead) == 0


KILLED_READER = """
import os, signal, sys
from broker.connection import connect
from broker.schemas import PromptBatch
from broker.streams import StreamConsumer
url, stream, dead = sys.argv[1:4]
c = StreamConsumer(connect(url), stream, "gen", "doomed", expected=PromptBatch, dead_stream=dead)
got = c.read(count=3, block_ms=0)
print(" ".join(d.message.batch_id for d in got), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # dies holding 3 unacknowledged entries
"""


def test_a_process_killed_after_reading_loses_nothing(r, keys, redis_url) -> None:
    StreamProducer(r, keys.prompts).add_many([batch(i) for i in range(5)])
    consumer(r, keys, "survivor")  # creates the group
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_READER, redis_url, keys.prompts, keys.dead],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout.split() == ["b0", "b1", "b2"]
    assert {row["consumer"] for row in r.xpending_range(keys.prompts, "gen", "-", "+", 10)} == {b"doomed"}
    time.sleep(0.05)
    survivor = consumer(r, keys, "survivor", claim_idle_ms=20)
    processed = []
    for _ in range(4):
        deliveries = survivor.read(count=10, block_ms=0)
        processed += [d.message.batch_id for d in deliveries]
        survivor.ack([d.entry_id for d in deliveries])
    assert sorted(processed) == [f"b{i}" for i in range(5)]
    assert pending_ids(r, keys) == []


def test_consumer_trims_acknowledged_entries_when_asked(r, keys) -> None:
    ids = StreamProducer(r, keys.prompts).add_many([batch(i) for i in range(30)])
    c = consumer(r, keys, "a", trim_keep_acked=5)
    got = c.read(count=20, block_ms=0)
    c.ack([d.entry_id for d in got[:10]])  # 10 acked, 10 pending, 10 unread
    remaining = [i.decode() for i, _ in r.xrange(keys.prompts)]
    assert remaining == ids[5:], "the 5 oldest acked entries went; pending and unread ones stayed"
    assert len(pending_ids(r, keys)) == 10
    untrimmed = consumer(r, keys, "b")
    untrimmed.ack([d.entry_id for d in got[10:]])
    assert r.xlen(keys.prompts) == len(remaining), "without trim_keep_acked nothing is trimmed"
