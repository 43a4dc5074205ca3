"""Which engine a generation worker samples with (`policy.generation.backend`, `policy.generation.hf_fast`).

Its own module because it is the one place that knows every engine: engines.py holds the interface with the vLLM
and plain transformers engines, engine_hf_fast.py builds on the latter, and neither imports the other's user.
"""

from __future__ import annotations

from workers.generate.config import GenerationConfig
from workers.generate.engines import Engine, HFEngine, VllmEngine


def make_engine(cfg: GenerationConfig, worker_id: str, model_path: str) -> Engine:
    """The engine `cfg` asks for. The worker sees only its own GPUs (`rlq train` sets CUDA_VISIBLE_DEVICES from
    cluster.generation_gpus), so a transformers engine takes the first one it sees."""
    if cfg.backend == "vllm":
        return VllmEngine(cfg, worker_id, model_path)
    if cfg.hf_fast is True or (cfg.hf_fast == "auto" and _cuda_available()):
        from workers.generate.engine_hf_fast import FastHFEngine

        return FastHFEngine(cfg, worker_id, model_path)
    return HFEngine(cfg, worker_id, model_path)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
