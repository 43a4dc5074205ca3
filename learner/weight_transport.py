"""The transport-independent half of the learner's weight sync: what one broadcast reports, the base every
transport implements, the bucket plan (flat tensors of one dtype, in parameter order) and the filesystem transport.

`learner/broadcast.py` holds the collective transport (gloo/NCCL group + the shared buffers of colocated workers)
and `make_broadcast`, which picks one from the config.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import redis
import torch

from broker.keys import Keys
from broker.policy import PolicyHash
from broker.schemas import BucketSpec, TensorSpec, WeightAnnouncement

NamedTensors = list[tuple[str, torch.Tensor]]


@dataclass
class BroadcastReport:
    """What one `broadcast` did; the learner logs these as `sync/*` metrics."""

    version: int
    epoch: int
    members: list[str]
    seconds: float = 0.0
    bytes: int = 0
    attempts: int = 1
    evicted: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {
            "sync/seconds": self.seconds,
            "sync/bytes": float(self.bytes),
            "sync/members": float(len(self.members)),
            "sync/attempts": float(self.attempts),
            "sync/evicted": float(len(self.evicted)),
        }


def named_tensors(source: torch.nn.Module | Iterable[tuple[str, torch.Tensor]]) -> NamedTensors:
    """(Hugging Face name, detached tensor) pairs; tied parameters appear once, under their first name."""
    items = source.named_parameters() if isinstance(source, torch.nn.Module) else source
    return [(name, t.detach()) for name, t in items]


def plan_buckets(tensors: NamedTensors, bucket_bytes: int) -> list[BucketSpec]:
    """Pack tensors, in order, into flat buckets of one dtype and at most `bucket_bytes` each.

    A tensor larger than `bucket_bytes` gets a bucket of its own; a dtype change starts a new bucket.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[BucketSpec] = []
    for name, t in tensors:
        dtype = str(t.dtype).removeprefix("torch.")
        nbytes = t.numel() * t.element_size()
        last = buckets[-1] if buckets else None
        if last is None or last.dtype != dtype or (last.numel * t.element_size() + nbytes > bucket_bytes):
            last = BucketSpec(dtype=dtype, numel=0, tensors=[])
            buckets.append(last)
        last.tensors.append(TensorSpec(name=name, shape=list(t.shape), offset=last.numel, numel=t.numel()))
        last.numel += t.numel()
    return buckets


def total_bytes(buckets: list[BucketSpec]) -> int:
    return sum(b.numel * torch.empty(0, dtype=getattr(torch, b.dtype)).element_size() for b in buckets)


class WeightBroadcast(ABC):
    """Moves the learner's weights to the generation workers and announces them in the policy hash."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r = r
        self.keys = keys
        self.policy = PolicyHash(r, keys)

    @abstractmethod
    def broadcast(
        self, source: torch.nn.Module | Iterable[tuple[str, torch.Tensor]], version: int
    ) -> BroadcastReport: ...

    def close(self) -> None:  # noqa: B027  (optional hook)
        pass

    def _announce(self, ann: WeightAnnouncement) -> None:
        self.policy.announce(ann)  # with shared buffers, the seqlock goes even in the same transaction


class FilesystemBroadcast(WeightBroadcast):
    """One safetensors file per version in a directory every worker can read; keeps the newest `keep` files."""

    def __init__(self, r: redis.Redis, keys: Keys, directory: Path, *, keep: int = 2) -> None:
        super().__init__(r, keys)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def broadcast(self, source: torch.nn.Module | Iterable[tuple[str, torch.Tensor]], version: int) -> BroadcastReport:
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        tensors = named_tensors(source)
        path = self.directory / f"v{version:08d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({n: t.to("cpu").contiguous() for n, t in tensors}, str(tmp))
        os.replace(tmp, path)  # a reader never sees a half-written file
        buckets = plan_buckets(tensors, 1 << 62)
        ann = WeightAnnouncement(
            version=version, epoch=0, backend="filesystem", master_addr="", master_port=0, world_size=1,
            members=[], buckets=buckets, checkpoint_path=str(path.resolve()),
        )  # fmt: skip
        self._announce(ann)
        for old in sorted(self.directory.glob("v*.safetensors"))[: -self.keep]:
            old.unlink(missing_ok=True)
        return BroadcastReport(version, 0, [], time.perf_counter() - t0, total_bytes(buckets))
