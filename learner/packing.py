"""Micro-batches for the learner's forward: padded rows, or samples packed back to back up to a token budget.

Padded (`collate`): B samples right-padded to the longest, with an attention mask. Packed (`plan_packs` then
`collate_packed`): samples grouped by first-fit decreasing into packs of at most `budget` tokens, each pack one
row whose position ids restart at 0 per sample, with the sample boundaries (`cu_seqlens`) that
`learner.kernels.varlen_attention` needs. Packing computes no padding and needs no mask; random-length GRPO
completions padded in fours waste a fifth of the step (U[256, 1024] completions after a 256-token prompt).

Completion-side tensors (`comp_mask`, behaviour logprobs, ...) are [S, T] per sample in both layouts, in the
order of the samples in the micro-batch, which is also the row-major order of the trained positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from learner.batch import TrainSample


@dataclass
class Micro:
    """One micro-batch: B padded rows (`attention_mask` set) or one packed row (`cu_seqlens` set)."""

    input_ids: torch.Tensor  # int64 [B, L] (packed: [1, N], the samples back to back)
    attention_mask: torch.Tensor | None  # int64 [B, L]; None when packed
    pred_mask: torch.Tensor  # bool [B, L]: position t predicts completion token t+1
    comp_mask: torch.Tensor  # bool [S, T]: real completion slots
    loss_mask: torch.Tensor  # float [S, T]: slots that train (overlong-filtered samples are 0)
    behaviour: torch.Tensor  # float32 [S, T]
    prox: torch.Tensor | None  # float32 [S, T]
    advantages: torch.Tensor  # float32 [S]
    num_tokens: int = 0  # real (unpadded) tokens
    position_ids: torch.Tensor | None = None  # int64 [1, N]: restarting at 0 per sample (packed only)
    cu_seqlens: torch.Tensor | None = None  # int32 [S + 1]: sample boundaries in the row (packed only)
    max_seqlen: int = 0  # longest sample (packed only)
    # float32 [K]: the sampling temperature of each position pred_mask marks; None when every sample's is 1
    temperature: torch.Tensor | None = None

    def model_inputs(self) -> dict:
        """Keyword arguments of `learner.step.PolicyLogprobs.forward`."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "pred_mask": self.pred_mask,
            "position_ids": self.position_ids,
            "cu_seqlens": self.cu_seqlens,
            "max_seqlen": self.max_seqlen,
            "temperature": self.temperature,
        }


def plan_packs(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per pack, each pack at most `budget` tokens.

    A sample longer than the budget gets a pack of its own. Packs come fullest first; within a pack, longest first.
    """
    packs: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        n = lengths[i]
        for p, free in enumerate(room):
            if n <= free:
                packs[p].append(i)
                room[p] -= n
                break
        else:
            packs.append([i])
            room.append(budget - n)
    return packs


def collate(samples: list[TrainSample], device: torch.device, pad_id: int = 0) -> Micro:
    """Right-pad `samples` into one micro-batch."""
    b = len(samples)
    seq_len = max(len(s.input_ids) for s in samples)
    input_ids = np.full((b, seq_len), pad_id, dtype=np.int64)
    attention = np.zeros((b, seq_len), dtype=np.int64)
    pred = np.zeros((b, seq_len), dtype=bool)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n] = s.input_ids
        attention[i, :n] = 1
        pred[i, s.prompt_len - 1 : n - 1] = True
    return Micro(
        input_ids=torch.from_numpy(input_ids).to(device),
        attention_mask=torch.from_numpy(attention).to(device),
        pred_mask=torch.from_numpy(pred).to(device),
        num_tokens=int(attention.sum()),
        **_completion_side(samples, device),
    )


def collate_packed(samples: list[TrainSample], device: torch.device) -> Micro:
    """`samples` back to back in one row, position ids restarting per sample, no padding."""
    lengths = [len(s.input_ids) for s in samples]
    cu = np.zeros(len(samples) + 1, dtype=np.int32)
    cu[1:] = np.cumsum(lengths)
    pred = np.zeros((1, int(cu[-1])), dtype=bool)
    for s, start, n in zip(samples, cu[:-1].tolist(), lengths, strict=True):
        pred[0, start + s.prompt_len - 1 : start + n - 1] = True
    positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])[None]  # [1, N]
    return Micro(
        input_ids=torch.from_numpy(np.concatenate([s.input_ids for s in samples]).astype(np.int64)[None]).to(device),
        attention_mask=None,
        pred_mask=torch.from_numpy(pred).to(device),
        num_tokens=int(cu[-1]),
        position_ids=torch.from_numpy(positions).to(device),
        cu_seqlens=torch.from_numpy(cu).to(device),
        max_seqlen=max(lengths),
        **_completion_side(samples, device),
    )


def _completion_side(samples: list[TrainSample], device: torch.device) -> dict:
    """The [S, T] completion tensors of `samples` (right-padded to the longest completion) and [S] advantages."""
    b = len(samples)
    comp_len = max(max(s.completion_len for s in samples), 1)
    comp = np.zeros((b, comp_len), dtype=bool)
    behaviour = np.zeros((b, comp_len), dtype=np.float32)
    prox = np.zeros((b, comp_len), dtype=np.float32)
    for i, s in enumerate(samples):
        c = s.completion_len
        comp[i, :c] = True
        behaviour[i, :c] = s.behaviour_logprobs
        if s.prox_logprobs is not None:
            prox[i, :c] = s.prox_logprobs
    trainable = torch.tensor([s.trainable for s in samples], dtype=torch.float32)  # [S]
    comp_t = torch.from_numpy(comp)
    return {
        "comp_mask": comp_t.to(device),
        "loss_mask": (comp_t.float() * trainable[:, None]).to(device),
        "behaviour": torch.from_numpy(behaviour).to(device),
        "prox": torch.from_numpy(prox).to(device) if all(s.prox_logprobs is not None for s in samples) else None,
        "advantages": torch.tensor([s.advantage for s in samples], dtype=torch.float32, device=device),
        "temperature": _position_temperatures(samples, device),
    }


def _position_temperatures(samples: list[TrainSample], device: torch.device) -> torch.Tensor | None:
    """[K] sampling temperature per predicted position (each sample predicts its completion_len tokens, in
    sample order both padded and packed), or None when all are 1 (the logits need no scaling)."""
    if all(s.temperature == 1.0 for s in samples):
        return None
    temps = np.repeat(np.array([s.temperature for s in samples], dtype=np.float32), [s.completion_len for s in samples])
    return torch.from_numpy(temps).to(device)
