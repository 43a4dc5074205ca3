"""In-place weight load for vLLM's CPU build that re-packs the linear layers and touches nothing else.

vLLM's CPU build packs every unquantized linear weight into a oneDNN handle when the model loads and then drops
the weight (the parameter is left with shape [0]), so the plain `model.load_weights` fails half-way on a live
engine. `model_runner.reload_weights` works: it puts every layer back on the meta device, materializes it,
buffers each layer's tensors until the layer is complete, loads, re-runs the post-load processing and copies
the result back. On a small model that fixed per-layer work is the whole update (~30 ms for the tiny policy,
against ~1 ms for the bytes), and every update faults in fresh memory for every layer.

`InPlaceLoad` does only what a CPU reload needs:

1. each packed linear gets a real weight parameter again, built from the metadata vLLM recorded when it loaded
   the model (so its `weight_loader` and shard attributes are vLLM's own); the parameter's memory is kept
   between updates, so no update faults it in again. The layer computes with its packed handle, never with
   this parameter, so loading into it changes nothing the engine uses;
2. the model's own `load_weights` maps the Hugging Face names (q/k/v -> qkv_proj, gate/up -> gate_up_proj, a
   tied head) and copies into those weights;
3. each linear runs its `process_weights_after_loading` again: a fresh oneDNN handle from the new weight,
   whose unpacked copy is dropped from the layer again. Steps 2 and 3 run per bucket as the broadcast delivers
   it (`add`), so re-packing overlaps the transfer of later buckets;
4. `finish` loads the rest in place (embeddings, norms: everything that was never packed, which the engine
   does use), and re-packs what is left: linears not complete before, and a layer that kept its weight and has
   a handle (an LM head, tied or not; its handle holds a packed copy). An LM head whose source tensor arrived
   with the shape of its weight is re-packed from the received tensor already in step 3. An embedding whose
   weight an LM head shares is not re-packed (a lookup never uses its handle; the head's is rebuilt).

With `vllm_cfg.cpu_gemm=torch` nothing is packed: the engine loads under `torch_cpu_gemms`, so vLLM's dispatch
falls back to torch's GEMM on weights it keeps, and `mark_torch_gemms` tags those layers. `InPlaceLoad` then has
no linear to restore or re-pack: every tensor is kept for `finish`, which loads it in place.

Until `finish`, what the engine computes with is either untouched or kept aside: `rollback` (a broadcast that
failed half-way) puts every layer's previous handle back. The compiled graph reads `layer.cpu_linear` at every
call, as after vLLM's own reload. Where the path does not apply (a quantized model, a layer without recorded
metadata, weights not on the CPU) `InPlaceLoad.begin` returns None and the caller uses `reload_weights`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from broker.errors import RlqError

log = logging.getLogger(__name__)

MODEL_LEFT_MIXED = "weight load failed after the live weights began to change"
"""Marker of `ModelLeftMixed` in an error message (it may cross a process boundary as text)."""


class ModelLeftMixed(RlqError, RuntimeError):
    """The in-place load failed after it began writing the weights the engine computes with: old and new mixed."""


_WEIGHTS_KEPT = "_rlq_unpacked_weight"
"""Attribute of a packed linear holding its unpacked weight parameter between updates."""


_TORCH_GEMM = "_rlq_torch_gemm"
"""Attribute of a layer that computes with torch's GEMM on its kept weight (`vllm_cfg.cpu_gemm=torch`)."""


@contextlib.contextmanager
def torch_cpu_gemms() -> Iterator[None]:
    """While vLLM loads a model in this process, its CPU dispatch takes the torch fallback instead of oneDNN."""
    import vllm._custom_ops as ops

    if not hasattr(ops, "_supports_onednn"):
        raise RuntimeError("this vLLM build has no oneDNN switch (_custom_ops._supports_onednn): set cpu_gemm=onednn")
    saved = ops._supports_onednn
    ops._supports_onednn = False
    try:
        yield
    finally:
        ops._supports_onednn = saved


def mark_torch_gemms(model: torch.nn.Module) -> int:
    """Tag every layer with a CPU GEMM as computing with torch on its kept weight; returns how many.

    Raises RuntimeError where a layer was packed anyway (another dispatch path, e.g. zentorch or AMX kernels).
    """
    layers = [m for m in model.modules() if _has_handle(m)]
    for module in layers:
        weight = getattr(module, "weight", None)
        packed = getattr(module.cpu_linear, "__closure__", None) is not None  # the packed paths close over a handle
        if packed or not isinstance(weight, torch.Tensor) or weight.numel() == 0:
            raise RuntimeError(f"{type(module).__name__} was packed although cpu_gemm=torch; set cpu_gemm=onednn")
    for module in layers:
        object.__setattr__(module, _TORCH_GEMM, True)
    return len(layers)


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


class InPlaceLoad:
    """One update's in-place load into a live CPU model, fed bucket by bucket (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, linears: list[torch.nn.Module]) -> None:
        self.model = model
        self.linears = linears
        self.heads = _kept_weight_heads(model)  # before the linears get their weights back
        self.previous = {m: (m.weight, m.cpu_linear) for m in linears + self.heads}
        self.missing = {m: _unpacked_weight(m).numel() for m in linears}  # elements still to arrive
        self.head_of = {id(h.weight): h for h in self.heads}
        self.packed: set[torch.nn.Module] = set()
        self.deferred: list[tuple[str, torch.Tensor]] = []
        self.mapper = getattr(model, "hf_to_vllm_mapper", None)
        for module in linears:
            module.weight = _unpacked_weight(module)

    @classmethod
    def begin(cls, model: torch.nn.Module, quantized: bool) -> InPlaceLoad | None:
        """Set up an update, or None where this path does not apply (nothing touched)."""
        if quantized or next(model.parameters()).device.type != "cpu":
            return None
        linears = packed_linears(model)
        return cls(model, linears) if linears is not None else None

    def add(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Tensors that arrived: load and re-pack the linears they complete; keep the rest for `finish`."""
        early, done = [], []
        for name, tensor in tensors:
            target = self._target(name)
            if target in self.missing:
                early.append((name, tensor))
                self.missing[target] -= tensor.numel()
                if self.missing[target] == 0:
                    done.append(target)
            else:
                self.deferred.append((name, tensor))
                head = self.head_of.get(id(getattr(target, "weight", None)))
                if head is not None and head not in self.packed and tuple(tensor.shape) == tuple(head.weight.shape):
                    self._pack_head_from(head, tensor)
        if early:
            self.model.load_weights(early)  # type: ignore[operator]
        self._pack(done)

    def finish(self) -> None:
        """Re-pack the linears not re-packed yet, then load what the engine uses directly (in place).

        Everything that can fail on the linears runs first, while `rollback` can still undo it. The in-place load
        (embeddings, norms) and re-packing a head whose tensor did not arrive in its weight's shape come last: a
        failure there leaves the live model mixed, which `rollback` cannot undo, so it raises `ModelLeftMixed`.
        """
        self._pack([m for m in self.linears if m not in self.packed])
        for module in self.linears:
            if module.weight.numel() > 0:
                raise RuntimeError(f"{type(module).__name__} kept its weight after re-packing; the CPU path changed")
        try:
            if self.deferred:
                self.model.load_weights(self.deferred)  # type: ignore[operator]
            self._pack([h for h in self.heads if h not in self.packed])
        except Exception as exc:
            raise ModelLeftMixed(f"{MODEL_LEFT_MIXED}: {exc}") from exc
        self.previous.clear()

    def rollback(self) -> None:
        """Every layer back to the weight and handle it had before `begin` (the received data is discarded)."""
        for module, (weight, cpu_linear) in self.previous.items():
            module.weight = weight
            module.cpu_linear = cpu_linear
        self.previous.clear()

    def _target(self, name: str) -> torch.nn.Module | None:
        """The module whose `weight` an HF tensor name loads into, if the name maps to one."""
        mapped = self.mapper.map_name(name) if self.mapper is not None else name
        module_name, _, param = (mapped or "").rpartition(".")
        if param != "weight":
            return None
        try:
            return self.model.get_submodule(module_name)
        except AttributeError:
            return None

    def _pack(self, modules: list[torch.nn.Module]) -> None:
        for module in modules:
            module.quant_method.process_weights_after_loading(module)
            self.packed.add(module)

    def _pack_head_from(self, head: torch.nn.Module, tensor: torch.Tensor) -> None:
        """Re-pack an LM head from its received tensor, leaving its live (maybe shared) weight untouched."""
        live = head.weight
        head.weight = torch.nn.Parameter(tensor.view(live.shape), requires_grad=False)
        try:
            self._pack([head])
        finally:
            head.weight = live


def _has_handle(module: torch.nn.Module) -> bool:
    """A layer vLLM's CPU dispatch gave a packed GEMM (a torch-GEMM layer has nothing to re-pack)."""
    return (
        hasattr(module, "cpu_linear")
        and getattr(module, "quant_method", None) is not None
        and not getattr(module, _TORCH_GEMM, False)
    )


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
