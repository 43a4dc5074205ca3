"""Judge-aware admission (learner/admission.py) and the feeder's use of it (learner/rollout_io.py)."""

from __future__ import annotations

import pytest

from broker.schemas import Array, Prompt
from learner.admission import JudgeAdmission, admitted_window, ema, wait_steps
from learner.config import GRPOConfig
from learner.rollout_io import Feeder
from learner.runtime_config import AdmissionConfig


def test_wait_steps() -> None:
    assert wait_steps(3.0, 2.0) == 1.5
    assert wait_steps(3.0, 0.0) == 0.0  # no step timed yet
    assert wait_steps(0.0, 2.0) == 0.0


def test_the_whole_window_while_the_judges_keep_up() -> None:
    assert admitted_window(32, 16, waited_steps=5.0, allowance_steps=0.5, min_steps=1, judge_waiting=False) == 32
    assert admitted_window(32, 16, waited_steps=0.4, allowance_steps=0.5, min_steps=1, judge_waiting=True) == 32


def test_a_step_of_prompts_held_back_per_step_of_excess_wait() -> None:
    assert admitted_window(48, 16, waited_steps=1.0, allowance_steps=0.5, min_steps=1, judge_waiting=True) == 40
    assert admitted_window(48, 16, waited_steps=1.5, allowance_steps=0.5, min_steps=1, judge_waiting=True) == 32


def test_never_below_the_floor_nor_above_the_window() -> None:
    assert admitted_window(48, 16, waited_steps=9.0, allowance_steps=0.5, min_steps=1, judge_waiting=True) == 16
    assert admitted_window(16, 16, waited_steps=9.0, allowance_steps=0.5, min_steps=2, judge_waiting=True) == 16


def test_ema_takes_the_first_sample_as_it_is() -> None:
    assert ema(0.0, 4.0, 0.2) == 4.0
    assert ema(4.0, 2.0, 0.5) == 3.0


def _admission(cfg: AdmissionConfig, queue: tuple[int, int]) -> JudgeAdmission:
    admission = JudgeAdmission(cfg, 16, lambda: queue)
    admission.latency_s, admission.step_s = 3.0, 2.0  # groups wait 1.5 steps for their judge
    return admission


def test_limit_and_metrics() -> None:
    admission = _admission(AdmissionConfig(judge_aware=True), (5, 1))
    assert admission.window(32) == 16
    m = admission.metrics()
    assert m["queue/judge_backlog"] == 6 and m["queue/judge_held_back"] == 16 and m["queue/judge_wait_steps"] == 1.5
    off = _admission(AdmissionConfig(judge_aware=False), (5, 1))
    assert off.window(32) == 32 and off.metrics()["queue/judge_held_back"] == 0


def test_a_refill_time_longer_than_judge_wait_steps_replaces_it(monkeypatch) -> None:
    """The judge keeps queued what lasts until released prompts reach it: the allowance is judge_wait_steps, or the
    refill (update + sync outside collecting, and generation) in steps where that is longer."""
    clock = iter([100.0, 102.0])  # two finished steps 2 s apart, 1 s of it collecting
    monkeypatch.setattr("learner.admission.time.monotonic", lambda: next(clock))
    admission = JudgeAdmission(AdmissionConfig(judge_aware=True), 16, lambda: (5, 1))
    admission.observe_step(collect_wait_s=0.0)
    admission.observe_step(collect_wait_s=1.0)
    admission.observe_generation(2.0)
    admission.observe_latency(3.0)  # 1.5 steps: within the refill (1 s + 2 s = 1.5 steps)
    assert (admission.step_s, admission.outside_s, admission.refill_s) == (2.0, 1.0, 3.0)
    monkeypatch.setattr("learner.admission.time.monotonic", lambda: 200.0)
    assert admission.window(32) == 32 and admission.metrics()["queue/judge_refill_s"] == 3.0
    admission.latency_s = 5.0  # 2.5 steps: one step above the refill
    assert admission.window(32) == 16
    admission.generate_s, admission.outside_s = 0.0, 0.5  # refill 0.25 steps: judge_wait_steps (0.5) rules
    admission.latency_s = 2.0  # 1 step: half a step of excess, 8 prompts held back of a three-step window
    assert admission.window(48) == 40


def test_latency_ignores_clock_skew_below_zero() -> None:
    admission = JudgeAdmission(AdmissionConfig(latency_ema=0.5), 16, lambda: (0, 0))
    admission.observe_latency(-3.0)
    admission.observe_latency(2.0)
    assert admission.latency_s == 2.0


def _prompt(i: int) -> Prompt:
    return Prompt(prompt_id=f"p{i}", token_ids=Array.from_numpy([1, 2, 3], "int32"), ground_truth="1")


def test_feeder_cuts_messages_and_obeys_the_judge_aware_window() -> None:
    sent: list = []
    cfg = GRPOConfig(num_prompts_per_step=16, max_staleness=1, prompts_per_message=16)

    def publish(items):
        sent.extend(message for _, message in items)
        return [True] * len(items)

    feeder = Feeder(publish, _prompt, 100, cfg, run="r", message_prompts=4,
                    admission=_admission(AdmissionConfig(judge_aware=True), (3, 0)))  # fmt: skip
    assert feeder.top_up(0) == 16  # the judges are 1.5 steps behind: one step of the two-step window
    assert [len(m.prompts) for m in sent] == [4, 4, 4, 4]
    assert list(feeder.published_at) == [m.batch_id for m in sent]  # when each went out: generation time
    plain = Feeder(lambda items: [True] * len(items), _prompt, 100, cfg, run="r")
    assert plain.top_up(0) == 32 and plain.message_prompts == 16


def test_admission_config_bounds() -> None:
    with pytest.raises(ValueError):
        AdmissionConfig(pull_unit_prompts=0)
    with pytest.raises(ValueError):
        AdmissionConfig(min_window_steps=0)
    assert AdmissionConfig().judge_aware and AdmissionConfig().pull_unit_prompts == 4


def test_the_collector_times_generation_from_the_feeders_publish_time() -> None:
    from types import SimpleNamespace

    from broker.schemas import RolloutGroup, Sample, ScoredGroup
    from learner.rollout_io import Collector

    cfg = GRPOConfig(num_prompts_per_step=4, max_staleness=1, prompts_per_message=4)
    admission = JudgeAdmission(AdmissionConfig(judge_aware=True, latency_ema=1.0), 4, lambda: (0, 0))
    feeder = Feeder(lambda items: [True] * len(items), _prompt, 100, cfg, run="r", admission=admission)
    feeder.top_up(0)
    batch_id, published = next(iter(feeder.published_at.items()))
    sample = Sample(Array.from_numpy([1], "int32"), Array.from_numpy([-0.5], "float32"), "stop", "1")
    rollout = RolloutGroup(group_id=f"p0@{batch_id}", batch_id=batch_id, prompt=_prompt(0), samples=[sample, sample],
                           policy_version=0, worker_id="gen-0", created_at=published + 1.5)  # fmt: skip
    group = ScoredGroup(rollout=rollout, rewards=Array.from_numpy([1.0, 0.0], "float32"),
                        verdicts=["correct", "incorrect"], judge_id="j", created_at=published + 2.0)  # fmt: skip
    Collector(None, feeder, cfg)._accept(group, 0, SimpleNamespace(dropped={}))
    assert admission.generate_s == pytest.approx(1.5) and admission.latency_s == pytest.approx(0.5)
