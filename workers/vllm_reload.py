"""In-place weight load for vLLM's CPU build that re-packs the linear layers and touches nothing else.

vLLM's CPU build packs every unquantized linear weight into a oneDNN handle when the model loads and then drops
the weight (the parameter is left with shape [0]), so the plain `model.load_weights` fails half-way on a live
engine. `model_runner.reload_weights` works: it puts every layer back on the meta device, materializes it,
buffers each layer's tensors until the layer is complete, loads, re-runs the post-load processing and copies
the result back. On a small model that fixed per-layer work is the whole update (~30 ms for the tiny policy,
against ~1 ms for the bytes), and every update faults in fresh memory for every layer.

`load_in_place` does only what a CPU reload needs:

1. each packed linear gets a real weight parameter again, built from the metadata vLLM recorded when it loaded
   the model (so its `weight_loader` and shard attributes are vLLM's own); the parameter's memory is kept
   between updates, so no update faults it in again;
2. the model's own `load_weights` maps the Hugging Face names (q/k/v -> qkv_proj, gate/up -> gate_up_proj, a
   tied head) and copies: into those weights, and in place into everything that was never packed (embeddings,
   norms);
3. each of those linears runs its `process_weights_after_loading` again: a fresh oneDNN handle from the new
   weight, whose unpacked copy is dropped from the layer again. A layer that kept its weight and has a handle (an
   LM head, tied or not) is re-packed too; an embedding whose weight an LM head shares is not (its own handle
   is never used for a lookup, and the head's is rebuilt).

The compiled graph reads `layer.cpu_linear` at every call, as after vLLM's own reload. Where the path does not
apply (a quantized model, a layer without recorded metadata, weights not on the CPU) it returns False and the
caller uses `reload_weights`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)

_WEIGHTS_KEPT = "_rlq_unpacked_weight"
"""Attribute of a packed linear holding its unpacked weight parameter between updates."""


def packed_linears(model: torch.nn.Module) -> list[torch.nn.Module] | None:
    """Layers whose weight vLLM packed and dropped; None if one of them cannot be restored here."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    out = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not _has_handle(module) or not isinstance(weight, torch.Tensor) or weight.numel() > 0:
            continue
        info = LAYERWISE_INFO.get(module)
        meta = info.restore_metadata[0].get("weight") if info is not None else None
        if meta is None or meta.dtype != weight.dtype:
            return None
        out.append(module)
    return out


def load_in_place(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], quantized: bool) -> bool:
    """Load Hugging Face-named `tensors` into a live CPU model; False (nothing touched) where it does not apply."""
    if quantized or next(model.parameters()).device.type != "cpu":
        return False
    linears = packed_linears(model)
    if linears is None:
        return False
    heads = _kept_weight_heads(model)  # before the linears get their weights back
    for module in linears:
        module.weight = _unpacked_weight(module)
    model.load_weights(tensors)  # type: ignore[operator]
    for module in linears + heads:
        module.quant_method.process_weights_after_loading(module)
    for module in linears:
        if module.weight.numel() > 0:
            raise RuntimeError(f"{type(module).__name__} kept its weight after re-packing; the CPU path changed")
    return True


def _has_handle(module: torch.nn.Module) -> bool:
    return hasattr(module, "cpu_linear") and getattr(module, "quant_method", None) is not None


def _unpacked_weight(module: torch.nn.Module) -> Any:
    """The layer's model-format weight parameter, materialized once from vLLM's recorded metadata, then reused."""
    kept = getattr(module, _WEIGHTS_KEPT, None)
    if kept is None:
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
        from vllm.model_executor.model_loader.reload.meta import materialize_meta_tensor
        from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

        info = LAYERWISE_INFO[module]
        with info.restore_device:
            kept = restore_layer_refs(materialize_meta_tensor(info.restore_metadata[0]["weight"]), module)
        object.__setattr__(module, _WEIGHTS_KEPT, kept)  # not a registered parameter: invisible to vLLM
    return kept


def _kept_weight_heads(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Layers with a handle that kept their weight (LM heads, embeddings), less embeddings an LM head shares."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    kept = [m for m in model.modules() if _has_handle(m) and getattr(m, "weight", torch.empty(0)).numel() > 0]
    head_weights = {id(m.weight) for m in kept if isinstance(m, ParallelLMHead)}
    return [m for m in kept if isinstance(m, ParallelLMHead) or id(m.weight) not in head_weights]
