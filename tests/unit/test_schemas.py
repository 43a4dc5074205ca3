"""Every wire message round-trips through msgpack, and every kind of malformed payload raises MessageError."""

from __future__ import annotations

import pickle

import msgspec
import numpy as np
import pytest

from broker.schemas import (
    MAX_MESSAGE_BYTES,
    Array,
    BucketSpec,
    DeadLetter,
    MessageError,
    Prompt,
    PromptBatch,
    RolloutGroup,
    Sample,
    ScoredGroup,
    TensorSpec,
    WeightAnnouncement,
    WorkerHeartbeat,
    decode,
    encode,
    kind_of,
)


def make_prompt(i: int = 0) -> Prompt:
    return Prompt(
        prompt_id=f"arith-{i}",
        token_ids=Array.from_numpy(np.arange(12), "int32"),
        ground_truth="42",
        text="What is 6*7?",
    )


def make_rollout(n_samples: int = 4, length: int = 16, version: int = 3) -> RolloutGroup:
    rng = np.random.default_rng(0)
    samples = [
        Sample(
            token_ids=Array.from_numpy(rng.integers(0, 150_000, length), "int32"),
            logprobs=Array.from_numpy(-rng.random(length), "float32"),
            finish_reason="stop" if s % 2 else "length",
            text=f"sample {s}",
        )
        for s in range(n_samples)
    ]
    return RolloutGroup(
        group_id="arith-0@b1",
        batch_id="b1",
        prompt=make_prompt(),
        samples=samples,
        policy_version=version,
        worker_id="gen-0",
        timings={"generate_s": 1.5},
    )


def make_scored() -> ScoredGroup:
    rollout = make_rollout()
    return ScoredGroup(
        rollout=rollout,
        rewards=Array.from_numpy([1.0, 0.0, 0.0, 1.0], "float32"),
        verdicts=["correct", "incorrect", "no_answer", "correct"],
        judge_id="judge-0",
    )


def all_messages() -> list:
    return [
        PromptBatch(batch_id="b1", prompts=[make_prompt(0), make_prompt(1)], n_samples=8, min_policy_version=2),
        make_rollout(),
        make_scored(),
        WeightAnnouncement(
            version=4,
            epoch=1,
            backend="gloo",
            master_addr="127.0.0.1",
            master_port=29500,
            world_size=2,
            members=["gen-0"],
            buckets=[BucketSpec(dtype="float32", numel=12, tensors=[TensorSpec("w", [3, 4], 0, 12)])],
        ),
        WorkerHeartbeat(worker_id="gen-0", role="generate", accelerator="cpu", capacity=4, policy_version=3),
        DeadLetter(source_stream="rlq:x:prompts", entry_id="1-0", reason="bad", deliveries=5, payload=b"\xc1"),
    ]


@pytest.mark.parametrize("message", all_messages(), ids=lambda m: kind_of(m))
def test_every_message_round_trips(message) -> None:
    payload = encode(message)
    back = decode(payload)
    assert back == message
    assert type(back) is type(message)
    assert decode(payload, type(message)) == message


def test_all_six_kinds_are_covered() -> None:
    assert {kind_of(m) for m in all_messages()} == {
        "prompt_batch",
        "rollout_group",
        "scored_group",
        "weight_announcement",
        "worker_heartbeat",
        "dead_letter",
    }


def test_arrays_travel_packed_and_come_back_as_numpy() -> None:
    group = decode(encode(make_rollout(length=1024)))
    sample = group.samples[0]
    assert sample.token_ids.to_numpy().dtype == np.dtype("<i4")
    assert sample.logprobs.to_numpy().shape == (1024,)
    raw = msgspec.msgpack.decode(encode(make_rollout(length=1024)))
    assert isinstance(raw["samples"][0]["logprobs"][2], bytes), "arrays are packed bytes, not lists of floats"


def test_expected_kind_is_enforced() -> None:
    with pytest.raises(MessageError):
        decode(encode(make_rollout()), ScoredGroup)


MALFORMED = {
    "empty": b"",
    "truncated": encode(make_rollout())[:-7],
    "byte 0xc1": b"\xc1",
    "array header claiming 2^32 items": b"\xdd\xff\xff\xff\xff",
    "map header claiming 2^32 items": b"\xdf\xff\xff\xff\xff",
    "2000-deep nesting": b"\x91" * 2000 + b"\x00",
    "unknown ext type": msgspec.msgpack.encode(msgspec.msgpack.Ext(42, b"boom")),
    "pickled bytes": pickle.dumps({"kind": "rollout_group"}),
    "plain int": msgspec.msgpack.encode(7),
    "unknown kind": msgspec.msgpack.encode({"kind": "nope"}),
    "unknown field": msgspec.msgpack.encode({**msgspec.to_builtins(WorkerHeartbeat(worker_id="w", role="x")), "x": 1}),
    "wrong schema version": msgspec.msgpack.encode(
        {**msgspec.to_builtins(WorkerHeartbeat(worker_id="w", role="x")), "schema": 99}
    ),
    "wrong field type": msgspec.msgpack.encode(
        {**msgspec.to_builtins(WorkerHeartbeat(worker_id="w", role="x")), "capacity": "four"}
    ),
}


@pytest.mark.parametrize("payload", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_payloads_raise_one_error_type(payload: bytes) -> None:
    with pytest.raises(MessageError) as info:
        decode(payload)
    assert str(info.value), "the error carries a reason"


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_a_rollout_with_no_usable_temperature_is_rejected(temperature: float) -> None:
    """The learner divides logits by it: a zero, negative or NaN temperature must not reach the loss."""
    bad = msgspec.msgpack.decode(encode(make_rollout()))
    bad["temperature"] = temperature
    with pytest.raises(MessageError, match="temperature"):
        decode(msgspec.msgpack.encode(bad))


def test_inconsistent_array_is_rejected() -> None:
    bad = msgspec.msgpack.decode(encode(make_rollout()))  # plain maps, arrays still packed bytes
    bad["samples"][0]["token_ids"][1] = [999]  # shape no longer matches the packed bytes
    with pytest.raises(MessageError, match="needs 3996 bytes"):
        decode(msgspec.msgpack.encode(bad))


def test_oversize_is_rejected_before_parsing() -> None:
    # A valid msgpack str header followed by MAX+1 bytes: the size check must fire without parsing it.
    payload = b"\xdb" + (MAX_MESSAGE_BYTES + 1).to_bytes(4, "big") + bytes(MAX_MESSAGE_BYTES + 1)
    with pytest.raises(MessageError, match="oversize"):
        decode(payload)


def test_non_bytes_payload_is_rejected() -> None:
    with pytest.raises(MessageError):
        decode("not bytes")  # type: ignore[arg-type]
