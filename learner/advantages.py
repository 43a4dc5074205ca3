"""Group-relative advantages and reward shaping, as small pure functions (the policy loss is learner/loss.py).

- Advantages (GRPO): `r - baseline`, where the baseline is the group mean or, as the NeMo RL DAPO tutorial runs,
  the leave-one-out mean of the *other* samples (RLOO); optionally divided by the std of the same set, with
  Bessel's correction (`grpo.normalize_rewards`), exactly as NeMo RL's `calculate_baseline_and_std_per_prompt`.
  Dr.GRPO is `normalize_rewards: false` plus the constant-length aggregation of learner/loss.py.
- Overlong handling (DAPO): the soft overlong penalty added to the reward (`grpo.reward_shaping`).

tests/unit/test_loss.py asserts NeMo RL's published test values. Shapes: N samples of one group.
"""

from __future__ import annotations

import torch


def group_baseline_and_std(rewards: torch.Tensor, *, leave_one_out: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample baseline and std of a group, as NeMo RL's `calculate_baseline_and_std_per_prompt` defines them
    (NVIDIA-NeMo/RL, nemo_rl/algorithms/utils.py; its tests/unit/algorithms/test_utils.py values are ours).

    The set of sample i is the other N-1 samples (leave-one-out, RLOO) or the whole group. The std is the sample
    std of that set, with Bessel's correction (divide by |set| - 1, as NeMo RL since its PR #1423 and
    `torch.std`); a set of one sample has none and gets std 0 (NeMo RL: its NaN becomes 0).

    Args:
        rewards: [..., N] rewards of the N samples of each group, N >= 2.

    Returns:
        (baseline [..., N], std [..., N]).
    """
    n = rewards.shape[-1]
    size = n - 1 if leave_one_out else n  # samples in each baseline's set
    total = rewards.sum(-1, keepdim=True)  # [..., 1]
    total_sq = rewards.square().sum(-1, keepdim=True)  # [..., 1]
    if leave_one_out:
        baseline = (total - rewards) / size  # [..., N]
        second_moment = (total_sq - rewards.square()) / size  # [..., N]
    else:
        baseline = (total / size).expand_as(rewards)  # [..., N]
        second_moment = (total_sq / size).expand_as(rewards)  # [..., N]
    if size < 2:
        return baseline, torch.zeros_like(rewards)
    variance = (second_moment - baseline.square()).clamp_min(0) * (size / (size - 1))  # [..., N] unbiased
    return baseline, variance.sqrt()


def group_advantages(
    rewards: torch.Tensor, *, leave_one_out: bool = True, normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages `r - baseline`, optionally `/ (std + eps)`, for one or several equal groups.

    Matches NeMo RL's GRPO (NVIDIA-NeMo/RL, nemo_rl/algorithms/grpo.py: `calculate_baseline_and_std_per_prompt`
    then `normalize_advantages_with_epsilon`): a sample whose std is 0 keeps its advantage unscaled, so a
    leave-one-out group like [1, 0, 0, 0] still gives the lone success +1.

    Args:
        rewards: [..., N] rewards of the N samples of each group.
        leave_one_out: baseline and std over the other N-1 samples (RLOO); else over the whole group.
        normalize: divide by the std (`grpo.normalize_rewards`); off for Dr.GRPO.
        eps: added to the std before dividing (NeMo RL's 1e-6).

    Returns:
        [..., N] advantages; all zeros for a group of one sample (NeMo RL: baseline = reward).
    """
    if rewards.shape[-1] < 2:
        return torch.zeros_like(rewards)
    baseline, std = group_baseline_and_std(rewards, leave_one_out=leave_one_out)  # [..., N] each
    advantages = rewards - baseline  # [..., N]
    if not normalize:
        return advantages
    return torch.where(std > 0, advantages / (std + eps), advantages)


def overlong_penalty(
    lengths: torch.Tensor, *, max_response_length: int, buffer_length: int, penalty: float
) -> torch.Tensor:
    """DAPO soft overlong punishment, to be added to the reward, as NeMo RL's `grpo.reward_shaping` computes it
    (NVIDIA-NeMo/RL, nemo_rl/algorithms/reward_functions.py `apply_reward_shaping`).

    Zero up to `max_response_length - buffer_length`, then falls linearly, reaching `-penalty` at
    `max_response_length`. Beyond it the line goes on (NeMo RL has no floor; the DAPO paper's -1 for longer
    completions is the same thing when generation stops at `max_response_length`, as it does in both).

    Args:
        lengths: [B] completion lengths in tokens.

    Returns:
        [B] float penalties (<= 0).
    """
    start = max_response_length - buffer_length
    excess = (lengths.float() - start).clamp(min=0)  # [B]
    return -penalty * excess / max(buffer_length, 1)
