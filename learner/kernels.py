"""The learner forward's fast paths: attention over packed samples, and completion logprobs in chunks.

- `varlen_attention`: a transformers attention function (registered as `rlq_varlen`) for a micro-batch whose
  samples lie back to back in one row. Each sample attends causally to itself only, with no padding and no mask
  tensor: on CUDA in half precision through torch's flash varlen kernel (`torch.nn.attention.varlen`), otherwise
  one SDPA call per sample (the CPU and float32 path, exact but not fast).
- `chunked_logprobs`: log pi(target) and the entropy of the next-token distribution for K positions, computing
  the [K, V] logits `chunk` rows at a time in forward and again in backward, so the float32 [K, V] logits and
  their gradient never exist at once (152k vocabulary x 8k positions is 5 GB per float32 copy).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

VARLEN_ATTENTION = "rlq_varlen"
"""Name of `varlen_attention` in transformers' AttentionInterface (and the models' `attn_implementation`)."""


def use_varlen_attention(model: nn.Module) -> None:
    """Switch a transformers model to `varlen_attention` (registered on first use).

    Its forward then wants `cu_seq_lens_q`/`max_length_q` with packed rows (see `varlen_attention`). The setting is
    not saved with the model: a checkpoint written afterwards loads with the default attention.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    model.set_attn_implementation(VARLEN_ATTENTION)
    if torch.cuda.is_available():
        _resolve_varlen()  # here, not on the first call: inspect inside a compiled layer would break its graph


def varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed sample (transformers' attention-function signature).

    Args:
        query: [1, Hq, N, D]; key, value: [1, Hkv, N, D]: the N tokens of all samples back to back.
        kwargs: `cu_seq_lens_q` int32 [S + 1] sample boundaries (0, n1, n1 + n2, ..., N) and `max_length_q` (the
            longest sample). Without them every row is one causal sequence with no padding.

    Returns:
        ([1, N, Hq, D] attention output, None).
    """
    if dropout:
        raise ValueError("varlen_attention has no dropout")
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:  # unpacked rows: plain causal attention, no mask (transformers makes none for us)
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] != 1:
        raise ValueError(f"packed attention wants one row, got {query.shape[0]}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, H, D]
    half = q.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(q.device.type)
    if q.is_cuda and half:
        out = _flash_varlen(q, k, v, cu_seqlens, int(kwargs["max_length_q"]), scaling)
    else:  # the flash kernel is CUDA and half precision only; a float32 run stays float32
        out = _per_sample_sdpa(q, k, v, cu_seqlens, scaling)
    return out.unsqueeze(0), None  # [1, N, Hq, D]


def _per_sample_sdpa(q, k, v, cu_seqlens: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """One causal SDPA call per sample: q [N, Hq, D], k, v [N, Hkv, D] -> [N, Hq, D]."""
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling, enable_gqa=True)
        outs.append(o.transpose(0, 1))  # [n, Hq, D]
    return torch.cat(outs)


_VARLEN: tuple[Any, dict[str, Any]] | None = None
"""torch's varlen_attn and its causal keywords, resolved once outside any compiled region (see `_resolve_varlen`)."""


def _resolve_varlen() -> tuple[Any, dict[str, Any]]:
    """torch's varlen_attn and how this torch version spells "causal" (2.10: is_causal; later: window_size)."""
    global _VARLEN
    if _VARLEN is None:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        kw: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if "enable_gqa" in params:  # newer versions check the head counts unless asked; the kernel does GQA itself
            kw["enable_gqa"] = True
        _VARLEN = (varlen_attn, kw)
    return _VARLEN


def _flash_varlen(q, k, v, cu_seqlens: torch.Tensor, max_len: int, scaling: float | None) -> torch.Tensor:
    """Flash varlen kernel: q [N, Hq, D], k, v [N, Hkv, D] in half precision -> [N, Hq, D]."""
    varlen_attn, kw = _VARLEN if _VARLEN is not None else _resolve_varlen()
    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        # float32 weights under autocast leave q/k/v in float32 (RMSNorm's weight promotes): flash wants half.
        half = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(half), k.to(half), v.to(half)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scaling, **kw).to(dtype)


# --- completion logprobs -------------------------------------------------------------------------------------


def chunked_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(target) and entropy of softmax(hidden @ weight.T), `chunk` rows of logits at a time.

    Args:
        hidden: [K, H] final hidden states of the positions that predict a trained token.
        weight: [V, H] the LM head (same dtype as `hidden`).
        targets: [K] the next tokens.
        chunk: rows per chunk; None, or K <= chunk: one plain autograd pass (the logits are kept for backward).

    Returns:
        (logprobs [K] float32 with gradient, entropy [K] float32 without).
    """
    from learner.loss import logprobs_and_entropy

    if chunk is None or hidden.shape[0] <= chunk:
        return logprobs_and_entropy(hidden @ weight.T, targets)
    logprobs, entropy = _ChunkedLogprobs.apply(hidden, weight, targets, chunk)
    return logprobs, entropy


class _ChunkedLogprobs(torch.autograd.Function):
    """Forward keeps only hidden, weight and the log-normaliser per row; backward recomputes each chunk's logits.

    d logprob_i / d logits_i = onehot(target_i) - softmax(logits_i); the entropy carries no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):  # type: ignore[override]
        k = hidden.shape[0]
        logprobs = hidden.new_empty(k, dtype=torch.float32)  # [K]
        entropy = hidden.new_empty(k, dtype=torch.float32)  # [K]
        lse = hidden.new_empty(k, dtype=torch.float32)  # [K]
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, k, chunk):
                logits = (hidden[s : s + chunk] @ weight.T).float()  # [c, V]
                norm = torch.logsumexp(logits, -1)  # [c]
                logprobs[s : s + chunk] = logits.gather(-1, targets[s : s + chunk, None])[:, 0] - norm
                logp = logits.sub_(norm[:, None])  # [c, V], in place: two [c, V] float32 buffers at most
                entropy[s : s + chunk] = -logp.exp().mul_(logp).sum(-1)  # not norm - E[logit]: that cancels
                lse[s : s + chunk] = norm
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):  # type: ignore[override]
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # Partial weight gradients summed in float32: one [V, H] per chunk would lose bits in half precision.
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        )  # [V, H]; ~1.5 GB for Qwen3-4B's vocabulary, so only when the head is trained
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h, g = hidden[s : s + chunk], grad_logprobs[s : s + chunk].float()  # [c, H], [c]
                logits = (h @ weight.T).float()  # [c, V]
                grad_logits = logits.sub_(lse[s : s + chunk, None]).exp_().mul_(-g[:, None])  # [c, V]: -g * softmax
                grad_logits.scatter_add_(-1, targets[s : s + chunk, None], g[:, None])  # + g * onehot
                grad_logits = grad_logits.to(hidden.dtype)
                if grad_hidden is not None:
                    grad_hidden[s : s + chunk] = grad_logits @ weight  # [c, H]
                if grad_weight is not None:
                    grad_weight += grad_logits.T @ h  # [V, H]
        return grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None, None, None
