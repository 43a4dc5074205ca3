"""Process groups for the weight broadcast, built on their own store outside torch.distributed's global state.

The learner's torchrun group and the weight group (learner rank 0 + generation workers) are separate jobs:
`init_process_group`/`new_group` cannot span them, so both sides construct the backend's group directly.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist


def new_group(backend: str, store: dist.Store, rank: int, world_size: int, timeout_s: float) -> Any:
    """A gloo or NCCL group of `world_size` on `store`, every collective bounded by `timeout_s`."""
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    raise ValueError(f"weight-group backend must be gloo or nccl, got {backend!r}")
