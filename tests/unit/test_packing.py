"""Sequence packing (learner/packing.py) and the forward's fast paths (learner/kernels.py) on a tiny random Qwen3
in float32 on the CPU: packed micro-batches give the padded ones' logprobs, loss and gradients; chunked LM-head
logprobs give the one-pass values and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.batch import TrainSample, assemble
from learner.kernels import chunked_logprobs, use_varlen_attention
from learner.loss import LossSettings, logprobs_and_entropy
from learner.packing import collate, collate_packed, plan_packs
from learner.step import ForwardSettings, PolicyLogprobs, Trainer


def tiny_qwen3(seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                      tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")


def samples(n: int = 9, seed: int = 0) -> list[TrainSample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt_len, completion_len = int(rng.integers(2, 7)), int(rng.integers(1, 14))
        ids = rng.integers(0, 97, size=prompt_len + completion_len)
        behaviour = -rng.random(completion_len).astype(np.float32) * 3
        out.append(TrainSample(f"g{i // 3}", ids, prompt_len, behaviour, float(rng.normal()), trainable=i != 4))
    return out


def test_plan_packs_is_first_fit_decreasing_within_the_budget():
    lengths = [5, 9, 3, 7, 2, 8, 4, 12]
    packs = plan_packs(lengths, 10)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    for pack in packs:
        assert sum(lengths[i] for i in pack) <= 10 or len(pack) == 1  # 12 > budget: a pack of its own
    # Longest first, each into the first pack with room: 12 | 9 | 8 + 2 | 7 + 3 | 5 + 4.
    assert [[lengths[i] for i in p] for p in packs] == [[12], [9], [8, 2], [7, 3], [5, 4]]
    assert plan_packs([], 10) == []


def test_packed_rows_restart_positions_and_keep_the_trained_tokens():
    batch = samples(4)
    packed, padded = collate_packed(batch, torch.device("cpu")), collate(batch, torch.device("cpu"))
    lengths = [len(s.input_ids) for s in batch]
    assert packed.input_ids.shape == (1, sum(lengths)) and packed.attention_mask is None
    assert packed.cu_seqlens.tolist() == [0, *np.cumsum(lengths).tolist()]
    assert packed.cu_seqlens.dtype == torch.int32 and packed.max_seqlen == max(lengths)
    assert packed.position_ids[0].tolist() == [p for n in lengths for p in range(n)]
    assert packed.num_tokens == padded.num_tokens == sum(lengths)
    # The same next tokens train, in the same (sample, position) order.
    targets = packed.input_ids[:, 1:][packed.pred_mask[:, :-1]]
    assert torch.equal(targets, padded.input_ids[:, 1:][padded.pred_mask[:, :-1]])
    for key in ("comp_mask", "loss_mask", "behaviour", "advantages"):
        assert torch.equal(getattr(packed, key), getattr(padded, key))


def test_packed_logprobs_equal_padded_logprobs():
    padded_model, packed_model = tiny_qwen3().eval(), tiny_qwen3().eval()
    use_varlen_attention(packed_model)
    batch = samples(6)
    with torch.no_grad():
        expected, ent_expected = PolicyLogprobs(padded_model)(**collate(batch, torch.device("cpu")).model_inputs())
        got, ent = PolicyLogprobs(packed_model)(**collate_packed(batch, torch.device("cpu")).model_inputs())
    assert got.shape == (sum(s.completion_len for s in batch),)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("settings", [LossSettings(), LossSettings(aggregation="sequence")], ids=["token", "seq"])
def test_packed_step_matches_the_padded_step(settings):
    """Loss, statistics and the gradient (read off an SGD step of lr 1) agree within 1e-5."""
    results = []
    for forward in (ForwardSettings(), ForwardSettings(pack_tokens=24, logprob_chunk=5)):
        model = tiny_qwen3()
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        trainer = Trainer(model, opt, settings, world_size=1, micro_batch_size=3, max_grad_norm=None,
                          device=torch.device("cpu"), forward=forward)  # fmt: skip
        stats, _ = trainer.train(assemble(samples(), 1, None)[0])
        grads = [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]
        results.append((stats, grads))
    (padded, g_padded), (packed, g_packed) = results
    for key in ("loss_sum", "pg_loss_sum", "tokens", "ratio_sum", "entropy_sum", "all_tokens"):
        assert packed[key] == pytest.approx(padded[key], abs=1e-5, rel=1e-5), key
    for a, b in zip(g_packed, g_padded, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert any(float(g.abs().max()) > 1e-4 for g in g_padded)  # the comparison is not between zeros


def test_chunked_logprobs_match_one_pass_values_and_gradients():
    torch.manual_seed(1)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(53, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 53, (37,))
    upstream = torch.randn(37, dtype=torch.float64)
    lp, ent = chunked_logprobs(hidden, weight, targets, chunk=8)
    (lp * upstream).sum().backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    lp_ref, ent_ref = logprobs_and_entropy(hidden @ weight.T, targets)
    (lp_ref * upstream).sum().backward()
    torch.testing.assert_close(lp, lp_ref.float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, ent_ref.float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_hidden, hidden.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_weight, weight.grad, atol=1e-6, rtol=1e-6)
    assert not ent.requires_grad


@pytest.mark.parametrize("forward", [ForwardSettings(), ForwardSettings(pack_tokens=24, logprob_chunk=5)],
                         ids=["padded", "packed-chunked"])  # fmt: skip
def test_logprobs_are_taken_at_each_samples_sampling_temperature(forward):
    """vLLM reports log pi at the sampling temperature (softmax(logits / T)); the learner's must be the same
    distribution, or every importance ratio of a run at T != 1 compares two different policies."""
    import dataclasses

    temps = [0.6, 1.0, 1.3, 0.6, 1.0, 0.8]
    batch = [dataclasses.replace(s, temperature=t) for s, t in zip(samples(6), temps, strict=True)]
    model = tiny_qwen3().eval()
    if forward.pack_tokens is not None:
        use_varlen_attention(model)
    micro = (collate_packed if forward.pack_tokens else collate)(batch, torch.device("cpu"))
    assert micro.temperature is not None and micro.temperature.shape == (sum(s.completion_len for s in batch),)
    with torch.no_grad():
        got, _ = PolicyLogprobs(model, forward.logprob_chunk)(**micro.model_inputs())
        expected = []
        for s in batch:
            logits = model(input_ids=torch.from_numpy(s.input_ids)[None]).logits[0]  # [L, V]
            logp = torch.log_softmax(logits[s.prompt_len - 1 : -1] / s.temperature, -1)  # [C, V]
            expected.append(logp.gather(-1, torch.from_numpy(s.input_ids[s.prompt_len :])[:, None])[:, 0])
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-5)
    # All at 1: no scaling tensor, the unscaled logprobs.
    assert collate(samples(6), torch.device("cpu")).temperature is None
