"""The judge against the peers' published cases (tests/data/judge_cases.jsonl).

Each row is one case transcribed from a peer's test suite (its `source` and `test` named): a completion, a
ground truth, and the verdict that test expects (1 correct, 0 not). The figure is the fraction of cases where
rlq's verdict matches the expected one, among the cases where math-verify itself (its own test helper's
setup: LaTeX with boxes first, then expressions, on both sides) agrees with the expected verdict; cases that
math-verify gets wrong say nothing about how faithfully rlq uses it.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import pytest

from workers.judge.verify import quiet_math_verify, verify

CASES = Path(__file__).parents[1] / "data" / "judge_cases.jsonl"
TARGET = 0.98
log = logging.getLogger(__name__)


def load_cases() -> list[dict]:
    return [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]


def math_verify_itself(response: str, ground_truth: str) -> int:
    """math-verify as its own tests call it (compare_strings in huggingface/Math-Verify tests/test_all.py)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from math_verify import verify as mv_verify

    targets = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    gold = parse(ground_truth, targets, parsing_timeout=None)
    pred = parse(response, targets, parsing_timeout=None)
    return int(bool(mv_verify(gold, pred, timeout_seconds=None)))


def agreement(rule: str) -> tuple[float, dict[str, tuple[int, int]], list[dict]]:
    """(overall agreement, {source: (agreeing, counted)}, the counted cases rlq gets wrong)."""
    per_source: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    misses = []
    for case in load_cases():
        if math_verify_itself(case["response"], case["ground_truth"]) != case["expected"]:
            continue
        ours = int(verify(case["response"], case["ground_truth"], rule) == "correct")  # type: ignore[arg-type]
        per_source[case["source"]][1] += 1
        if ours == case["expected"]:
            per_source[case["source"]][0] += 1
        else:
            misses.append(case)
    agree = sum(a for a, _ in per_source.values())
    counted = sum(n for _, n in per_source.values())
    return agree / counted, {s: (a, n) for s, (a, n) in per_source.items()}, misses


def test_cases_name_their_source():
    cases = load_cases()
    assert len(cases) >= 80
    assert all(c["source"] and c["test"] and c["expected"] in (0, 1) for c in cases)
    assert {c["source"].split()[0] for c in cases} >= {
        "huggingface/Math-Verify",
        "NVIDIA-NeMo/Gym",
        "huggingface/trl",
        "volcengine/verl",
    }


@pytest.mark.parametrize("rule", ["nemo_gym", "last_box"])
def test_agreement_with_the_peers_cases(rule, capsys):
    quiet_math_verify()
    score, per_source, misses = agreement(rule)
    with capsys.disabled():
        counted = sum(n for _, n in per_source.values())
        print(f"\njudge agreement ({rule}): {score:.4f} of {counted} cases")
        for source, (agree, n) in sorted(per_source.items()):
            print(f"  {source}: {agree}/{n}")
        for case in misses if rule == "nemo_gym" else []:  # the last-box rule misses most unboxed cases
            print(f"  miss: {case['source']} {case['test']}: {case['response'][:60]!r} vs {case['ground_truth']!r}")
    if rule == "nemo_gym":  # the default, the tutorial's reward
        assert score >= TARGET
