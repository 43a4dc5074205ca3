"""The bucket layout both sides of the weight sync agree on: plan on the learner, pack, unpack on the worker."""

from __future__ import annotations

import pytest
import torch

from broker.errors import WeightSyncError
from broker.schemas import BucketSpec, TensorSpec, WeightAnnouncement, decode, encode
from learner.weight_transport import plan_buckets, total_bytes
from weightsync.flat import pack_bucket
from workers.generate.weights import unpack_bucket


def _params() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("embed.weight", torch.randn(10, 4, generator=g)),  # 40 floats = 160 B
        ("layer.weight", torch.randn(4, 4, generator=g)),  # 64 B
        ("layer.bias", torch.randn(4, generator=g)),  # 16 B
        ("half.weight", torch.randn(3, 2, generator=g).to(torch.bfloat16)),  # new dtype, new bucket
        ("norm.weight", torch.randn(4, generator=g)),
    ]


def test_buckets_respect_size_and_dtype() -> None:
    buckets = plan_buckets(_params(), bucket_bytes=100)
    # embed alone exceeds 100 B and gets its own bucket; layer.weight + bias fit 80 B; bf16 splits; norm after it.
    assert [[t.name for t in b.tensors] for b in buckets] == [
        ["embed.weight"],
        ["layer.weight", "layer.bias"],
        ["half.weight"],
        ["norm.weight"],
    ]
    assert [b.dtype for b in buckets] == ["float32", "float32", "bfloat16", "float32"]
    assert buckets[1].tensors[1].offset == 16 and buckets[1].numel == 20
    assert total_bytes(buckets) == 160 + 80 + 12 + 16


def test_pack_unpack_round_trip_through_the_wire_format() -> None:
    params = _params()
    by_name = dict(params)
    buckets = plan_buckets(params, bucket_bytes=1 << 20)
    ann = WeightAnnouncement(
        version=3, epoch=1, backend="gloo", master_addr="h", master_port=1, world_size=2, members=["w"],
        buckets=buckets,
    )  # fmt: skip
    wire = decode(encode(ann), WeightAnnouncement)
    assert isinstance(wire, WeightAnnouncement)
    received = {}
    for spec in wire.buckets:
        flat = pack_bucket(by_name, spec, torch.device("cpu"))
        received.update(unpack_bucket(flat.clone(), spec))
    assert received.keys() == by_name.keys()
    for name, value in by_name.items():
        assert received[name].dtype == value.dtype and torch.equal(received[name], value)


def test_unpack_rejects_a_layout_that_does_not_fit() -> None:
    spec = BucketSpec(dtype="float32", numel=4, tensors=[TensorSpec(name="x", shape=[2, 3], offset=0, numel=6)])
    with pytest.raises(WeightSyncError, match="does not fit"):
        unpack_bucket(torch.zeros(4), spec)
    with pytest.raises(WeightSyncError, match="holds 5 elements"):
        unpack_bucket(torch.zeros(5), spec)


def test_tied_parameters_travel_once() -> None:
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(8, 4)
    model.head = torch.nn.Linear(4, 8, bias=False)
    model.head.weight = model.embed.weight
    names = [t.name for b in plan_buckets(list(model.named_parameters()), 1 << 20) for t in b.tensors]
    assert names == ["embed.weight"]
