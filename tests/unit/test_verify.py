"""The library judge: answer extraction, math-verify semantics, and the hard-kill child (no Redis, no Celery)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from workers.judge.isolation import VerifierChild
from workers.judge.verify import clean_answer, extract_answer, gold_target, last_boxed, reward_of, verify

# Budget for answers that must time out here; small so the suite stays fast.
BUDGET_S = 1.0


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("Let me think.\n2+2=4\nAnswer: 4", "4"),
        ("Work...\nAnswer: $\\frac{1}{2}$", "\\frac{1}{2}"),
        ("**Answer:** 42.", "42"),
        ("answer: \\boxed{7} because", "7"),
        ("Answer: 1\nmore text\nAnswer: 2", "2"),
        ("so the result is \\boxed{\\frac{a}{b}} and \\boxed{9}", "9"),
        ("nested \\boxed{\\sqrt{\\frac{1}{2}}}", "\\sqrt{\\frac{1}{2}}"),
        ("unclosed at the end \\boxed{3} then \\boxed{4", "3"),
        ("Answer: 1{,}234", "1234"),
        ("Answer: 1\\,234\\,567", "1234567"),
        ("\\fbox{5}", "5"),
        ("Answer:\nthe final line has no answer but \\boxed{8}", "8"),
        ("an intermediate \\boxed{7}\n**Final Answer:** 42", "42"),  # "Final Answer:" is an answer line too
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize("response", ["", "I do not know.", "Answer:", "Answer: $ $", "\\boxed{", "\\boxed{}"])
@pytest.mark.parametrize("rule", ["nemo_gym", "last_box"])
def test_no_answer(response, rule):
    assert extract_answer(response) is None
    assert verify(response, "3", rule) == "no_answer"


def test_helpers():
    assert last_boxed("a \\boxed{x{y}z} b") == "x{y}z"
    assert clean_answer("  $$3$$ ") == "3"
    assert gold_target("$\\frac{1}{2}$") == "\\boxed{\\frac{1}{2}}"
    assert [reward_of(v) for v in ("correct", "incorrect", "timeout")] == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("response", "ground_truth"),
    [
        ("Answer: 3/4", "\\frac{3}{4}"),  # fraction forms
        ("Answer: 0.75", "\\frac{3}{4}"),
        ("Answer: \\dfrac{3}{4}", "3/4"),
        ("Answer: \\tfrac34", "0.75"),
        ("Answer: 1,234", "1234"),  # integers with commas
        ("Answer: $1{,}234$", "1234"),
        ("The answer is \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt2}{2}"),  # LaTeX forms
        ("Answer: \\sqrt{2}/2", "$\\frac{\\sqrt{2}}{2}$"),
        ("Answer: 2\\pi", "2 \\pi"),
        ("Answer: x = 5", "5"),
        ("Answer: 18^\\circ", "18"),
        ("Answer: The final answer is 5", "5"),
        ("Answer: (x+1)^2", "x^2+2x+1"),
    ],
)
def test_equivalent_forms_are_correct(response, ground_truth):
    # rlq's last-box rule: the answer is cut out and boxed, so bare LaTeX after "Answer:" parses too.
    assert verify(response, ground_truth, "last_box") == "correct"


@pytest.mark.parametrize(
    ("response", "ground_truth", "nemo_gym", "last_box"),
    [
        # The issue-18 misses of the last-box rule, which NeMo Gym's library judge accepts:
        ("so \\boxed{1}, \\boxed{2}, \\boxed{3}", "\\{1, 2, 3\\}", "correct", "incorrect"),  # one set, 3 boxes
        ("the roots are \\boxed{2} and \\boxed{3}", "2, 3", "correct", "incorrect"),  # two roots, two boxes
        ("Final Answer: 42", "42", "correct", "correct"),
        ("2+2=4\nAnswer: 4", "4", "correct", "correct"),  # the DAPO prompt's format
        ("Answer: 5", "4", "incorrect", "incorrect"),
        # math-verify reads LaTeX only between delimiters: NeMo Gym scores these 0, the last-box rule 1.
        ("Answer: \\dfrac{3}{4}", "3/4", "no_answer", "correct"),
        ("Answer: 2\\pi", "2 \\pi", "incorrect", "correct"),
    ],
)
def test_answer_rules(response, ground_truth, nemo_gym, last_box):
    assert verify(response, ground_truth) == nemo_gym  # the default rule
    assert verify(response, ground_truth, "nemo_gym") == nemo_gym
    assert verify(response, ground_truth, "last_box") == last_box


@pytest.mark.parametrize(
    ("response", "ground_truth"), [("Answer: 4", "3"), ("Answer: 1/3", "0.3"), ("\\boxed{x}", "y")]
)
@pytest.mark.parametrize("rule", ["nemo_gym", "last_box"])
def test_wrong_answers_are_incorrect(response, ground_truth, rule):
    assert verify(response, ground_truth, rule) == "incorrect"


def test_unparsable_ground_truth_is_an_error():
    assert verify("Answer: 3", "") == "error"
    assert verify("Answer: 3", "$ $") == "error"


# The isolated child -------------------------------------------------------------------------------------------

NESTED_POWER = "\\dfrac{5^{5^{5^{5}}}}{3}"  # verify evaluates 5^3125 towers: never finishes


@pytest.fixture
def child():
    # The isolation tests send extracted answers, so the child reads them with the last-box rule.
    handle = VerifierChild(memory_mb=4096, rule="last_box")
    yield handle
    handle.close()


def test_child_is_reused_across_groups(child):
    first = child.verify_answers("3", ["3", "4", None], answer_timeout_s=30, group_timeout_s=60)
    pid = child.pid
    second = child.verify_answers("\\frac{1}{2}", ["0.5", "1/2"], answer_timeout_s=30, group_timeout_s=60)
    assert first == ["correct", "incorrect", "no_answer"]
    assert second == ["correct", "correct"]
    assert child.pid == pid and child.respawns == 0, "no fork per answer or per group"


def test_deadline_kills_the_child_and_scores_the_rest(child):
    child.start()
    stuck_pid = child.pid
    verdicts = child.verify_answers("3", ["3", NESTED_POWER, "3"], answer_timeout_s=BUDGET_S, group_timeout_s=30)
    assert verdicts == ["correct", "timeout", "correct"]
    assert child.timeouts == 1 and child.respawns == 1
    assert child.pid != stuck_pid
    with pytest.raises(ProcessLookupError):  # SIGKILLed and reaped, not left running
        os.kill(stuck_pid, 0)


def test_group_deadline_scores_untried_answers_timeout(child):
    verdicts = child.verify_answers("3", [NESTED_POWER] * 4, answer_timeout_s=BUDGET_S, group_timeout_s=1.5)
    assert verdicts == ["timeout"] * 4
    assert child.timeouts == 2, "the third and fourth answers were never tried"


def test_child_that_dies_scores_error_and_is_replaced(child):
    child.start()
    victim = child.pid
    threading.Timer(0.5, os.kill, (victim, signal.SIGKILL)).start()  # an OOM killer stand-in, mid-answer
    verdicts = child.verify_answers("3", [NESTED_POWER, "3"], answer_timeout_s=30, group_timeout_s=60)
    assert verdicts == ["error", "correct"], "a crash is an error (seen at once), not a timeout"
    assert child.crashes == 1 and child.pid != victim


def test_a_ground_truth_that_hangs_times_out_every_answer_once(child):
    deep = "\\left(" * 10_000 + "1" + "\\right)" * 10_000  # antlr never finishes parsing it
    verdicts = child.verify_answers(deep, ["1", None, "2"], answer_timeout_s=BUDGET_S, group_timeout_s=30)
    assert verdicts == ["timeout", "no_answer", "timeout"]
    assert child.timeouts == 1, "one kill settles every answer: they share the ground truth"


def test_child_reads_whole_completions_under_the_default_rule():
    handle = VerifierChild(memory_mb=4096)
    try:
        verdicts = handle.verify_answers(
            "\\{1, 2, 3\\}",
            ["so \\boxed{1}, \\boxed{2}, \\boxed{3}", "no idea", None],
            answer_timeout_s=30,
            group_timeout_s=60,
        )
    finally:
        handle.close()
    assert verdicts == ["correct", "no_answer", "no_answer"]


def test_injected_delay_slows_each_group_inside_its_timed_part(child):
    """The bench-only knob (bench/judge_backpressure.py) gives the judge a known speed; real verdicts are kept."""
    from broker.schemas import Array, Prompt, RolloutGroup, Sample
    from workers.judge.app import score
    from workers.judge.config import JudgeConfig

    sample = Sample(Array.from_numpy([1], "int32"), Array.from_numpy([-0.5], "float32"), "stop", "Answer: 3")
    prompt = Prompt("p-0", Array.from_numpy([5, 6], "int32"), "3", text="1+2?")
    group = RolloutGroup(group_id="p-0@b", batch_id="b", prompt=prompt, samples=[sample, sample], policy_version=0,
                         worker_id="gen-0")  # fmt: skip
    cfg = JudgeConfig(answer_rule="last_box", injected_delay_per_group_s=0.3)
    scored = score(group, cfg, child)
    assert scored.verdicts == ["correct", "correct"]
    assert scored.timings["verify_s"] >= 0.3
    with pytest.raises(ValueError, match="below group_timeout_s"):
        JudgeConfig(injected_delay_per_group_s=5, answer_timeout_s=2, group_timeout_s=4)
    with pytest.raises(ValueError):
        JudgeConfig(injected_delay_per_group_s=-0.1)
