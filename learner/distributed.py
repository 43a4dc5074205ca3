"""Distributed setup of the learner, and the small collectives its step uses.

`init_distributed` joins torchrun's process group (or runs as one process), `DistInfo` says which rank this is and
on which device; `broadcast_plan`, `scatter_shares` and `replica_spread` are the in-cluster collectives of the step
(learner/train.py). Nothing here knows about Redis or the trainer: both learner/coordinator.py and learner/train.py
can import it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def die_with_parent() -> None:
    """Under torchrun, die when the launcher dies (Linux): torchrun puts each rank in a session of its own, so a
    killed launcher would otherwise leave ranks training next to the learner that replaces it."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the call above
        os._exit(1)


def init_distributed(backend: str) -> DistInfo:
    """Join torchrun's process group (or run as a single process when not under torchrun)."""
    die_with_parent()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        # The CPUs this process may use (a pinned learner gets fewer than the machine has), shared by local ranks.
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cpus // max(local_world, 1)))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    if rank == 0:
        log.info("learner rank 0 of %d, %s on %s", world, "nccl" if cuda else "gloo", device)
    return DistInfo(rank, world, local_rank, device)


def broadcast_plan(plan: tuple[bool, bool], info: DistInfo) -> tuple[bool, bool]:
    """Rank 0's (sync, checkpoint) decision to every rank: under FSDP2 all of them take part in gathering."""
    if info.world_size == 1:
        return plan
    box = [plan]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def scatter_shares(payloads: list[dict] | None, info: DistInfo) -> dict:
    if info.world_size == 1:
        assert payloads is not None
        return payloads[0]
    out: list = [None]
    dist.scatter_object_list(out, payloads if info.is_main else None, src=0)
    return out[0]


def replica_spread(model: torch.nn.Module, world_size: int) -> float:
    """Largest difference between the ranks' parameter checksums (0.0: every replica holds the same weights)."""
    with torch.no_grad():
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    if world_size == 1:
        return 0.0
    gathered = [torch.zeros_like(checksum) for _ in range(world_size)]
    dist.all_gather(gathered, checksum)
    values = torch.stack(gathered)
    return float(values.max() - values.min())
