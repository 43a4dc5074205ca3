"""Weight buckets shared between the learner and generation workers on its own device, without a collective.

A generation worker colocated with the learner on one GPU cannot join the learner in an NCCL group (NCCL puts one
rank on a GPU), and none is needed: the learner keeps one flat buffer per bucket of the broadcast plan, rewrites
them at every sync, and the worker reads them in place through CUDA IPC (or, on CPU, a file in /dev/shm both map).
Both halves of that contract live here: `SharedBuffers` (learner) and `open_buckets` (worker).

Consistency is a seqlock in the policy hash (`broker.keys.POLICY_SHARED_SEQ`): the learner makes the sequence
odd before it writes and even again, in the announcement too, once the bytes are there. A worker loads, then
checks that the sequence still equals its announcement's; if not, the learner rewrote the buffers while it read
them and it loads the newer announcement again. The learner never waits for a worker.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch

from broker.schemas import BucketSpec, SharedBucket, SharedWeights
from weightsync.flat import pack_bucket

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def device_id(device: torch.device | str) -> str:
    """ "cpu", or the UUID of a CUDA device (the same GPU has the same UUID in every process's numbering)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return str(torch.cuda.get_device_properties(index).uuid)


def node_name() -> str:
    return socket.gethostname()


def local_cuda_index(uuid: str) -> int | None:
    """This process's index of the GPU with `uuid`, or None if it cannot see it."""
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == uuid:
            return index
    return None


class SharedBuffers:
    """The learner's shared copy of the weights: one flat buffer per bucket, rewritten in place at every sync."""

    def __init__(self, device: torch.device, tag: str) -> None:
        self.device = torch.device(device)
        self.tag = tag  # names the /dev/shm files: run name and pid
        self.layout: list[tuple[str, int]] = []  # (dtype, numel) per bucket the buffers were made for
        self.buffers: list[torch.Tensor] = []
        self.exported: list[SharedBucket] = []
        self.paths: list[Path] = []
        self.seq = 0

    def ensure(self, buckets: list[BucketSpec]) -> None:
        """Buffers for this bucket plan (made again only when the plan changes)."""
        layout = [(b.dtype, b.numel) for b in buckets]
        if layout == self.layout:
            return
        self.close()
        for index, (dtype_name, numel) in enumerate(layout):
            dtype = getattr(torch, dtype_name)
            if self.device.type == "cuda":
                flat = torch.empty(numel, dtype=dtype, device=self.device)
                self.exported.append(_export_cuda(flat))
            else:
                path = SHM_DIR / f"rlq-weights-{self.tag}-{index}"
                path.unlink(missing_ok=True)
                flat = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
                self.paths.append(path)
                self.exported.append(SharedBucket(path=str(path), size_bytes=numel * flat.element_size()))
            self.buffers.append(flat)
        self.layout = layout

    def write(self, by_name: dict[str, torch.Tensor], buckets: list[BucketSpec]) -> None:
        """Copy every parameter into its bucket's buffer (casting to the bucket's dtype) and wait for the copies."""
        self.ensure(buckets)
        for spec, flat in zip(buckets, self.buffers, strict=True):
            pack_bucket(by_name, spec, self.device, out=flat)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> SharedWeights:
        return SharedWeights(node=node_name(), device=device_id(self.device), seq=self.seq, buckets=self.exported)

    def close(self) -> None:
        for path in self.paths:
            path.unlink(missing_ok=True)
        self.buffers, self.exported, self.paths, self.layout = [], [], [], []


def _export_cuda(flat: torch.Tensor) -> SharedBucket:
    (_, handle, size, offset, counter, counter_offset, event, event_sync) = flat.untyped_storage()._share_cuda_()
    if flat.storage_offset() != 0:
        raise RuntimeError("a shared bucket must start its storage")
    return SharedBucket(handle=bytes(handle), size_bytes=int(size), offset_bytes=int(offset),
                        ref_counter_handle=bytes(counter), ref_counter_offset=int(counter_offset),
                        event_handle=bytes(event) if event else b"", event_sync_required=bool(event_sync))  # fmt: skip


def open_buckets(shared: SharedWeights, buckets: list[BucketSpec]) -> list[torch.Tensor]:
    """The learner's buffers as flat tensors of this process, one per bucket (no copy).

    Raises:
        RuntimeError: this process is not where the buffers can be opened (another host or GPU), or a buffer
            does not match its bucket.
    """
    if shared.node != node_name():
        raise RuntimeError(f"shared weights live on {shared.node}, this worker runs on {node_name()}")
    if len(shared.buckets) != len(buckets):
        raise RuntimeError(f"{len(shared.buckets)} shared buffers for {len(buckets)} buckets")
    index = None
    if shared.device != "cpu":
        index = local_cuda_index(shared.device)
        if index is None:
            raise RuntimeError(f"shared weights live on GPU {shared.device}, which this worker cannot see")
    out = []
    for spec, handle in zip(buckets, shared.buckets, strict=True):
        dtype = getattr(torch, spec.dtype)
        nbytes = spec.numel * torch.empty(0, dtype=dtype).element_size()
        if handle.size_bytes < nbytes:
            raise RuntimeError(f"shared buffer of {handle.size_bytes} bytes for a bucket of {nbytes}")
        if index is None:
            if os.path.getsize(handle.path) < nbytes:
                raise RuntimeError(f"{handle.path} is smaller than its bucket")
            flat = torch.from_file(handle.path, shared=True, size=spec.numel, dtype=dtype)
        else:
            storage = torch.UntypedStorage._new_shared_cuda(
                index, handle.handle, handle.size_bytes, handle.offset_bytes, handle.ref_counter_handle,
                handle.ref_counter_offset, handle.event_handle or None, handle.event_sync_required,
            )  # fmt: skip
            flat = torch.empty(0, dtype=dtype, device=torch.device("cuda", index)).set_(storage, 0, (spec.numel,))
        out.append(flat)
    return out
