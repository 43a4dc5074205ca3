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
    plain = Feeder(lambda items: [True] * len(items), _prompt, 100, cfg, run="r")
    assert plain.top_up(0) == 32 and plain.message_prompts == 16


def test_admission_config_bounds() -> None:
    with pytest.raises(ValueError):
        AdmissionConfig(pull_unit_prompts=0)
    with pytest.raises(ValueError):
        AdmissionConfig(min_window_steps=0)
    assert not AdmissionConfig().judge_aware and AdmissionConfig().pull_unit_prompts == 4
