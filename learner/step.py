"""One training step on one rank: micro-batches (padded, or packed to a token budget), the logprob forward,
micro-batched backward, the optimizer update.

Only completion positions go through the LM head (`PolicyLogprobs`), so the [tokens, vocab] logits cover the
tokens that train and not the prompt. Loss normalisers are global (whole update, all ranks; see
`learner.batch.Minibatch`) and each rank's loss is multiplied by the world size, so DDP's gradient *average*
yields the gradient of the global objective whatever the split.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from learner.batch import Minibatch, TrainSample
from learner.kernels import chunked_logprobs, use_varlen_attention
from learner.loss import LossSettings, logprobs_and_entropy, policy_loss
from learner.packing import Micro, collate, collate_packed, plan_packs

log = logging.getLogger(__name__)

STAT_KEYS = (
    "tokens",
    "pg_loss_sum",
    "clipped_sum",
    "ratio_sum",
    "is_weight_sum",
    "kl_sum",
    "mult_prob_error_sum",
    "entropy_sum",
    "loss_sum",
    "all_tokens",
    "updates",
    "grad_norm_sum",
)


class PolicyLogprobs(nn.Module):
    """Wraps a causal LM; returns logprobs and entropies of the selected next-token predictions only.

    `logprob_chunk`: LM-head rows per chunk (`learner.kernels.chunked_logprobs`); None computes all at once.
    """

    def __init__(self, model: nn.Module, logprob_chunk: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.logprob_chunk = logprob_chunk

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pred_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int = 0,
        temperature: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: input_ids, attention_mask, pred_mask: [B, L]; pred_mask marks positions whose next token trains.
        A packed row (`learner.packing.collate_packed`) has no mask but position_ids [1, N], cu_seqlens [S + 1].
        temperature: [K] or None; the logits of each marked position are divided by it, so the logprobs are
        those of the distribution the generation worker sampled from (vLLM's processed logprobs, NeMo RL's
        logits / temperature) and the importance ratios compare like with like.

        Returns:
            (logprobs [K], entropy [K]) for the K marked positions, row-major.
        """
        packed = {}
        if cu_seqlens is not None:  # the keyword names transformers forwards to the attention function
            packed = {"position_ids": position_ids, "cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens,
                      "max_length_q": max_seqlen, "max_length_k": max_seqlen}  # fmt: skip
        decoder = self.model.get_decoder()
        # use_cache=False: the config's default would fill a KV cache nobody reads (and guard compiled layers on it)
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **packed)
        hidden = out.last_hidden_state  # [B, L, H]
        targets = input_ids[:, 1:][pred_mask[:, :-1]]  # [K]
        selected = hidden[pred_mask]  # [K, H]
        head = self.model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            logits = head(selected)  # [K, V]
            return logprobs_and_entropy(logits if temperature is None else logits / temperature[:, None], targets)
        if temperature is not None:  # a bias-free head: (h / T) W^T = (h W^T) / T, without [K, V] logits to divide
            selected = selected / temperature[:, None].to(selected.dtype)
        # Explicit compute dtype: float32 master weights under autocast would otherwise give float32 logits.
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
        dtype = dtype or head.weight.dtype
        return chunked_logprobs(selected.to(dtype), head.weight.to(dtype), targets, self.logprob_chunk)


@dataclass(frozen=True)
class ForwardSettings:
    """How micro-batches are formed and run (from `policy.*`; see learner.config.PolicyConfig)."""

    pack_tokens: int | None = None  # token budget of one packed micro-batch; None: micro_batch_size padded rows
    logprob_chunk: int | None = None  # LM-head rows per chunk (learner.kernels.chunked_logprobs); None: all at once
    compile_layers: bool = False  # torch.compile each decoder layer of the trained model


def _unflatten(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flat [K] values back into [B, T] at `mask` (zeros elsewhere), keeping the gradient."""
    out = flat.new_zeros(mask.shape)
    return out.masked_scatter(mask, flat)


def _dummy(device: torch.device) -> list[TrainSample]:
    """A two-token sample with no trainable token: a rank with no data still joins DDP's gradient all-reduce."""
    return [TrainSample("", np.zeros(2, dtype=np.int64), 1, np.zeros(1, np.float32), 0.0, trainable=False)]


def shard_fsdp(net: nn.Module) -> None:
    """FSDP2: one unit per decoder layer, the rest (embeddings, final norm, tied LM head) in the root unit."""
    from torch.distributed.fsdp import fully_shard

    for layer in net.model.get_decoder().layers:
        fully_shard(layer)
    fully_shard(net)


class Trainer:
    """Owns the (DDP- or FSDP2-wrapped) policy, its optimizer and, with a KL penalty, a frozen reference.

    `optimizer` may be a factory taking the parameters: FSDP2 replaces them with sharded ones, so the optimizer
    must be built after wrapping. Under FSDP2, `shadow` (rank 0 only) is an unsharded copy that `full_model`
    fills for checkpoints and weight broadcasts.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        settings: LossSettings,
        *,
        world_size: int,
        micro_batch_size: int,
        max_grad_norm: float | None,
        device: torch.device,
        reference: nn.Module | None = None,
        pad_id: int = 0,
        compute_dtype: torch.dtype | None = None,
        fsdp: bool = False,
        shadow: nn.Module | None = None,
        forward: ForwardSettings | None = None,
    ) -> None:
        self.forward_settings = forward or ForwardSettings()
        self.model = model  # the bare HF model (sharded under FSDP2)
        self._prepare(model, self.forward_settings, trained=True)
        self.net: nn.Module = PolicyLogprobs(model, self.forward_settings.logprob_chunk)
        self.world_size = world_size
        self.fsdp = fsdp and world_size > 1
        self.shadow = shadow
        if self.fsdp:
            shard_fsdp(self.net)
        elif world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        self.optimizer = optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer(self.net.parameters())
        self.settings = settings
        self.micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm
        self.device = device
        self.reference = None
        if reference is not None:
            self._prepare(reference, self.forward_settings, trained=False)
            self.reference = PolicyLogprobs(reference, self.forward_settings.logprob_chunk).eval()
        self.pad_id = pad_id
        # Mixed precision: the forward runs in `compute_dtype` whatever the parameters' dtype (float32 master
        # weights, or bfloat16 ones with learner.optim.StochasticAdamW: policy.master_weights).
        self.compute_dtype = compute_dtype

    def _forward(self, net: nn.Module, micro: Micro) -> tuple[torch.Tensor, torch.Tensor]:
        enabled = self.compute_dtype is not None and self.compute_dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.compute_dtype or torch.float32, enabled=enabled):
            return net(**micro.model_inputs())

    @staticmethod
    def _prepare(model: nn.Module, forward: ForwardSettings, trained: bool) -> None:
        if forward.pack_tokens is not None:
            use_varlen_attention(model)
        if forward.compile_layers and trained:
            for layer in model.get_decoder().layers:
                layer.compile()  # in place: parameter names (checkpoints, weight broadcast) stay as they are

    def _collate(self, chunk: list[TrainSample]) -> Micro:
        if self.forward_settings.pack_tokens is not None:
            return collate_packed(chunk, self.device)
        return collate(chunk, self.device, self.pad_id)

    def _chunks(self, samples: list[TrainSample]) -> list[list[TrainSample]]:
        """The micro-batches of one update: `micro_batch_size` samples each, or packs of at most `pack_tokens`."""
        if self.forward_settings.pack_tokens is not None:
            plan = plan_packs([len(s.input_ids) for s in samples], self.forward_settings.pack_tokens)
            chunks = [[samples[i] for i in pack] for pack in plan]
        else:
            mbs = self.micro_batch_size
            chunks = [samples[i : i + mbs] for i in range(0, len(samples), mbs)]
        chunks = chunks or [_dummy(self.device)]
        if self.fsdp:  # every forward all-gathers: all ranks must run the same number of them
            count = torch.tensor([len(chunks)], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            chunks += [_dummy(self.device) for _ in range(int(count.item()) - len(chunks))]
        return chunks

    def _grad_sync(self, last: bool):
        """Gradient reduction on the last micro-batch of an update only."""
        if self.world_size == 1 or last:
            if self.fsdp:
                self.net.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.fsdp:
            self.net.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.net.no_sync()

    def full_model(self) -> nn.Module | None:
        """A module holding the full weights on rank 0 (None elsewhere). Collective under FSDP2: call on all ranks."""
        if not self.fsdp:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.shadow is None:
            return None
        self.shadow.load_state_dict({k.removeprefix("model."): v for k, v in full.items()})
        return self.shadow

    def optimizer_state(self) -> dict:
        """The optimizer's full state (on rank 0 under FSDP2, where this is a collective)."""
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.net, self.optimizer, options=opts)

    def load_optimizer_state(self, sd: dict) -> None:
        """Inverse of `optimizer_state`; under FSDP2 only rank 0's `sd` is read (and broadcast)."""
        if not self.fsdp:
            self.optimizer.load_state_dict(sd)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(self.net, self.optimizer, optim_state_dict=sd, options=opts)

    @torch.no_grad()
    def fill_prox_logprobs(self, minibatches: list[Minibatch]) -> None:
        """Learner logprobs before any update (needed when one step makes several updates)."""
        self.net.eval()
        for mb in minibatches:
            for chunk in self._chunks(mb.samples):
                micro = self._collate(chunk)
                flat, _ = self._forward(self.net, micro)
                per_seq = _unflatten(flat, micro.comp_mask).float().cpu().numpy()
                for i, s in enumerate(chunk):
                    s.prox_logprobs = per_seq[i, : s.completion_len]
        self.net.train()

    def train(self, minibatches: list[Minibatch]) -> tuple[dict[str, float], dict[str, float]]:
        """All updates of one step on this rank.

        Returns:
            (stats: local sums over STAT_KEYS plus "ratio_max", timings: fwd_bwd_s, optimizer_s).
        """
        # The first update runs on the weights the step starts from: its prox logprobs are its own, detached.
        self.fill_prox_logprobs(minibatches[1:])
        stats = dict.fromkeys(STAT_KEYS, 0.0)
        stats["ratio_max"] = 0.0
        timings = {"fwd_bwd_s": 0.0, "optimizer_s": 0.0}
        self.net.train()
        for mb in minibatches:
            t0 = time.perf_counter()
            chunks = self._chunks(mb.samples)
            for index, chunk in enumerate(chunks):
                with self._grad_sync(index == len(chunks) - 1):
                    self._micro_step(chunk, mb, stats)
            t1 = time.perf_counter()
            stats["grad_norm_sum"] += self._update()
            stats["updates"] += 1
            timings["fwd_bwd_s"] += t1 - t0
            timings["optimizer_s"] += time.perf_counter() - t1
        return stats, timings

    def _micro_step(self, chunk: list[TrainSample], mb: Minibatch, stats: dict[str, float]) -> None:
        micro = self._collate(chunk)
        flat, entropy = self._forward(self.net, micro)
        logprobs = _unflatten(flat, micro.comp_mask)  # [B, T]
        prox = micro.prox if micro.prox is not None else logprobs.detach()
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref_flat, _ = self._forward(self.reference, micro)
            ref = _unflatten(ref_flat, micro.comp_mask)
        loss, s = policy_loss(
            logprobs,
            prox,
            micro.behaviour,
            micro.advantages,
            micro.loss_mask,
            self.settings,
            ref_logprobs=ref,
            num_tokens=max(mb.num_tokens, 1.0),
            num_sequences=max(mb.num_sequences, 1.0),
        )
        (loss * self.world_size).backward()
        for key in ("tokens", "pg_loss_sum", "clipped_sum", "ratio_sum", "is_weight_sum", "kl_sum"):
            stats[key] += float(s[key])
        stats["mult_prob_error_sum"] += float(s["mult_prob_error_sum"])
        stats["ratio_max"] = max(stats["ratio_max"], float(s["ratio_max"]))
        trained = micro.loss_mask[micro.comp_mask]  # [K]
        stats["entropy_sum"] += float((entropy * trained).sum())
        stats["loss_sum"] += float(loss.detach())
        stats["all_tokens"] += float(micro.num_tokens) if chunk[0].group_id else 0.0

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next updates (learner/lr_schedule.py decides it per step)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _update(self) -> float:
        norm = 0.0
        if self.max_grad_norm is not None:
            total = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.max_grad_norm)
            full = getattr(total, "full_tensor", None)  # FSDP2: a DTensor
            norm = float(full() if full is not None else total)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


def reduce_stats(
    stats: dict[str, float], timings: dict[str, float], world_size: int, device: torch.device | None = None
) -> dict[str, float]:
    """All-reduce one step's sums over ranks and turn them into metrics (call on every rank).

    `device` is where the collective runs: the rank's GPU under NCCL, the CPU under gloo.
    """
    sums = torch.tensor([stats[k] for k in STAT_KEYS], dtype=torch.float64, device=device)
    peaks = [stats["ratio_max"], timings["fwd_bwd_s"], timings["optimizer_s"]]
    peak_t = torch.tensor(peaks, dtype=torch.float64, device=device)
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(sums)
        dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
    total = dict(zip(STAT_KEYS, sums.tolist(), strict=True))
    peaks = peak_t.tolist()
    tokens = max(total["tokens"], 1.0)
    updates = max(total["updates"] / world_size, 1.0)
    return {
        "loss/total": total["loss_sum"] / updates,
        "loss/pg": total["pg_loss_sum"] / tokens,
        "loss/clip_fraction": total["clipped_sum"] / tokens,
        "loss/ratio_mean": total["ratio_sum"] / tokens,
        "loss/ratio_max": peaks[0],
        "loss/is_weight_mean": total["is_weight_sum"] / tokens,
        "loss/kl": total["kl_sum"] / tokens,
        "loss/entropy": total["entropy_sum"] / tokens,
        "loss/token_mult_prob_error": total["mult_prob_error_sum"] / tokens,
        "loss/grad_norm": total["grad_norm_sum"] / world_size / updates,
        "loss/trained_tokens": total["tokens"],
        "perf/tokens": total["all_tokens"],
        "perf/updates": updates,
        "perf/fwd_bwd_s": peaks[1],
        "perf/optimizer_s": peaks[2],
    }
