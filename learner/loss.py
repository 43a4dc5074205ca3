"""GRPO / DAPO policy-gradient loss as small pure functions.

Variants implemented (each selected by a knob of `learner.config`, named after NeMo RL's); each function's
docstring names the peer function it matches (repository, file, function), and tests/unit/test_loss.py asserts
the peers' published test values where they exist:

- Advantages and the overlong reward penalty: learner/advantages.py (GRPO/RLOO baselines with NeMo RL's Bessel-
  corrected std, DAPO's soft overlong penalty). Overlong filtering (a truncated sample keeps its place in its
  group's baseline but gets no gradient) happens when the batch is assembled (learner/batch.py).
- Surrogate: PPO clipped ratio with separate low/high bounds (DAPO clip-higher), optional dual clip
  (`ratio_clip_c`) for negative advantages.
- Off-policy correction against the behaviour (vLLM) logprobs, with the ratio taken against the learner's
  own proximal logprobs: truncated importance sampling (TIS: weight `min(pi_prox / pi_behav, cap)`), or the
  decoupled PPO objective (AReaL: same weight, tokens above the cap zeroed instead of truncated).
- Aggregation: token-level (DAPO, default: every token of the step weighs the same), sequence-level (original
  GRPO: mean per sequence, then mean over sequences), or constant normaliser (Dr.GRPO: token sum divided by
  sequences x a fixed length). Normalisers are global (whole step, all ranks) so micro-batching and data
  parallelism do not change the objective.
- Optional KL to a reference policy (Schulman's k3 estimator, NeMo RL's clamps), 0 by default as in the tutorial.

Not implemented (the config accepts only their off values): GSPO's sequence-level ratios, NeMo RL's on-policy
KL approximation, ICE-POP and seq-mask-TIS.

Shapes: B sequences, T completion positions (right-padded), V vocabulary, N samples of one group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Aggregation = Literal["token", "sequence", "constant"]
"""How token losses become one scalar; see `aggregate`."""

KL_INPUT_CLAMP = 20.0
KL_OUTPUT_CLAMP = 10.0
"""NeMo RL's `loss_fn.kl_input_clamp_value` / `kl_output_clamp_value` in its GRPO configs: a token whose logprob
the reference puts near -inf would otherwise give exp(d) overflow and one token's KL would swamp the step."""


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


def kl_k3(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    input_clamp: float | None = KL_INPUT_CLAMP,
    output_clamp: float | None = KL_OUTPUT_CLAMP,
) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate `exp(d) - d - 1` with `d = ref - pi` (Schulman 2020), always >= 0.

    As NeMo RL's `calculate_kl(kl_type="k3")` (NVIDIA-NeMo/RL, nemo_rl/algorithms/utils.py), with its clamps:
    `d` to [-input_clamp, input_clamp] and the estimate to at most `output_clamp` (None: no clamp).

    Args:
        logprobs, ref_logprobs: [B, T].

    Returns:
        [B, T].
    """
    d = ref_logprobs - logprobs  # [B, T]
    if input_clamp is not None:
        d = d.clamp(-input_clamp, input_clamp)
    kl = d.exp() - d - 1  # [B, T]
    return kl if output_clamp is None else kl.clamp(max=output_clamp)


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

    As NeMo RL's `ClippedPGLossFn` (NVIDIA-NeMo/RL, nemo_rl/algorithms/loss_functions.py): `max(-A r,
    -A clip(r, 1 - ratio_clip_min, 1 + ratio_clip_max))`, then for A < 0 `min(that, -A c)` (`ratio_clip_c`).

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

    "truncate" is NeMo RL's TIS (NVIDIA-NeMo/RL, nemo_rl/algorithms/loss_functions.py `ClippedPGLossFn`,
    `truncated_importance_sampling_type: tis`), NaN/inf weights set to 0 as there. "mask" is AReaL's decoupled
    PPO behaviour weight (inclusionAI/AReaL, `ppo_actor_loss_fn`, `behav_imp_weight_cap`): a token above the cap
    gets weight 0 but stays in the loss's token count.

    Args:
        prox_logprobs: [B, T] learner logprobs before this step's update (no gradient).
        behaviour_logprobs: [B, T] logprobs the generation engine reported.
        cap: upper bound on the weight; None for none.
        mode: "truncate" (TIS: weights above `cap` become `cap`) or "mask" (decoupled PPO: tokens whose weight
            exceeds `cap` get weight 0).

    Returns:
        (weights [B, T], keep [B, T] float 0/1: the tokens whose weight was not zeroed by the cap).
    """
    weights = (prox_logprobs.detach() - behaviour_logprobs).exp()  # [B, T]
    weights = torch.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0)  # [B, T]
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

    "token" and "sequence" are NeMo RL's `loss_fn.token_level_loss` true/false (NVIDIA-NeMo/RL,
    nemo_rl/algorithms/loss_functions.py `ClippedPGLossFn`: `masked_mean` over the global valid tokens, or the
    per-sequence masked mean over the global valid sequences). "constant" is Dr.GRPO's (sail-sg/understand-r1-zero,
    train_zero_math.py: `masked_sum` with `constant_normalizer=generate_max_length`, averaged over sequences).

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
    """Train/inference mismatch as NeMo RL defines it (`ClippedPGLossFn`'s `token_mult_prob_error`): mean over
    valid tokens of exp(|lp_gen - lp_train|).

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
        # Zeroed, not removed: the token still counts in the normalisers, as in AReaL.
        weights, _ = importance_weights(
            prox_logprobs, behaviour_logprobs, cap=settings.decoupled_ppo_weight_cap, mode="mask"
        )
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
