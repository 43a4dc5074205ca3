"""Batch assembly, admission filters and feeder backpressure (learner/batch.py); pure parts only."""

from __future__ import annotations

import numpy as np
import pytest

from broker.schemas import Array, Prompt, RolloutGroup, Sample, ScoredGroup
from learner.batch import TrainSample, admission, assemble, group_to_samples, shaped_rewards, shard
from learner.config import GRPOConfig, RewardShapingConfig
from learner.rollout_io import Feeder


def make_group(rewards, *, version=0, lengths=None, finish=None, prompt_len=3, gid="p0@b0") -> ScoredGroup:
    n = len(rewards)
    lengths = lengths or [2] * n
    finish = finish or ["stop"] * n
    samples = [
        Sample(
            token_ids=Array.from_numpy(np.arange(length) + 10, "int32"),
            logprobs=Array.from_numpy(np.full(length, -0.5), "float32"),
            finish_reason=f,
        )
        for length, f in zip(lengths, finish, strict=True)
    ]
    prompt = Prompt(
        prompt_id=gid.split("@")[0], token_ids=Array.from_numpy(np.arange(prompt_len), "int32"), ground_truth="1"
    )
    rollout = RolloutGroup(
        group_id=gid, batch_id="b0", prompt=prompt, samples=samples, policy_version=version, worker_id="w"
    )
    return ScoredGroup(rollout=rollout, rewards=Array.from_numpy(rewards, "float32"), verdicts=["correct"] * n)


def test_admission_staleness_window_and_dynamic_sampling():
    r = np.array([1.0, 0.0])
    assert admission(3, 3, r, max_staleness=0, dynamic_sampling=False) is None
    assert admission(2, 3, r, max_staleness=0, dynamic_sampling=False) == "stale"
    assert admission(1, 3, r, max_staleness=2, dynamic_sampling=False) is None
    assert admission(0, 3, r, max_staleness=2, dynamic_sampling=False) == "stale"
    assert admission(5, 3, r, max_staleness=0, dynamic_sampling=False) is None  # newer: a discarded timeline
    assert admission(3, 3, np.ones(4), max_staleness=0, dynamic_sampling=True) == "zero_variance"
    assert admission(3, 3, np.ones(4), max_staleness=0, dynamic_sampling=False) is None


def test_group_to_samples_advantages_and_overlong_filter():
    cfg = GRPOConfig(normalize_rewards=False, overlong_filtering=True)
    group = make_group([1.0, 0.0, 0.0, 1.0], lengths=[2, 3, 2, 4], finish=["stop", "length", "stop", "stop"])
    samples = group_to_samples(group, cfg, max_total_len=100)
    assert [round(s.advantage, 4) for s in samples] == [0.6667, -0.6667, -0.6667, 0.6667]
    assert [s.trainable for s in samples] == [True, False, True, True]
    assert samples[3].input_ids.tolist() == [0, 1, 2, 10, 11, 12, 13]
    assert samples[3].prompt_len == 3 and samples[3].completion_len == 4


def test_samples_carry_the_temperature_their_group_was_sampled_at():
    import msgspec

    group = make_group([1.0, 0.0])
    hot = msgspec.structs.replace(group, rollout=msgspec.structs.replace(group.rollout, temperature=0.7))
    assert {s.temperature for s in group_to_samples(hot, GRPOConfig(), 100)} == {0.7}
    assert {s.temperature for s in group_to_samples(group, GRPOConfig(), 100)} == {1.0}


def test_group_to_samples_cuts_to_the_length_budget():
    samples = group_to_samples(make_group([1.0, 0.0], lengths=[2, 6]), GRPOConfig(overlong_filtering=True), 6)
    assert [s.completion_len for s in samples] == [2, 3]
    assert len(samples[1].behaviour_logprobs) == 3
    assert [s.trainable for s in samples] == [True, False]  # cut by the budget counts as truncated


def test_overlong_reward_shaping():
    shaping = RewardShapingConfig(enabled=True, max_response_length=4, overlong_buffer_length=2)
    rewards = shaped_rewards(make_group([1.0, 1.0, 1.0], lengths=[2, 3, 4]), GRPOConfig(reward_shaping=shaping))
    np.testing.assert_allclose(rewards, [1.0, 0.5, 0.0])


def _sample(length: int, trainable=True) -> TrainSample:
    return TrainSample("g", np.zeros(length, dtype=np.int64), 1, np.zeros(length - 1, np.float32), 1.0, trainable)


def test_shard_balances_tokens_and_assemble_carries_global_normalisers():
    samples = [_sample(n) for n in (10, 9, 2, 2, 1, 1)] + [_sample(5, trainable=False)]
    parts = shard(samples, 2)
    sizes = [sum(len(s.input_ids) for s in p) for p in parts]
    assert sum(sizes) == 30 and abs(sizes[0] - sizes[1]) <= 2
    per_rank = assemble(samples, 2, None)
    assert len(per_rank) == 2 and all(len(r) == 1 for r in per_rank)
    assert per_rank[0][0].num_tokens == per_rank[1][0].num_tokens == (9 + 8 + 1 + 1 + 0 + 0)
    assert per_rank[0][0].num_sequences == 6
    assert sum(len(r[0].samples) for r in per_rank) == 7


def test_assemble_splits_updates_by_global_batch_size():
    per_rank = assemble([_sample(3) for _ in range(8)], 2, 4)
    assert [len(r) for r in per_rank] == [2, 2]
    assert all(mb.num_sequences == 4 and mb.num_tokens == 8 for r in per_rank for mb in r)


def test_assemble_skip_inert_keeps_the_normalisers_of_the_whole_update():
    cfg = GRPOConfig()  # leave-one-out, normalised
    samples = [s for g in ([1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0] * 4) for s in group_to_samples(
        make_group(g), cfg, 100)]  # fmt: skip
    samples[5].trainable = False
    full = assemble(samples, 1, None)[0][0]
    lean = assemble(samples, 1, None, skip_inert=True)[0][0]
    assert len(full.samples) == 12
    assert lean.samples == [samples[4], samples[6], samples[7]]  # the varied group, less the untrainable one
    assert (lean.num_tokens, lean.num_sequences) == (full.num_tokens, full.num_sequences) == (22.0, 11.0)


def test_feeder_backpressure_and_idempotent_replay():
    published: dict[str, object] = {}
    calls = []

    def publish(items):
        calls.append(len(items))
        added = [key not in published for key, _ in items]
        published.update((key, message) for key, message in items if key not in published)
        return added

    def prompt_at(i):
        return Prompt(prompt_id=f"p{i}", token_ids=Array.from_numpy([1, 2], "int32"), ground_truth="x")

    cfg = GRPOConfig(num_prompts_per_step=4, max_staleness=1, prompts_per_message=3, num_generations_per_prompt=2)
    feeder = Feeder(publish, prompt_at, 5, cfg, run="r")
    assert feeder.top_up(0) == 8 and feeder.in_flight == 8  # (1 + 1) x 4
    assert calls == [3]  # messages of 3, 3 and 2 prompts, published together
    assert feeder.top_up(0) == 0
    feeder.in_flight -= 2
    assert feeder.top_up(1) == 2
    ids = [p.prompt_id for m in published.values() for p in m.prompts]
    assert len(ids) == 10 and set(ids[:5]) == set(ids[5:]) == {f"p{i}" for i in range(5)}  # two shuffled epochs
    replay = Feeder(publish, prompt_at, 5, cfg, run="r")
    replay.top_up(0)
    assert len(published) == 4  # a restart from cursor 0 re-sends nothing


def test_feeder_rejects_empty_data():
    with pytest.raises(ValueError, match="no examples"):
        Feeder(lambda items: [True] * len(items), lambda i: None, 0, GRPOConfig(), run="r")


def test_feeder_skips_prompts_with_no_room_to_answer():
    published = []

    def prompt_at(i):
        ids = [1] * (10 if i % 2 else 2)
        return Prompt(prompt_id=f"p{i}", token_ids=Array.from_numpy(ids, "int32"), ground_truth="x")

    cfg = GRPOConfig(num_prompts_per_step=2, prompts_per_message=2, num_generations_per_prompt=2)
    publish = lambda items: [published.append(m) or True for _, m in items]  # noqa: E731
    feeder = Feeder(publish, prompt_at, 6, cfg, run="r", shuffle=False, max_prompt_tokens=8)
    assert feeder.top_up(0) == 2 and feeder.in_flight == 2
    assert all(len(p.token_ids) == 2 for m in published for p in m.prompts)
    assert feeder.skipped == 1 and feeder.cursor == 3  # one full message [p0, p2]: p1 skipped
    assert [p.prompt_id for p in published[0].prompts] == ["p0", "p2"]
    never = Feeder(lambda items: [True] * len(items), lambda i: prompt_at(1), 3, cfg, run="r", max_prompt_tokens=8)
    with pytest.raises(ValueError, match="no training prompt"):
        never.top_up(0)
