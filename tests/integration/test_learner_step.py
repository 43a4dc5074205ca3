"""`learner.step.Trainer` on a real tiny Qwen3 (one process): the loss variants run end to end, several updates per
step use the learner's pre-update logprobs, and the logprob forward agrees with a plain full-logits forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.batch import assemble
from learner.loss import LossSettings
from learner.step import STAT_KEYS, PolicyLogprobs, Trainer, collate, reduce_stats
from learner.train import load_model
from tests.integration.learner_support import random_train_samples


@pytest.fixture
def policy_dir(tiny_model_dir):
    return tiny_model_dir


def trainer(policy_dir, settings: LossSettings, reference=False) -> Trainer:
    model = load_model(policy_dir, "float32", torch.device("cpu"))
    ref = load_model(policy_dir, "float32", torch.device("cpu")).requires_grad_(False) if reference else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return Trainer(model, opt, settings, world_size=1, micro_batch_size=3, max_grad_norm=1.0,
                   device=torch.device("cpu"), reference=ref)  # fmt: skip


def test_completion_logprobs_match_a_full_forward(policy_dir):
    model = load_model(policy_dir, "float32", torch.device("cpu")).eval()
    batch = random_train_samples(4)
    micro = collate(batch, torch.device("cpu"))
    with torch.no_grad():
        flat, entropy = PolicyLogprobs(model)(micro.input_ids, micro.attention_mask, micro.pred_mask)
        logits = model(input_ids=micro.input_ids, attention_mask=micro.attention_mask).logits
    full = torch.log_softmax(logits[:, :-1], -1).gather(-1, micro.input_ids[:, 1:, None])[..., 0]
    expected = full[micro.pred_mask[:, :-1]]
    assert flat.shape == expected.shape == (sum(s.completion_len for s in batch),)
    torch.testing.assert_close(flat, expected, atol=1e-5, rtol=1e-5)
    assert bool((entropy > 0).all())


@pytest.mark.parametrize(
    "settings",
    [
        LossSettings(),
        LossSettings(ratio_clip_max=0.28, aggregation="sequence"),
        LossSettings(aggregation="constant", constant_length=16),
        LossSettings(use_importance_sampling_correction=True, truncated_importance_sampling_ratio=2.0),
        LossSettings(use_decoupled_ppo=True, decoupled_ppo_weight_cap=5.0, ratio_clip_c=3.0),
    ],
    ids=["dapo-token", "grpo-sequence", "dr-grpo", "tis", "decoupled"],
)
def test_each_variant_updates_the_policy(policy_dir, settings):
    t = trainer(policy_dir, settings)
    before = [p.detach().clone() for p in t.model.parameters()]
    stats, timings = t.train(assemble(random_train_samples(), 1, None)[0])
    metrics = reduce_stats(stats, timings, 1)
    assert np.isfinite(metrics["loss/total"]) and metrics["perf/updates"] == 1
    assert metrics["loss/ratio_mean"] == pytest.approx(1.0)  # one update per step: on-policy ratio
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters(), strict=True))
    trainable_tokens = sum(s.completion_len for s in random_train_samples() if s.trainable)
    if not settings.use_decoupled_ppo:
        assert metrics["loss/trained_tokens"] == trainable_tokens
    assert metrics["loss/token_mult_prob_error"] > 1.0  # behaviour logprobs are made up: a visible mismatch


def test_skipping_zero_advantage_samples_leaves_the_gradient_unchanged(policy_dir):
    samples = random_train_samples(12)
    for s in samples[:4]:  # one group whose rewards agreed
        s.advantage = 0.0
    grads = []
    for skip in (False, True):
        t = trainer(policy_dir, LossSettings(use_importance_sampling_correction=True))
        (mb,) = assemble(samples, 1, None, skip_inert=skip)[0]
        assert len(mb.samples) == (7 if skip else 12)  # sample 5 is not trainable either
        for chunk in t._chunks(mb.samples):  # forward and backward without the optimizer step
            t._micro_step(chunk, mb, dict.fromkeys((*STAT_KEYS, "ratio_max"), 0.0))
        grads.append(torch.cat([p.grad.flatten() for p in t.model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().max() > 0


def test_several_updates_per_step_move_the_ratio_and_kl(policy_dir):
    t = trainer(policy_dir, LossSettings(reference_policy_kl_penalty=0.1), reference=True)
    updates = assemble(random_train_samples(8), 1, 4)[0]
    stats, timings = t.train(updates)
    metrics = reduce_stats(stats, timings, 1)
    assert metrics["perf/updates"] == 2
    # The first update's prox logprobs are its own forward's (the step's starting weights); later ones need theirs.
    assert all(s.prox_logprobs is None for s in updates[0].samples)
    assert all(s.prox_logprobs is not None for s in updates[1].samples)
    # The second update sees the first one's change against the pre-step (proximal) logprobs and the reference.
    assert metrics["loss/ratio_max"] > 1.0
    assert metrics["loss/kl"] > 0.0


def test_bfloat16_compute_keeps_float32_master_weights(policy_dir):
    model = load_model(policy_dir, "float32", torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    t = Trainer(model, opt, LossSettings(), world_size=1, micro_batch_size=4, max_grad_norm=1.0,
                device=torch.device("cpu"), compute_dtype=torch.bfloat16)  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    stats, timings = t.train(assemble(random_train_samples(), 1, None)[0])
    assert np.isfinite(reduce_stats(stats, timings, 1)["loss/total"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # A 1e-6 step survives in float32; in bfloat16 most such updates would round back to the old weight.
    changed = sum(int((a != b).sum()) for a, b in zip(before, model.parameters(), strict=True))
    assert changed > 0.5 * sum(p.numel() for p in model.parameters() if p.requires_grad)
