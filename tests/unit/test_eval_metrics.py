"""`rlq eval`'s pure parts: the unbiased pass@k estimator, the summary, the table, the rows it reads."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from broker.errors import UserError
from rlq.eval import ESTIMATOR, ProblemResult, default_ks, pass_at_k, summarize, table
from rlq.eval_run import EvalSettings, engine_configs, example_from_row, load_examples, run_sections


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k by enumeration: the share of k-subsets of the n samples that hold a correct one."""
    subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_is_the_unbiased_estimator(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = 1 - math.comb(n - c, k) / math.comb(n, k)  # Chen et al. 2021, eq. 1
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_stays_finite_where_binomials_overflow_floats():
    value = pass_at_k(2000, 3, 1000)
    assert value == pytest.approx(1 - math.comb(1997, 1000) / math.comb(2000, 1000), rel=1e-9)
    assert pass_at_k(32, 0, 32) == 0.0 and pass_at_k(32, 1, 1) == pytest.approx(1 / 32)


@pytest.mark.parametrize("args", [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)])
def test_pass_at_k_refuses_impossible_counts(args):
    with pytest.raises(ValueError):
        pass_at_k(*args)


def test_default_ks_are_powers_of_two_and_n():
    assert default_ks(0) == [] and default_ks(1) == [1]
    assert (
        default_ks(8) == [1, 2, 4, 8] and default_ks(32) == [1, 2, 4, 8, 16, 32] and default_ks(12) == [1, 2, 4, 8, 12]
    )


def results() -> list[ProblemResult]:
    return [
        ProblemResult("a", "1", ["correct"] * 4, "correct", sampled_lengths=[3] * 4),
        ProblemResult("b", "2", ["correct", "incorrect", "no_answer", "incorrect"], "incorrect",
                      sampled_lengths=[5] * 4, sampled_truncated=1),
        ProblemResult("c", "3", ["incorrect"] * 4, "correct", sampled_lengths=[4] * 4),
    ]  # fmt: skip


def test_summary_figures():
    figures = summarize(results())
    assert figures["problems"] == 3 and figures["samples_per_problem"] == 4
    assert figures["greedy_accuracy"] == pytest.approx(2 / 3)
    assert figures["mean@k"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert figures["pass@k"]["1"] == pytest.approx(figures["mean@k"])  # 0/1 rewards: pass@1 is mean@k
    assert figures["pass@k"]["2"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert figures["pass@k"]["4"] == pytest.approx(2 / 3)
    assert figures["verdicts"] == {"correct": 5, "incorrect": 6, "no_answer": 1}
    assert figures["truncated_fraction"] == pytest.approx(1 / 12)
    assert list(summarize(results(), [3, 9])["pass@k"]) == ["3"]  # a k above n is left out


def test_summary_without_samples_or_greedy():
    greedy_only = summarize([ProblemResult("a", "1", [], "correct"), ProblemResult("b", "2", [], "incorrect")])
    assert greedy_only["greedy_accuracy"] == 0.5 and greedy_only["mean@k"] is None and greedy_only["pass@k"] == {}
    assert summarize([ProblemResult("a", "1", ["correct"])])["greedy_accuracy"] is None
    with pytest.raises(ValueError):
        summarize([ProblemResult("a", "1", ["correct"]), ProblemResult("b", "1", [])])


def test_table_names_the_estimator():
    report = {"model": "m", "data": "d.jsonl", "figures": summarize(results()), "seconds": 1.5}
    text = table(report)
    assert "greedy accuracy  0.6667" in text and "mean@4" in text and "pass@4" in text
    assert ESTIMATOR in text


DAPO_ROW = {  # DAPO-Math-17k's schema, as the AIME-2024 copy in the same schema has it
    "data_source": "math_dapo",
    "prompt": [{"role": "user", "content": "Solve the following math problem step by step. The last line of your "
                "response should be of the form Answer: $Answer (without quotes) where $Answer is the answer to "
                "the problem.\n\nFind 2+2.\n\nRemember to put your answer on its own line after \"Answer:\"."}],
    "ability": "MATH",
    "reward_model": {"ground_truth": "4", "style": "rule-lighteval/MATH_v2"},
    "extra_info": {"index": "a1b2"},
}  # fmt: skip


def test_rows_of_every_schema_become_examples():
    dapo = example_from_row(DAPO_ROW, 1)
    assert dapo.ground_truth == "4" and dapo.messages == DAPO_ROW["prompt"] and dapo.prompt_id.startswith("dapo-")
    bare = example_from_row({**DAPO_ROW, "prompt": [{"role": "user", "content": "Find 2+2."}]}, 2)
    assert "Answer: $Answer" in bare.problem_text  # a bare problem gets the tutorial template, as prepare-data does
    aime = example_from_row({"id": 60, "problem": "Find x.", "answer": 204}, 3)
    assert aime.prompt_id == "60" and aime.ground_truth == "204" and "Find x." in aime.problem_text
    assert "Answer:" in aime.problem_text
    plain = example_from_row({"prompt": "What is 1+1?", "expected_answer": "2"}, 4)
    assert plain.problem_text == "What is 1+1?" and plain.prompt_id == "row-0000004"  # as the feeder takes it
    prepared = {"prompt_id": "p", "messages": [{"role": "user", "content": "q"}], "ground_truth": "7",
                "data_source": "arith", "reward_model": {"ground_truth": "7"}}  # fmt: skip
    assert example_from_row(prepared, 5).ground_truth == "7"
    with pytest.raises(KeyError):
        example_from_row({"problem": "no answer here"}, 6)


def test_a_bad_row_is_one_line_naming_it(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(DAPO_ROW) + "\n" + json.dumps({"problem": "p"}) + "\n")
    with pytest.raises(UserError, match=r"x.jsonl:2: not an evaluation row"):
        load_examples(path)
    with pytest.raises(UserError, match="not found"):
        load_examples(tmp_path / "missing.jsonl")


def test_greedy_is_the_run_engine_at_top_k_1(tmp_path):
    settings = EvalSettings(model="m", data=tmp_path, max_new_tokens=24)
    sampling, greedy = engine_configs(settings)
    assert sampling.max_new_tokens == greedy.max_new_tokens == 24 and sampling.top_k is None
    assert (greedy.top_k, greedy.temperature, greedy.top_p) == (1, 1.0, 1.0)
    assert greedy.vllm_cfg == sampling.vllm_cfg and greedy.backend == sampling.backend


def test_cli_sections_read_the_run_config_and_overrides():
    generation, judge = run_sections(None, ["policy.generation.backend=hf", "env.math.answer_rule=last_box"])
    assert generation.backend == "hf" and judge.answer_rule == "last_box"
    generation, judge = run_sections(
        Path(__file__).resolve().parents[2] / "configs" / "tiny_arith_cpu.yaml", ["policy.generation.max_new_tokens=24"]
    )
    assert generation.max_new_tokens == 24 and generation.vllm_cfg.max_model_len == 256
    assert judge.answer_timeout_s == 5
