"""Each loss variant of learner/loss.py and learner/advantages.py against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from learner import advantages as A
from learner import loss as L

LN = math.log


def close(actual: torch.Tensor, expected, tol: float = 1e-4) -> None:
    torch.testing.assert_close(actual.float(), torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=tol)


def test_leave_one_out_baseline_without_std():
    # sample 0: others [0, 0, 1] -> baseline 1/3 -> A = 2/3; sample 1: others [1, 0, 1] -> 2/3 -> A = -2/3
    a = A.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), leave_one_out=True, normalize=False)
    close(a, [2 / 3, -2 / 3, -2 / 3, 2 / 3])


def test_leave_one_out_baseline_with_leave_one_out_std():
    # Others of sample 0 are [0, 0, 1]. The std has Bessel's correction, as NeMo RL's (PR #1423): var = (2/9) *
    # 3/2 = 1/3, A = (2/3) / sqrt(1/3) = 2/sqrt(3). This test used to assert the population value sqrt(2),
    # which made advantages 22 % larger than NeMo RL's at 4 samples per group.
    a = A.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), leave_one_out=True, normalize=True, eps=0.0)
    r = 2 / math.sqrt(3)
    close(a, [r, -r, -r, r])


# NeMo RL's published values: NVIDIA-NeMo/RL tests/unit/algorithms/test_utils.py,
# test_calculate_baseline_and_std_per_prompt_{basic,single_generation_per_prompt,identical_rewards,mixed_prompt_sizes}.


def test_baseline_and_std_match_nemo_rl_basic():
    baseline, std = A.group_baseline_and_std(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    close(baseline, [[2.5, 2.0, 1.5], [5.5, 5.0, 4.5]], tol=1e-5)
    close(std, [[0.707107, 1.414214, 0.707107], [0.707107, 1.414214, 0.707107]], tol=1e-5)  # std of [2, 3] etc.


def test_baseline_and_std_match_nemo_rl_identical_and_pairs():
    baseline, std = A.group_baseline_and_std(torch.tensor([[3.0, 3.0, 3.0], [7.0, 7.0, 7.0]]))
    close(baseline, [[3.0, 3.0, 3.0], [7.0, 7.0, 7.0]])
    close(std, torch.zeros(2, 3))
    baseline, std = A.group_baseline_and_std(torch.tensor([1.0, 2.0]))  # one other sample: no sample std
    close(baseline, [2.0, 1.0])
    close(std, [0.0, 0.0])
    close(A.group_advantages(torch.tensor([1.0, 2.0])), [-1.0, 1.0])  # std 0: left unscaled, as NeMo RL
    close(A.group_advantages(torch.tensor([2.5])), [0.0])  # a single generation: baseline = reward


def test_advantages_with_nemo_rl_values_and_epsilon():
    # A = (r - baseline) / (std + 1e-6), NeMo RL's normalize_advantages_with_epsilon
    a = A.group_advantages(torch.tensor([1.0, 2.0, 3.0]))
    close(a, [-1.5 / (0.707107 + 1e-6), 0.0, 1.5 / (0.707107 + 1e-6)], tol=1e-5)


def test_bessel_against_population_std_at_16_and_4_samples():
    # What the fix changes: population-std advantages were sqrt(m / (m - 1)) larger, m = N - 1 others.
    for n, ratio in ((16, math.sqrt(15 / 14)), (4, math.sqrt(3 / 2))):
        rewards = torch.zeros(n)
        rewards[: n // 2] = 1.0
        others = rewards[1:]
        population = (1.0 - others.mean()) / others.std(unbiased=False)
        close(A.group_advantages(rewards, eps=0.0)[0], population / ratio)
    assert round(math.sqrt(15 / 14), 3) == 1.035 and round(math.sqrt(3 / 2), 2) == 1.22


def test_mean_baseline_with_std_is_classic_grpo():
    # Whole-group mean and sample std (torch.std's default, NeMo RL with use_leave_one_out_baseline false):
    # std of [1, 0, 0, 1] = sqrt(1/3), A = 0.5 * sqrt(3).
    a = A.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 1.0, 3.0]]), leave_one_out=False, eps=0.0)
    r = math.sqrt(3) / 2
    close(a, [[r, -r, -r, r], [r, -r, -r, r]])
    close(a[0], (torch.tensor([1.0, 0.0, 0.0, 1.0]) - 0.5) / torch.tensor([1.0, 0.0, 0.0, 1.0]).std())


def test_dr_grpo_advantages_are_centred_only():
    a = A.group_advantages(torch.tensor([3.0, 1.0]), leave_one_out=False, normalize=False)
    close(a, [1.0, -1.0])


def test_zero_variance_and_singleton_groups_give_zero_advantage():
    close(A.group_advantages(torch.tensor([1.0, 1.0, 1.0])), [0.0, 0.0, 0.0])
    close(A.group_advantages(torch.tensor([1.0])), [0.0])


def test_overlong_penalty_ramps_over_the_buffer():
    # max 10, buffer 4 -> free up to 6, -1 at 10; beyond, the line goes on as NeMo RL's apply_reward_shaping
    # (min(-(L - 6) / 4 * penalty, 0)): -1.5 at 12
    p = A.overlong_penalty(torch.tensor([5, 6, 8, 10, 12]), max_response_length=10, buffer_length=4, penalty=1.0)
    close(p, [0.0, 0.0, -0.5, -1.0, -1.5])


def test_token_logprobs_and_entropy():
    logits = torch.tensor([[0.0, LN(3.0)]])  # probabilities 0.25, 0.75
    close(L.token_logprobs(logits, torch.tensor([1])), [LN(0.75)])
    close(L.entropy_from_logits(logits), [-(0.25 * LN(0.25) + 0.75 * LN(0.75))])


def test_logprobs_and_entropy_in_one_pass_match_the_separate_functions():
    logits = torch.randn(5, 7, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])
    lp, ent = L.logprobs_and_entropy(logits, targets)
    close(lp, L.token_logprobs(logits, targets))
    close(ent, L.entropy_from_logits(logits))
    assert lp.requires_grad and not ent.requires_grad


def test_clip_higher_uses_separate_bounds():
    # ratios 1.5 and 0.5 against clip range [0.8, 1.28]
    lp = torch.tensor([[LN(1.5), LN(0.5)], [LN(1.5), LN(0.5)]])
    adv = torch.tensor([1.0, -1.0])
    loss, clipped, ratio = L.clipped_surrogate(lp, torch.zeros(2, 2), adv, clip_low=0.2, clip_high=0.28)
    # A=+1: max(-1.5, -1.28) = -1.28 (clipped); max(-0.5, -0.8) = -0.5
    # A=-1: max(1.5, 1.28) = 1.5; max(0.5, 0.8) = 0.8 (clipped)
    close(loss, [[-1.28, -0.5], [1.5, 0.8]])
    assert clipped.tolist() == [[True, False], [False, True]]
    close(ratio, [[1.5, 0.5], [1.5, 0.5]])


def test_dual_clip_bounds_negative_advantage_loss():
    loss, _, _ = L.clipped_surrogate(
        torch.tensor([[LN(5.0)]]), torch.zeros(1, 1), torch.tensor([-1.0]), clip_low=0.2, clip_high=0.2, clip_c=3.0
    )
    close(loss, [[3.0]])  # min(max(5, 1.2), 3)


def test_truncated_importance_sampling_and_decoupled_mask():
    prox = torch.zeros(1, 2)
    behaviour = torch.tensor([[LN(0.25), LN(2.0)]])  # weights 4 and 0.5
    w, keep = L.importance_weights(prox, behaviour, cap=2.0, mode="truncate")
    close(w, [[2.0, 0.5]])
    close(keep, [[1.0, 1.0]])
    w, keep = L.importance_weights(prox, behaviour, cap=2.0, mode="mask")
    close(w, [[0.0, 0.5]])
    close(keep, [[0.0, 1.0]])
    w, _ = L.importance_weights(torch.zeros(1, 1), torch.tensor([[-1000.0]]), cap=None, mode="truncate")
    close(w, [[0.0]])  # overflow to inf becomes 0, as NeMo RL's nan_to_num


def test_aggregations():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    close(L.aggregate(per_token, mask, how="token"), 10 / 4)
    close(L.aggregate(per_token, mask, how="token", num_tokens=8), 10 / 8)  # global normaliser
    close(L.aggregate(per_token, mask, how="sequence"), (2 + 4) / 2)
    close(L.aggregate(per_token, mask, how="sequence", num_sequences=4), (2 + 4) / 4)
    close(L.aggregate(per_token, mask, how="constant", constant_length=5), 10 / (2 * 5))


def test_kl_k3_and_mismatch_metric():
    close(L.kl_k3(torch.zeros(1, 1), torch.tensor([[LN(0.5)]])), [[0.5 + LN(2) - 1]])
    # NeMo RL's calculate_kl clamps: d to [-20, 20], the estimate to <= 10
    close(L.kl_k3(torch.zeros(1, 2), torch.tensor([[-50.0, 5.0]])), [[10.0, 10.0]])
    close(L.kl_k3(torch.zeros(1, 1), torch.tensor([[-50.0]]), output_clamp=None), [[math.exp(-20) + 20 - 1]])
    close(L.kl_k3(torch.zeros(1, 1), torch.tensor([[5.0]]), output_clamp=None), [[math.exp(5) - 6]])
    mismatch = L.token_mult_prob_error(
        torch.tensor([[0.0, LN(0.5), 7.0]]), torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 0.0]])
    )
    close(mismatch, (1.0 + 2.0) / 2)  # exp(0), exp(ln 2); the masked token is ignored


def _on_policy_inputs():
    logprobs = torch.tensor([[LN(0.5), LN(0.25), 0.0], [LN(0.5), 0.0, 0.0]], requires_grad=True)
    behaviour = torch.tensor([[LN(0.5), LN(0.5), 0.0], [LN(0.25), 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    return logprobs, behaviour, torch.tensor([1.0, -2.0]), mask


def test_policy_loss_on_policy_token_level_value_and_gradient():
    logprobs, behaviour, adv, mask = _on_policy_inputs()
    loss, stats = L.policy_loss(logprobs, logprobs.detach(), behaviour, adv, mask, L.LossSettings())
    # ratio 1 everywhere: loss = -(1 + 1 - 2) / 3 tokens = 0; d loss / d logprob = -A / 3 on valid tokens
    close(loss, 0.0)
    loss.backward()
    close(logprobs.grad, [[-1 / 3, -1 / 3, 0.0], [2 / 3, 0.0, 0.0]])
    close(stats["tokens"], 3.0)
    close(stats["clipped_sum"], 0.0)
    # mismatch per token exp|diff|: 1, 2, 2 -> sum 5
    close(stats["mult_prob_error_sum"], 5.0)


def test_policy_loss_sequence_level():
    logprobs, behaviour, adv, mask = _on_policy_inputs()
    loss, _ = L.policy_loss(logprobs, logprobs.detach(), behaviour, adv, mask, L.LossSettings(aggregation="sequence"))
    loss.backward()
    # seq 0 has 2 tokens -> -1/2 each over 2 sequences; seq 1 one token -> +2 / 2
    close(logprobs.grad, [[-1 / 4, -1 / 4, 0.0], [1.0, 0.0, 0.0]])


def test_policy_loss_truncated_importance_sampling_weights_tokens():
    logprobs, behaviour, adv, mask = _on_policy_inputs()
    settings = L.LossSettings(use_importance_sampling_correction=True, truncated_importance_sampling_ratio=1.5)
    loss, stats = L.policy_loss(logprobs, logprobs.detach(), behaviour, adv, mask, settings)
    # weights pi_prox/pi_behav: 1, 0.5, 2 -> truncated to 1.5; loss = -(1*1 + 1*0.5 - 2*1.5) / 3 = 0.5
    close(loss, 0.5)
    close(stats["is_weight_sum"], 1 + 0.5 + 1.5)


def test_policy_loss_decoupled_ppo_masks_tokens_above_cap():
    logprobs, behaviour, adv, mask = _on_policy_inputs()
    settings = L.LossSettings(use_decoupled_ppo=True, decoupled_ppo_weight_cap=1.5)
    loss, stats = L.policy_loss(logprobs, logprobs.detach(), behaviour, adv, mask, settings, num_tokens=3)
    # weights 1, 0.5, 2 -> third token (A=-2) zeroed; loss = -(1 + 0.5) / 3
    close(loss, -0.5)
    close(stats["tokens"], 3.0)  # zeroed, still counted (AReaL divides by the loss mask's count)
    close(stats["is_weight_sum"], 1.5)
    loss, _ = L.policy_loss(logprobs, logprobs.detach(), behaviour, adv, mask, settings)
    close(loss, -0.5)  # the local token count is the same 3


def test_policy_loss_kl_penalty_and_constant_normaliser():
    logprobs, behaviour, adv, mask = _on_policy_inputs()
    ref = logprobs.detach() + LN(0.5)  # k3 per token = 0.5 + ln 2 - 1
    settings = L.LossSettings(reference_policy_kl_penalty=0.1, aggregation="constant", constant_length=4)
    loss, stats = L.policy_loss(logprobs, logprobs.detach(), behaviour, adv, mask, settings, ref_logprobs=ref)
    k3 = 0.5 + LN(2) - 1
    close(loss, (0.0 + 0.1 * 3 * k3) / (2 * 4))
    close(stats["kl_sum"], 3 * k3)


def test_policy_loss_needs_reference_when_kl_is_on():
    logprobs, behaviour, adv, mask = _on_policy_inputs()
    with pytest.raises(ValueError, match="ref_logprobs"):
        L.policy_loss(logprobs, logprobs.detach(), behaviour, adv, mask, L.LossSettings(reference_policy_kl_penalty=1))
