"""CUDA IPC half of the shared weight buffers (weightsync/shared.py): another process on the same GPU opens the
learner's buckets through the exported handles and sees every write. Needs a CUDA device (the lent GPU machine);
the CPU half and the whole protocol run in tests/integration/test_shared_weights.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from broker.schemas import SharedWeights, encode
from learner.weight_transport import plan_buckets
from weightsync.shared import SharedBuffers, device_id

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
REPO = Path(__file__).resolve().parents[2]

READER = textwrap.dedent(
    """
    import sys, msgspec, torch
    from broker.schemas import BucketSpec, SharedWeights
    from weightsync.shared import open_buckets
    shared = msgspec.msgpack.decode(open(sys.argv[1], "rb").read(), type=SharedWeights)
    buckets = msgspec.msgpack.decode(open(sys.argv[2], "rb").read(), type=list[BucketSpec])
    flats = open_buckets(shared, buckets)
    print(";".join(f"{float(f.float().sum()):.1f}" for f in flats))
    """
)


def test_another_process_on_the_gpu_reads_the_buckets_in_place(tmp_path):
    device = torch.device("cuda", 0)
    params = [(f"w{i}", torch.full((1000 + i,), float(i + 1), dtype=torch.bfloat16, device=device)) for i in range(5)]
    buckets = plan_buckets(params, bucket_bytes=4096)
    shared = SharedBuffers(device, "test")
    shared.write(dict(params), buckets)
    description = shared.describe()
    assert description.device == device_id(device) and description.device != "cpu"
    (tmp_path / "shared").write_bytes(_encode(description))
    (tmp_path / "buckets").write_bytes(_encode(buckets))
    expected = [sum(float(dict(params)[t.name].float().sum()) for t in spec.tensors) for spec in buckets]
    out = subprocess.run([sys.executable, "-c", READER, str(tmp_path / "shared"), str(tmp_path / "buckets")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert [float(x) for x in out.stdout.strip().split(";")] == pytest.approx(expected)
    shared.close()


def _encode(value) -> bytes:
    import msgspec

    return msgspec.msgpack.encode(value)


def test_the_announcement_carries_the_handles_through_msgpack():
    from broker.schemas import WeightAnnouncement, decode

    shared = SharedBuffers(torch.device("cuda", 0), "test")
    params = [("w", torch.ones(10, dtype=torch.bfloat16, device="cuda"))]
    buckets = plan_buckets(params, 1 << 20)
    shared.write(dict(params), buckets)
    described = shared.describe()
    ann = WeightAnnouncement(version=1, epoch=0, backend="nccl", master_addr="", master_port=0, world_size=1,
                             members=[], buckets=buckets, shared=described, shared_members=["w0"])  # fmt: skip
    back = decode(encode(ann), WeightAnnouncement)
    assert isinstance(back, WeightAnnouncement) and isinstance(back.shared, SharedWeights)
    assert back.shared.buckets[0].handle == described.buckets[0].handle != b""
    shared.close()
