"""The library judge, pure: extract the final answer of a completion and compare it with math-verify.

Semantics follow NeMo Gym's `math_with_judge` library verifier as the DAPO-Math tutorial uses it: the ground
truth is stripped of math delimiters and wrapped in `\\boxed{}`; the prediction is the answer the DAPO prompt
asks for ("Answer: ..." on the last line), else the last `\\boxed{...}`; math-verify parses both and compares
them symbolically and numerically. Reward is 1 for "correct" and 0 for every other verdict.

Nothing here has a deadline, and math-verify's own signal timeouts are switched off (they raise outside the
main thread): `check` can run forever on a pathological answer. Callers run it inside
`workers.judge.isolation.VerifierChild`, which enforces a hard deadline with SIGKILL. Parsed sympy objects are
opaque: never `str()`, repr or log them (printing a huge expression can hang outside every timeout).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from broker.schemas import Verdict

log = logging.getLogger(__name__)

ANSWER_LINE = re.compile(r"^[\s*#>_]*answer\s*[*_]*\s*[:：]\s*[*_]*", re.IGNORECASE)
"""The DAPO prompt's "Answer: $Answer" line, tolerating markdown emphasis: "**Answer:** 42"."""

BOX_COMMANDS = ("\\boxed", "\\fbox")
DIGIT_GROUP = re.compile(r"(?<=\d)(?:\{,\}|\\,|\\!|\\ )(?=\d{3}(?!\d))")
"""Thousands separators LaTeX writes between digit groups: 1{,}234 and 1\\,234 mean 1234."""

MAX_ANSWER_CHARS = 100_000
"""Longer extracted answers are still tried (the child's deadline bounds them) but never logged."""


def strip_math_delimiters(text: str) -> str:
    """`$x$`, `\\(x\\)`, `\\[x\\]` -> `x` (outer pair only)."""
    s = text.strip()
    for left, right in (("$$", "$$"), ("\\(", "\\)"), ("\\[", "\\]"), ("$", "$")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            return s[len(left) : len(s) - len(right)].strip()
    return s


def last_boxed(text: str) -> str | None:
    """Contents of the last complete `\\boxed{...}` (or `\\fbox{...}`), braces balanced; linear time."""
    start = max(text.rfind(cmd + "{") for cmd in BOX_COMMANDS)
    while start >= 0:
        inner = _balanced(text, text.index("{", start) + 1)
        if inner is not None:
            return inner
        start = max(text.rfind(cmd + "{", 0, start) for cmd in BOX_COMMANDS)  # unclosed: try the one before
    return None


def _balanced(text: str, begin: int) -> str | None:
    depth = 1
    for index in range(begin, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[begin:index]
    return None


def answer_line(text: str) -> str | None:
    """What follows "Answer:" on the last line that has one, or None."""
    for line in reversed(text.splitlines()):
        match = ANSWER_LINE.match(line)
        if match:
            return line[match.end() :]
    return None


def clean_answer(answer: str) -> str | None:
    """Strip delimiters, emphasis and a trailing period; join LaTeX thousands separators. None if empty."""
    s = answer.strip().strip("*_").strip()
    if s.endswith(".") and not s.endswith("..."):
        s = s[:-1].rstrip()
    s = DIGIT_GROUP.sub("", strip_math_delimiters(s))
    return s or None


def extract_answer(response: str) -> str | None:
    """The final answer of a completion: the "Answer:" line (its `\\boxed{}` if it has one), else the last
    `\\boxed{}`. None when the completion gives neither (verdict "no_answer")."""
    line = answer_line(response)
    if line is not None:
        boxed = last_boxed(line)
        found = clean_answer(boxed if boxed is not None else line)
        if found is not None:
            return found
    boxed = last_boxed(response)
    return clean_answer(boxed) if boxed is not None else None


def gold_target(ground_truth: str) -> str:
    """The ground truth as math-verify's gold extraction expects it (NeMo Gym wraps it the same way)."""
    return "\\boxed{" + strip_math_delimiters(ground_truth) + "}"


# math-verify proper. Imported lazily so that importing this module (the Celery app, the CLI) stays cheap.


def _targets() -> tuple[Any, Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return (LatexExtractionConfig(),), (LatexExtractionConfig(), ExprExtractionConfig())


def parse_gold(ground_truth: str) -> list[Any]:
    """Parsed ground truth (opaque sympy objects); empty if math-verify finds nothing in it."""
    from math_verify import parse

    gold_config, _ = _targets()
    return parse(gold_target(ground_truth), gold_config, parsing_timeout=None)


def check(gold: list[Any], answer: str) -> Verdict:
    """Compare an extracted answer with a parsed ground truth: "correct" or "incorrect". No deadline."""
    from math_verify import parse
    from math_verify import verify as mv_verify

    _, pred_config = _targets()
    predicted = parse("\\boxed{" + answer + "}", pred_config, parsing_timeout=None)
    if predicted and mv_verify(gold, predicted, timeout_seconds=None):
        return "correct"
    # "The final answer is 5": math-verify finds the expression in prose only when it is not boxed as a whole.
    if " " in answer.strip():
        predicted = parse(answer, pred_config, parsing_timeout=None)
        if predicted and mv_verify(gold, predicted, timeout_seconds=None):
            return "correct"
    return "incorrect"


def verify(response: str, ground_truth: str) -> Verdict:
    """Score one completion in this process, without a deadline (unit tests and the in-process baseline).

    Production scoring goes through `workers.judge.isolation.VerifierChild`, which runs `check` under a hard kill.
    """
    answer = extract_answer(response)
    if answer is None:
        return "no_answer"
    gold = parse_gold(ground_truth)
    if not gold:
        return "error"
    return check(gold, answer)


def reward_of(verdict: str) -> float:
    return 1.0 if verdict == "correct" else 0.0


def quiet_math_verify() -> None:
    """math-verify logs the offending input on errors; inputs can be megabytes and parsed objects must not be
    printed, so only its critical messages pass."""
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
