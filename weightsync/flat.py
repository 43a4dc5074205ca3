"""Parameters that live in the weight sync's flat buckets, so a broadcast sends and receives them without a copy.

The weight sync moves parameters as flat buckets (`broker.schemas.BucketSpec`: one dtype, tensors at offsets).
When a model's parameters are laid out as views of such buckets (`flatten_into_buckets`, once), the bucket is
the parameter storage itself (`bucket_view`): the sender broadcasts it as is and the receiver receives straight
into the model, with no pack, no unpack and no extra memory. Shared by learner/broadcast.py and
workers/generate/weights.py, which do not import each other.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from broker.schemas import BucketSpec

log = logging.getLogger(__name__)


def bucket_view(params: Mapping[str, torch.Tensor], spec: BucketSpec) -> torch.Tensor | None:
    """The flat [spec.numel] tensor whose slices *are* the bucket's parameters, or None if they are not laid out so.

    True only when every tensor of the bucket is a contiguous tensor of the announced dtype and shape, all in one
    storage at exactly the announced offsets.
    """
    if not spec.tensors:
        return None
    dtype = getattr(torch, spec.dtype, None)
    first = params.get(spec.tensors[0].name)
    if first is None or first.dtype != dtype:
        return None
    size = first.element_size()
    start = first.storage_offset() - spec.tensors[0].offset  # element index of the bucket's start in the storage
    storage = first.untyped_storage()
    if start < 0 or (start + spec.numel) * size > storage.nbytes():
        return None
    base = storage.data_ptr() + start * size
    for ts in spec.tensors:
        p = params.get(ts.name)
        if (
            p is None
            or p.dtype != dtype
            or p.device != first.device
            or not p.is_contiguous()
            or list(p.shape) != list(ts.shape)
            or p.data_ptr() != base + ts.offset * size
        ):
            return None
    return torch.empty(0, dtype=dtype, device=first.device).set_(storage, start, (spec.numel,), (1,))


def pack_bucket(
    by_name: Mapping[str, torch.Tensor], spec: BucketSpec, device: torch.device, out: torch.Tensor | None = None
) -> torch.Tensor:
    """One flat tensor [spec.numel] holding the bucket's parameters at their offsets (in `out` if given), each cast
    to the bucket's dtype by the copy."""
    flat = out if out is not None else torch.empty(spec.numel, dtype=getattr(torch, spec.dtype), device=device)
    for ts in spec.tensors:
        flat[ts.offset : ts.offset + ts.numel].copy_(by_name[ts.name].reshape(-1))
    return flat


def flatten_into_buckets(module: torch.nn.Module, buckets: list[BucketSpec]) -> int:
    """Move `module`'s parameters (by name) into one flat tensor per bucket; returns the bytes moved.

    Parameters keep their identity (an optimizer or a compiled graph built later still finds them); only their
    storage changes. Call before capturing CUDA graphs or building DDP. Parameters not named in `buckets` stay.
    """
    params = dict(module.named_parameters())
    moved = 0
    with torch.no_grad():
        for spec in buckets:
            if bucket_view(params, spec) is not None:
                continue
            names = [ts.name for ts in spec.tensors]
            missing = [n for n in names if n not in params]
            if missing:
                raise KeyError(f"bucket names parameters this model lacks: {missing[:3]}")
            device = params[names[0]].device
            flat = torch.empty(spec.numel, dtype=getattr(torch, spec.dtype), device=device)  # [numel]
            for ts in spec.tensors:
                p = params[ts.name]
                view = flat[ts.offset : ts.offset + ts.numel].view(ts.shape)
                view.copy_(p.data)
                p.data = view
                moved += ts.numel * flat.element_size()
    log.info("laid %d parameters out in %d flat buckets (%.1f MB moved)", len(params), len(buckets), moved / 1e6)
    return moved


def wait_in_order(works: list, deadline: float) -> None:
    """Wait for collectives issued back to back on one NCCL stream, polling the last one until `deadline`.

    `work.wait(timeout)` on NCCL sleeps between polls (10 ms in some torch builds), a visible share of an 8 GB
    transfer that takes ~22 ms; the untimed `wait()` only orders the current stream, so completion is polled here.

    Raises:
        RuntimeError: not complete by `deadline` (time.monotonic()).
    """
    import time

    if not works:
        return
    for work in works:
        work.wait()  # the current stream waits for NCCL's: later kernels see the received bytes
    last = works[-1]
    while not last.is_completed():
        if time.monotonic() > deadline:
            raise RuntimeError("weight broadcast did not complete before its deadline")
        time.sleep(2e-5)
