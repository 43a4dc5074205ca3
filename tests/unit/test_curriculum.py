"""Retiring solved prompts (learner/curriculum.py) in the feeder, and through a real Redis scored stream."""

from __future__ import annotations

import numpy as np

from broker.connection import connect
from broker.keys import Keys
from broker.schemas import Array, Prompt, RolloutGroup, Sample, ScoredGroup
from broker.streams import StreamConsumer, StreamProducer
from learner.config import GRPOConfig
from learner.curriculum import SolvedPrompts
from learner.rollout_io import Collector, Feeder


def scored(prompt_id: str, verdicts: list[str], *, batch: str = "b0", purpose: str = "train") -> ScoredGroup:
    n = len(verdicts)
    prompt = Prompt(prompt_id=prompt_id, token_ids=Array.from_numpy([1, 2], "int32"), ground_truth="1")
    samples = [
        Sample(
            token_ids=Array.from_numpy([5, 6], "int32"),
            logprobs=Array.from_numpy([-0.5, -0.5], "float32"),
            finish_reason="stop",
        )
        for _ in range(n)
    ]
    rollout = RolloutGroup(
        group_id=f"{prompt_id}@{batch}", batch_id=batch, prompt=prompt, samples=samples, policy_version=0,
        worker_id="w", purpose=purpose,
    )  # fmt: skip
    rewards = np.array([1.0 if v == "correct" else 0.0 for v in verdicts])
    return ScoredGroup(rollout=rollout, rewards=Array.from_numpy(rewards, "float32"), verdicts=verdicts)


ALL = ["correct"] * 4
ONE_WRONG = ["correct", "correct", "incorrect", "correct"]


def recorder(out: list):
    """A feeder's `publish` that keeps the messages in `out`."""
    return lambda items: [out.append(message) or True for _, message in items]


def prompt_at(i: int) -> Prompt:
    return Prompt(prompt_id=f"p{i}", token_ids=Array.from_numpy([1, 2], "int32"), ground_truth="x")


def test_a_prompt_retires_after_its_streak_of_all_correct_groups_and_a_miss_restarts_the_streak():
    solved = SolvedPrompts(after=2, num_examples=10)
    solved.observe(scored("p1", ALL))
    solved.observe(scored("p1", ONE_WRONG))  # the streak starts again
    solved.observe(scored("p1", ALL))
    assert not solved.is_retired("p1")
    solved.observe(scored("p1", ALL))
    assert solved.is_retired("p1")
    solved.observe(scored("p2", ["incorrect"] * 4))  # all wrong: no signal either, but a later policy may solve it
    solved.observe(scored("p2", ["incorrect"] * 4))
    solved.observe(scored("p3", ALL, purpose="val"))  # validation is never a training prompt
    solved.observe(scored("p3", ALL, purpose="val"))
    assert list(solved.retired) == ["p1"] and solved.metrics()["data/retired_prompts"] == 1.0
    off = SolvedPrompts(after=0, num_examples=10)
    for _ in range(5):
        off.observe(scored("p1", ALL))
    assert not off.retired and not off.streaks

    again = SolvedPrompts(after=2, num_examples=10)
    again.restore(solved.state())
    assert list(again.retired) == ["p1"]
    again.observe(scored("p4", ALL))
    again.observe(scored("p4", ALL))
    assert list(again.retired) == ["p1", "p4"]
    fresh = SolvedPrompts(after=2, num_examples=10)
    fresh.restore(None)  # a checkpoint written before retiring existed
    assert not fresh.retired


def test_past_the_cap_the_prompt_retired_longest_ago_returns_to_the_pool():
    solved = SolvedPrompts(after=1, num_examples=4, max_fraction=0.5)
    for pid in ("p0", "p1", "p2"):
        solved.observe(scored(pid, ALL))
    assert list(solved.retired) == ["p1", "p2"] and solved.returned == 1 and not solved.resets
    solved.observe(scored("p0", ALL))  # back in the pool, solved again: its streak started over
    assert list(solved.retired) == ["p2", "p0"] and solved.metrics()["data/retired_returned"] == 2.0


def test_the_feeder_fills_each_message_past_retired_prompts_and_refills_the_pool_when_all_are_retired():
    published = []
    cfg = GRPOConfig(num_prompts_per_step=3, prompts_per_message=3, num_generations_per_prompt=4,
                     retire_solved_after=1, retire_max_fraction=1.0)  # fmt: skip
    feeder = Feeder(recorder(published), prompt_at, 6, cfg, run="r", shuffle=False)
    for pid in ("p0", "p2"):
        feeder.solved.observe(scored(pid, ALL))
    assert feeder.top_up(0) == 3
    assert [p.prompt_id for p in published[0].prompts] == ["p1", "p3", "p4"]
    assert feeder.cursor == 5 and feeder.retired_skips == 2

    for pid in ("p1", "p3", "p4", "p5"):  # every prompt solved: the run keeps training on all of them
        feeder.solved.observe(scored(pid, ALL))
    feeder.in_flight = 0
    assert feeder.top_up(1) == 3
    assert [p.prompt_id for p in published[1].prompts] == ["p5", "p0", "p1"]
    assert feeder.solved.resets == 1 and not feeder.solved.retired

    def short_even(i: int) -> Prompt:  # odd prompts leave no room to answer
        return Prompt(prompt_id=f"p{i}", token_ids=Array.from_numpy([1] * (9 if i % 2 else 2), "int32"),
                      ground_truth="x")  # fmt: skip

    sent = []
    tight = Feeder(recorder(sent), short_even, 4, cfg, run="r", shuffle=False,
                   max_prompt_tokens=8)  # fmt: skip
    for pid in ("p0", "p2"):  # what fits is retired, the rest is too long: the retired come back
        tight.solved.observe(scored(pid, ALL))
    assert tight.top_up(0) == 3 and tight.solved.resets == 1
    assert all(p.prompt_id in ("p0", "p2") for m in sent for p in m.prompts)


def test_the_collector_learns_what_is_solved_from_the_scored_stream_and_a_checkpoint_keeps_it(redis_url, run_name):
    r = connect(redis_url)
    keys = Keys(run_name)
    cfg = GRPOConfig(num_prompts_per_step=2, prompts_per_message=2, num_generations_per_prompt=4,
                     retire_solved_after=1)  # fmt: skip
    feeder = Feeder(lambda items: [True] * len(items), prompt_at, 4, cfg, run=run_name, shuffle=False)
    consumer = StreamConsumer(r, keys.scored, "learner", "learner-0", expected=ScoredGroup, dead_stream=keys.dead)
    consumer.ensure_group()
    collector = Collector(consumer, feeder, cfg, read_block_ms=50)
    StreamProducer(r, keys.scored).add_many([scored("p0", ALL), scored("p1", ONE_WRONG)])

    result = collector.collect(0, timeout_s=5)
    assert result is not None and len(result.groups) == 2
    assert list(feeder.solved.retired) == ["p0"]

    resumed = Feeder(lambda items: [True] * len(items), prompt_at, 4, cfg, run=run_name, shuffle=False)
    Collector(None, resumed, cfg).restore(collector.state())
    assert list(resumed.solved.retired) == ["p0"]
