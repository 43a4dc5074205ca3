"""AdamW for bfloat16 master weights: each update is computed in float32 and stored by stochastic rounding.

Why not torch's AdamW on bfloat16 parameters: it adds the update to the weight in bfloat16 with round-to-nearest,
so an update smaller than half a unit in the last place (2^-9 of the weight: 1e-6 on any weight above ~5e-4) is
lost, every step. At GRPO's lr 1e-6 nearly every weight stays where it is. Its second moment has the same
problem: with beta2 = 0.999 a step changes `exp_avg_sq` by 0.1 %, below bfloat16's resolution, so it can never
decay.

Stochastic rounding fixes both in expectation: a float32 value x between adjacent bfloat16 values a <= x < b is
stored as b with probability (x - a) / (b - a), else a, so E[stored] = x and small updates accumulate at the
right rate. bfloat16 is the upper half of a float32, so this is: add 16 uniform random bits to x's float32 bit
pattern and clear the low 16 bits (a carry into the upper half happens with exactly that probability; values
already representable have zero low bits and never move).

`StochasticAdamW` keeps torch's AdamW semantics (decoupled weight decay, bias correction, the same update order)
and torch's state layout (`step`, `exp_avg`, `exp_avg_sq` in the parameter's dtype), so checkpoints and FSDP2's
optimizer state dicts treat it like torch's. The moments are bfloat16 too (stochastically rounded): float32
moments would add 16 GB on the Qwen3-4B shape, which does not fit next to 8k-token micro-batches on one 80 GB card.

Random bits: each step draws from generators seeded by (`seed`, step number), inside `torch.random.fork_rng`. So
data-parallel replicas, which see the same gradients, round the same way and stay bit-identical; a resumed run
draws what the uninterrupted one would have; and the caller's random streams are left as they were.

One tensor's update is one function, `adamw_sr_`: on CUDA compiled by torch.compile into one kernel per tensor
that reads p, grad, exp_avg, exp_avg_sq once, draws 48 random bits per element in the kernel (16 per stored
state) and writes the three states back (no float32 temporaries); elsewhere run eagerly in chunks that bound the
float32 temporaries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)

EAGER_CHUNK_NUMEL = 1 << 22
"""Elements per eager update call: ~6 float32 temporaries of 16 MB each, whatever the tensor's size."""
_LOW_BITS = 1 << 16
"""float32 bits below bfloat16's mantissa: the random range of one rounding."""
_HIGH_MASK = -(1 << 16)
"""0xFFFF0000 as an int32: keeps the sign, exponent and bfloat16 mantissa of a float32."""
_GOLDEN = 0x9E3779B97F4A7C15
"""Spreads (seed, step) over the 63-bit seed space."""
_COMPILED: Callable[..., None] | None = None


def random_bits(like: torch.Tensor, count: int) -> list[torch.Tensor]:
    """`count` (<= 3) independent int32 tensors of `like`'s shape, uniform in [0, 2^16), from ONE draw of 48 random
    bits per element: a compiled update makes one counter-based (Philox) call per element instead of `count`; the
    generator's work, not memory traffic, would otherwise bound the kernel."""
    if not 1 <= count <= 3:
        raise ValueError(f"48 random bits make 1 to 3 roundings, not {count}")
    bits = torch.randint(0, 1 << 48, like.shape, dtype=torch.int64, device=like.device)  # [same as like]
    return [((bits >> (16 * i)) & (_LOW_BITS - 1)).to(torch.int32) for i in range(count)]


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, noise: torch.Tensor | None = None) -> torch.Tensor:
    """`x` (float32) in `dtype`, rounded so that the expected result is `x` (bfloat16), or as is (float32).

    `noise`: int32 uniform in [0, 2^16), x's shape (`random_bits`); drawn here if None. NaN stays NaN and +-inf
    stays +-inf; a finite value above bfloat16's largest rounds to inf with the probability stochastic rounding
    gives it.
    """
    if dtype == torch.float32:
        return x
    if dtype != torch.bfloat16:
        raise TypeError(f"stochastic rounding to {dtype} is not implemented (float32 or bfloat16)")
    noise = random_bits(x, 1)[0] if noise is None else noise  # [same as x]
    # int32 addition on the bit pattern is unsigned addition mod 2^32: a carry rounds the magnitude up. Only NaN
    # patterns can wrap around (to a small number), hence the where.
    truncated = ((x.view(torch.int32) + noise) & _HIGH_MASK).view(torch.float32)  # low 16 bits zero
    return torch.where(torch.isnan(x), x, truncated).to(dtype)  # exact: the value is representable


def adamw_sr_(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, hyper: torch.Tensor) -> None:
    """One AdamW update of one tensor, in float32, stored back into `p`, `m`, `v` by `stochastic_round`.

    Args:
        p, m, v: parameter, exp_avg, exp_avg_sq; same shape, float32 or bfloat16; written in place.
        grad: the gradient, p's shape, any float dtype.
        hyper: [7] float32 on p's device: (1 - lr * wd, lr / bias_correction1, sqrt(bias_correction2), eps,
            1 - beta1, beta2, 1 - beta2). Tensors, not Python floats, so a compiled update never specializes on
            the step.
    """
    decay, step_size, bc2_sqrt, eps, one_minus_beta1, beta2, one_minus_beta2 = hyper.unbind()
    g = grad.float()
    m32 = m.float().lerp(g, one_minus_beta1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
    v32 = v.float() * beta2 + one_minus_beta2 * g * g  # torch: exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
    denom = v32.sqrt() / bc2_sqrt + eps
    p32 = p.float() * decay - step_size * m32 / denom  # torch: param.mul_(1 - lr * wd).addcdiv_(...)
    rounded = [t for t in (p, m, v) if t.dtype != torch.float32]
    noise = iter(random_bits(p, len(rounded)) if rounded else [])
    for target, value in ((p, p32), (m, m32), (v, v32)):
        target.copy_(stochastic_round(value, target.dtype, next(noise) if target.dtype != torch.float32 else None))


def compiled_update() -> Callable[..., None]:
    """`adamw_sr_` compiled once per process (dynamic shapes: one graph for every tensor size)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(adamw_sr_, dynamic=True, fullgraph=True)
    return _COMPILED


class StochasticAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update for float32 or bfloat16 parameters; bfloat16 states are stochastically rounded.

    `compile`: run the per-tensor update through torch.compile (None: on CUDA tensors). `chunk_numel`: elements
    per eager call (the compiled update takes whole tensors: it has no temporaries to bound). `seed`: with the
    step number, seeds the rounding's random bits (the same on every rank).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        compile: bool | None = None,
        chunk_numel: int = EAGER_CHUNK_NUMEL,
        seed: int = 0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW hyperparameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype not in (torch.float32, torch.bfloat16):
                    raise TypeError(f"StochasticAdamW takes float32 or bfloat16 parameters, not {p.dtype}")
        self.compile = compile
        self.chunk_numel = chunk_numel
        self.seed = seed

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        cuda = sorted({_cuda_index(_local(p).device) for p in params if p.device.type == "cuda"})
        step = 1 + max((int(s["step"].item()) for s in self.state.values() if "step" in s), default=0)
        with torch.random.fork_rng(devices=cuda):
            _seed_generators((self.seed * _GOLDEN + step) % (1 << 63), cuda)
            self._step_groups()
        return loss

    def _step_groups(self) -> None:
        for group in self.param_groups:
            hypers: dict[tuple[int, torch.device], torch.Tensor] = {}  # one small host->device copy per step
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("StochasticAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:  # torch's layout: a float32 CPU step, moments like the parameter
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                local = _local(p)
                key = (int(state["step"].item()), local.device)
                if key not in hypers:
                    hypers[key] = _hyper(group, key[0], local.device)
                self._update(local, _local(p.grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"]), hypers[key])

    def _update(self, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, hyper: torch.Tensor) -> None:
        compiled = self.compile if self.compile is not None else p.device.type == "cuda"
        if not (p.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
            # Elementwise, so any layout works; a compiled update then recompiles for this rank/layout.
            (compiled_update() if compiled else adamw_sr_)(p, g, m, v, hyper)
            return
        # 1-D aliases: one compiled graph serves every tensor (dynamo guards on a view's base, so a view of a
        # tensor of another rank would recompile); eager chunks are slices of them.
        p, m, v, g = _flat_alias(p), _flat_alias(m), _flat_alias(v), _flat_alias(g.contiguous())
        if compiled:
            compiled_update()(p, g, m, v, hyper)
            return
        for start in range(0, p.numel(), self.chunk_numel):
            piece = slice(start, start + self.chunk_numel)
            adamw_sr_(p[piece], g[piece], m[piece], v[piece], hyper)


def _hyper(group: dict[str, Any], step: int, device: torch.device) -> torch.Tensor:
    """The step's scalars as `adamw_sr_` takes them, computed in float64 on the host as torch's AdamW does."""
    beta1, beta2 = group["betas"]
    lr = float(group["lr"])
    values = [1 - lr * group["weight_decay"], lr / (1 - beta1**step), (1 - beta2**step) ** 0.5, group["eps"]]
    return torch.tensor([*values, 1 - beta1, beta2, 1 - beta2], dtype=torch.float32, device=device)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _seed_generators(seed: int, cuda: list[int]) -> None:
    """Seed the CPU generator and those of the `cuda` device indices (a compiled update draws from the latter)."""
    torch.default_generator.manual_seed(seed)
    for index in cuda:
        with torch.cuda.device(index):
            torch.cuda.manual_seed(seed)


def _flat_alias(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor over contiguous `t`'s memory that is not a view of it (no `_base`, no autograd history)."""
    flat = torch.empty(0, dtype=t.dtype, device=t.device)
    return flat.set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters, gradients and states), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t
