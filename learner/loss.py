"""GRPO / DAPO policy-gradient loss as small pure functions.

Variants implemented (each selected by a knob of `learner.config`, named after NeMo RL's):

- Advantages, group-relative (GRPO): `r - baseline`, where the baseline is the group mean or, as the NeMo RL
  DAPO tutorial runs, the leave-one-out mean of the *other* samples (RLOO); optionally divided by the group's
  std (`grpo.normalize_rewards`, the std of the same leave-one-out set as NeMo RL computes it). Dr.GRPO is
  `normalize_rewards: false` plus the constant-length aggregation below.
- Overlong handling (DAPO): soft overlong penalty added to the reward (`grpo.reward_shaping`), and overlong
  filtering (a truncated sample keeps its place in its group's baseline but gets no gradient).
- Surrogate: PPO clipped ratio with separate low/high bounds (DAPO clip-higher), optional dual clip
  (`ratio_clip_c`) for negative advantages.
- Off-policy correction against the behaviour (vLLM) logprobs, with the ratio taken against the learner's
  own proximal logprobs: truncated importance sampling (TIS: weight `min(pi_prox / pi_behav, cap)`), or the
  decoupled PPO objective (AReaL: same weight, tokens above the cap masked out instead of truncated).
- Aggregation: token-level (DAPO, default: every token of the step weighs the same), sequence-level (original
  GRPO: mean per sequence, then mean over sequences), or constant normaliser (Dr.GRPO: token sum divided by
  sequences x a fixed length). Normalisers are global (whole step, all ranks) so micro-batching and data
  parallelism do not change the objective.
- Optional KL to a reference policy (Schulman's k3 estimator), 0 by default as in the tutorial.

Shapes: B sequences, T completion positions (right-padded), V vocabulary, N samples of one group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Aggregation = Literal["token", "sequence", "constant"]
"""How token losses become one scalar; see `aggregate`."""


def group_advantages(
    rewards: torch.Tensor, *, leave_one_out: bool = True, normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages for the samples of one prompt (or of several equal-sized groups).

    Args:
        rewards: [..., N] rewards of the N samples of each group.
        leave_one_out: baseline of sample i is the mean of the other N-1 samples (RLOO); else the group mean.
        normalize: divide by the std of the same set the baseline is taken over (0 std leaves A unscaled).
        eps: added to the std before dividing.

    Returns:
        [..., N] advantages; all zeros for a group of one sample.
    """
    n = rewards.shape[-1]
    if n < 2:
        return torch.zeros_like(rewards)
    total = rewards.sum(-1, keepdim=True)  # [..., 1]
    total_sq = rewards.square().sum(-1, keepdim=True)  # [..., 1]
    if leave_one_out:
        baseline = (total - rewards) / (n - 1)  # [..., N]
        second_moment = (total_sq - rewards.square()) / (n - 1)  # [..., N]
    else:
        baseline = (total / n).expand_as(rewards)  # [..., N]
        second_moment = (total_sq / n).expand_as(rewards)  # [..., N]
    advantages = rewards - baseline  # [..., N]
    if not normalize:
        return advantages
    std = (second_moment - baseline.square()).clamp_min(0).sqrt()  # [..., N]
    return torch.where(std > 0, advantages / (std + eps), advantages)


def overlong_penalty(
    lengths: torch.Tensor, *, max_response_length: int, buffer_length: int, penalty: float
) -> torch.Tensor:
    """DAPO soft overlong punishment, to be added to the reward.

    Zero up to `max_response_length - buffer_length`, then falls linearly to `-penalty` at
    `max_response_length` (and stays there beyond it).

    Args:
        lengths: [B] completion lengths in tokens.

    Returns:
        [B] float penalties (<= 0).
    """
    start = max_response_length - buffer_length
    excess = (lengths.float() - start).clamp(min=0, max=buffer_length)  # [B]
    return -penalty * excess / max(buffer_length, 1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(target) at each position.

    Args:
        logits: [..., V] next-token logits (any float dtype; computed in float32).
        targets: [...] token ids.

    Returns:
        [...] float32 logprobs.
    """
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [...]
    return picked - torch.logsumexp(logits, dim=-1)  # [...]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution.

    Args:
        logits: [..., V].

    Returns:
        [...] entropy in nats.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [..., V]
    return -(logp.exp() * logp).sum(-1)  # [...]


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` and `entropy_from_logits` from one log-softmax pass over the vocabulary.

    Args:
        logits: [K, V]; targets: [K].

    Returns:
        (logprobs [K] with gradient, entropy [K] without).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [K, V]
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [K]
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)  # [K]
    return picked, entropy


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate `exp(d) - d - 1` with `d = ref - pi` (Schulman 2020), always >= 0.

    Args:
        logprobs, ref_logprobs: [B, T].

    Returns:
        [B, T].
    """
    d = ref_logprobs - logprobs  # [B, T]
    return d.exp() - d - 1


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate per token, negated into a loss, with clip-higher and optional dual clip.

    Args:
        logprobs: [B, T] current policy logprobs (carry the gradient).
        old_logprobs: [B, T] logprobs of the policy the trust region is centred on (no gradient).
        advantages: [B] or [B, T] advantages (a [B] tensor is broadcast over positions).
        clip_low, clip_high: ratio is clipped to [1 - clip_low, 1 + clip_high].
        clip_c: dual-clip bound (> 1) applied to tokens with negative advantage; None disables it.

    Returns:
        (loss [B, T], clipped [B, T] bool: the clipped branch was chosen, ratio [B, T]).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # [B, 1]
    ratio = (logprobs - old_logprobs.detach()).exp()  # [B, T]
    unclipped = -advantages * ratio  # [B, T]
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)  # [B, T]
    loss = torch.maximum(unclipped, clipped)  # [B, T]
    was_clipped = clipped > unclipped  # [B, T]
    if clip_c is not None:
        dual = -advantages * clip_c  # [B, T]
        loss = torch.where(advantages < 0, torch.minimum(loss, dual), loss)
    return loss, was_clipped, ratio


def importance_weights(
    prox_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, *, cap: float | None, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Off-policy weights pi_prox / pi_behaviour per token.

    Args:
        prox_logprobs: [B, T] learner logprobs before this step's update (no gradient).
        behaviour_logprobs: [B, T] logprobs the generation engine reported.
        cap: upper bound on the weight; None for none.
        mode: "truncate" (TIS: weights above `cap` become `cap`) or "mask" (decoupled PPO: tokens whose weight
            exceeds `cap` are dropped from the loss).

    Returns:
        (weights [B, T], keep [B, T] float 0/1 mask of tokens that stay in the loss).
    """
    weights = (prox_logprobs.detach() - behaviour_logprobs).exp()  # [B, T]
    keep = torch.ones_like(weights)  # [B, T]
    if cap is None:
        return weights, keep
    if mode == "truncate":
        return weights.clamp(max=cap), keep
    if mode == "mask":
        keep = (weights <= cap).to(weights.dtype)  # [B, T]
        return weights * keep, keep
    raise ValueError(f"importance weight mode must be 'truncate' or 'mask', got {mode!r}")


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    *,
    how: Aggregation,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
    constant_length: int | None = None,
) -> torch.Tensor:
    """Reduce token losses to a scalar.

    Args:
        per_token: [B, T] loss per token.
        mask: [B, T] 0/1 valid tokens (padding and filtered samples are 0).
        how: "token": sum / num_tokens; "sequence": per-sequence mean, summed, / num_sequences;
            "constant" (Dr.GRPO): sum / (num_sequences * constant_length).
        num_tokens, num_sequences: global normalisers (whole step, every rank); default: this batch's counts.
            Sequences with no valid token count as sequences (they simply contribute 0).
        constant_length: the fixed length of the "constant" mode.

    Returns:
        [] scalar loss.
    """
    mask = mask.to(per_token.dtype)
    total = (per_token * mask).sum()
    if how == "token":
        denom = float(mask.sum().item()) if num_tokens is None else num_tokens
        return total / max(denom, 1.0)
    seqs = float(per_token.shape[0]) if num_sequences is None else num_sequences
    if how == "sequence":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)  # [B]
        return per_seq.sum() / max(seqs, 1.0)
    if how == "constant":
        if not constant_length:
            raise ValueError("constant aggregation needs constant_length")
        return total / max(seqs * constant_length, 1.0)
    raise ValueError(f"unknown aggregation {how!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [B, T] over `mask` [B, T] (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def token_mult_prob_error(behaviour_logprobs: torch.Tensor, learner_logprobs: torch.Tensor, mask: torch.Tensor):
    """Train/inference mismatch as NeMo RL defines it: mean over valid tokens of exp(|lp_gen - lp_train|).

    1.0 means the generation engine and the learner agree exactly.

    Args:
        behaviour_logprobs, learner_logprobs, mask: [B, T].

    Returns:
        [] scalar tensor.
    """
    error = (behaviour_logprobs - learner_logprobs.detach()).abs()  # [B, T]
    return masked_mean((error * mask).exp(), mask)


@dataclass(frozen=True)
class LossSettings:
    """The knobs `policy_loss` reads (built from `learner.config.LossConfig`)."""

    ratio_clip_min: float = 0.2
    ratio_clip_max: float = 0.2
    ratio_clip_c: float | None = None
    aggregation: Aggregation = "token"
    constant_length: int | None = None
    reference_policy_kl_penalty: float = 0.0
    use_importance_sampling_correction: bool = False
    truncated_importance_sampling_ratio: float | None = None
    use_decoupled_ppo: bool = False
    decoupled_ppo_weight_cap: float | None = 5.0


def policy_loss(
    logprobs: torch.Tensor,
    prox_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: LossSettings,
    *,
    ref_logprobs: torch.Tensor | None = None,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full per-micro-batch GRPO/DAPO loss.

    Args:
        logprobs: [B, T] current logprobs (gradient flows through these).
        prox_logprobs: [B, T] learner logprobs before the update (`logprobs.detach()` for one update per batch).
        behaviour_logprobs: [B, T] generation-engine logprobs.
        advantages: [B] per-sequence advantages.
        mask: [B, T] 0/1 tokens that train (padding, overlong-filtered samples are 0).
        settings: which variant.
        ref_logprobs: [B, T] reference-policy logprobs, needed when the KL penalty is > 0.
        num_tokens, num_sequences: global normalisers for `aggregate`.

    Returns:
        (scalar loss, stats): stats are sums over this micro-batch's valid tokens (`*_sum`), ready to be
        all-reduced and divided by the token count: pg loss, clipped tokens, ratio, IS weight, KL, mismatch.
    """
    mask = mask.to(logprobs.dtype)
    pg, was_clipped, ratio = clipped_surrogate(
        logprobs,
        prox_logprobs,
        advantages,
        clip_low=settings.ratio_clip_min,
        clip_high=settings.ratio_clip_max,
        clip_c=settings.ratio_clip_c,
    )
    weights = torch.ones_like(pg)  # [B, T]
    if settings.use_decoupled_ppo:
        weights, keep = importance_weights(
            prox_logprobs, behaviour_logprobs, cap=settings.decoupled_ppo_weight_cap, mode="mask"
        )
        mask = mask * keep
    elif settings.use_importance_sampling_correction:
        weights, _ = importance_weights(
            prox_logprobs, behaviour_logprobs, cap=settings.truncated_importance_sampling_ratio, mode="truncate"
        )
    per_token = pg * weights  # [B, T]
    kl = torch.zeros_like(pg)  # [B, T]
    if settings.reference_policy_kl_penalty > 0:
        if ref_logprobs is None:
            raise ValueError("reference_policy_kl_penalty > 0 needs ref_logprobs")
        kl = kl_k3(logprobs, ref_logprobs)
        per_token = per_token + settings.reference_policy_kl_penalty * kl
    loss = aggregate(
        per_token,
        mask,
        how=settings.aggregation,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        constant_length=settings.constant_length,
    )
    with torch.no_grad():
        mismatch = ((behaviour_logprobs - prox_logprobs.detach()).abs() * mask).exp()  # [B, T]
        stats = {
            "tokens": mask.sum(),
            "pg_loss_sum": (pg * mask).sum(),
            "clipped_sum": (was_clipped.to(mask.dtype) * mask).sum(),
            "ratio_sum": (ratio * mask).sum(),
            "ratio_max": (ratio * mask).max() if mask.any() else ratio.new_zeros(()),
            "is_weight_sum": (weights * mask).sum(),
            "kl_sum": (kl * mask).sum(),
            "mult_prob_error_sum": (mismatch * mask).sum(),
        }
    return loss, stats
