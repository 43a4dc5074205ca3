"""Which GPUs each role of a one-machine run gets (`cluster.learner_gpus`, `cluster.generation_gpus`).

`plan_gpus` is pure: the same config and GPU count give the same placement on every machine, so `rlq train`,
`rlq doctor` and the tests agree. Each role then sees only its GPUs (CUDA_VISIBLE_DEVICES), so learner rank i
is cuda:i of its own numbering and a vLLM engine takes cuda:0 of its list.

auto: the learner takes the first `learner_procs_per_node` GPUs (one per rank: NCCL cannot put two ranks of a
group on one GPU); each generation worker takes `tensor_parallel_size` of the GPUs left. When fewer are left
than the workers need, workers share GPUs: first the free ones, then the learner's, round-robin. A worker on a
learner GPU is *colocated*: it takes `vllm_cfg.colocated_gpu_memory_utilization` of the memory, starts before
the learner (vLLM sizes its KV cache from the memory free when it starts) and gets its weights through shared
memory instead of NCCL (docs/gpu.md).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from rlq.config import RunConfig, parse_cpu_list
from rlq.errors import UserError

MAX_SHARED_MEMORY = 0.9
"""The workers on one GPU may ask for at most this share of it together (the rest: the learner, CUDA contexts)."""


@dataclass(frozen=True)
class Placement:
    """GPU ids (of this machine's visible GPUs) per role; empty lists on a machine without GPUs."""

    learner: list[int]
    generation: list[list[int]]  # one list per worker, in worker order

    def shared(self, worker: int) -> bool:
        """True when generation worker `worker` shares a GPU with a learner rank or another worker."""
        mine = set(self.generation[worker])
        others = [set(g) for i, g in enumerate(self.generation) if i != worker]
        return bool(mine & set(self.learner)) or any(mine & o for o in others)

    def colocated(self, worker: int) -> bool:
        """True when generation worker `worker` shares a GPU with a learner rank."""
        return bool(set(self.generation[worker]) & set(self.learner))

    def describe(self) -> str:
        if not self.learner and not any(self.generation):
            return "no GPUs: every role on the CPU"
        workers = ", ".join(
            f"generate-{i} {_ids(g)}{' (colocated)' if self.colocated(i) else ''}"
            for i, g in enumerate(self.generation)
        )
        return f"learner {_ids(self.learner)}; {workers}"


def _ids(ids: list[int]) -> str:
    return "GPU " + ",".join(map(str, ids)) if ids else "inherited GPUs"


def plan_gpus(cfg: RunConfig, visible: int) -> Placement | None:
    """The placement of `cfg`'s roles on `visible` GPUs; None when both lists are null (environment untouched).

    Raises:
        UserError: a list names a GPU that is not there, has the wrong length, or the counts cannot fit.
    """
    cluster = cfg.cluster
    tp = cfg.policy.generation.vllm_cfg.tensor_parallel_size
    if cluster.learner_gpus is None and cluster.generation_gpus is None:
        return None
    if visible == 0:
        explicit = [n for n in ("learner_gpus", "generation_gpus") if getattr(cluster, n) not in (None, "auto")]
        if explicit:
            raise UserError(f"cluster.{explicit[0]} names GPUs but this machine has none visible; set it to auto")
        return Placement([], [[] for _ in range(cluster.generation_workers)])
    learner = _learner_gpus(cluster.learner_gpus, cluster.learner_procs_per_node, visible)
    if cluster.generation_gpus is None:
        generation = [[] for _ in range(cluster.generation_workers)]
    elif cluster.generation_gpus == "auto":
        generation = _auto_generation(learner, cluster.generation_workers, tp, visible)
    else:
        lists = cluster.generation_gpus.split("|")
        lists = lists * cluster.generation_workers if len(lists) == 1 else lists
        generation = [_checked(text, "cluster.generation_gpus", visible) for text in lists]
        for ids in generation:
            if len(ids) != tp:
                raise UserError(
                    f"cluster.generation_gpus gives a worker {len(ids)} GPUs ({','.join(map(str, ids))}) but "
                    f"policy.generation.vllm_cfg.tensor_parallel_size is {tp}: one GPU per tensor-parallel rank"
                )
    placement = Placement(learner, generation)
    _check_memory(cfg, placement)
    return placement


def _learner_gpus(text: str | None, ranks: int, visible: int) -> list[int]:
    if text is None:
        return []
    if text == "auto":
        if ranks > visible:
            raise UserError(
                f"cluster.learner_procs_per_node={ranks} needs {ranks} GPUs (one per rank) but {visible} are "
                f"visible; set cluster.learner_procs_per_node={visible}"
            )
        return list(range(ranks))
    ids = _checked(text, "cluster.learner_gpus", visible)
    if len(ids) != ranks:
        raise UserError(
            f"cluster.learner_gpus={text!r} names {len(ids)} GPUs for cluster.learner_procs_per_node={ranks}: "
            f"one GPU per rank"
        )
    return ids


def _auto_generation(learner: list[int], workers: int, tp: int, visible: int) -> list[list[int]]:
    free = [g for g in range(visible) if g not in learner]
    if len(free) >= workers * tp:
        return [free[i * tp : (i + 1) * tp] for i in range(workers)]
    if tp > visible:
        raise UserError(f"policy.generation.vllm_cfg.tensor_parallel_size={tp} needs {tp} GPUs, {visible} visible")
    order = free + learner  # free GPUs first, then share the learner's
    return [sorted({order[(i * tp + k) % len(order)] for k in range(tp)}) for i in range(workers)]


def _checked(text: str, name: str, visible: int) -> list[int]:
    try:
        ids = parse_cpu_list(text, name, "GPU")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    missing = [g for g in ids if g >= visible]
    if missing:
        raise UserError(
            f"{name}={text!r} names GPU {missing[0]}, but this machine has {visible} visible (0-{visible - 1})"
        )
    return ids


def _check_memory(cfg: RunConfig, placement: Placement) -> None:
    vc = cfg.policy.generation.vllm_cfg
    per_gpu: dict[int, float] = {}
    for index, ids in enumerate(placement.generation):
        share = vc.colocated_gpu_memory_utilization if placement.shared(index) else vc.gpu_memory_utilization
        for gpu in ids:
            per_gpu[gpu] = per_gpu.get(gpu, 0.0) + share
    crowded = {g: s for g, s in per_gpu.items() if s > MAX_SHARED_MEMORY + 1e-9}
    if crowded and cfg.policy.generation.backend == "vllm":
        gpu, share = next(iter(sorted(crowded.items())))
        raise UserError(
            f"the generation workers on GPU {gpu} would take {share:.2f} of its memory together; lower "
            f"policy.generation.vllm_cfg.colocated_gpu_memory_utilization, or run fewer workers per GPU"
        )


def visible_gpu_count() -> int:
    """GPUs this process may use (CUDA_VISIBLE_DEVICES applied), without creating a CUDA context here."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return len([item for item in listed.split(",") if item.strip() and not item.strip().startswith("-")])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def cuda_visible(ids: list[int]) -> str:
    """CUDA_VISIBLE_DEVICES for `ids` of this process's numbering (maps through an inherited list)."""
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [item.strip() for item in inherited.split(",")] if inherited is not None else None
    return ",".join(names[g] if names is not None else str(g) for g in ids)
