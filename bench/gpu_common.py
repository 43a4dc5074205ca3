"""Shared pieces of the GPU benches (bench/gpu_*.py): the Qwen3-4B shape, result files, device description."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results"
H100_BF16_FLOPS = 989e12
"""Dense bf16 tensor-core peak of an H100 SXM (the MFU denominator the issue names)."""

QWEN3_4B = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
}


def qwen3_config(**overrides: Any) -> Any:
    """A Qwen3Config of the Qwen3-4B shape; `overrides` (e.g. num_hidden_layers=2) shrink it for CPU checks."""
    from transformers import Qwen3Config

    return Qwen3Config(**{**QWEN3_4B, **overrides})


def random_model(cfg: Any, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """Random weights built straight on `device` (seconds on a GPU; no checkpoint needed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights count once


def device_name() -> str:
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n}x {torch.cuda.get_device_name(0)}"
    return "cpu"


def machine() -> str:
    return (
        f"{device_name()}; {platform.machine()} {os.cpu_count()} cores, {platform.platform()}, "
        f"torch {torch.__version__}"
    )


def write_result(name: str, figures: dict, targets: dict[str, str], met: bool, out: Path | None = None) -> Path:
    """bench/results/<name>.json in the project's bench format (and a copy under `out`, e.g. $OUT)."""
    import transformers

    result = {
        "bench": name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine() + f", transformers {transformers.__version__}",
        "figures": figures,
        "targets": targets,
        "met": met,
    }
    text = json.dumps(result, indent=2) + "\n"
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(text)
    return path


def out_dir() -> Path | None:
    value = os.environ.get("OUT")
    return Path(value) if value else None
