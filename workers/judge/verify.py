"""The library judge, pure: what math-verify is given of a completion, and its verdict.

Two answer rules (`JudgeConfig.answer_rule`); in both the ground truth is stripped of math delimiters and
wrapped in `\\boxed{}`, parsed with math-verify's LaTeX extraction, and compared symbolically and numerically:

- "nemo_gym" (default): the tutorial's reward, NeMo Gym's library judge (NVIDIA-NeMo/Gym,
  resources_servers/math_with_judge/app.py `_run_math_verify`, `math_metric` with expression then LaTeX
  extraction for the prediction): math-verify reads the whole completion and picks the answer itself, so an
  answer split over several boxes (`\\boxed{1}, \\boxed{2}`) is one set and "Final answer: 42" or
  "Answer: 42" anchors the answer. No answer math-verify can find: "no_answer". (NeMo Gym's newer app.py also
  scores 0 a completion without a non-empty `\\boxed{}` before asking math-verify; rlq does not, because the
  DAPO prompt asks for an "Answer:" line, not a box.)
- "last_box": rlq's own rule: the answer the DAPO prompt asks for ("Answer: ..." on the last line), else the
  last `\\boxed{...}`, extracted here and boxed for math-verify.

Reward is 1 for "correct" and 0 for every other verdict.

Nothing here has a deadline, and math-verify's own signal timeouts are switched off (they raise outside the
main thread): `check` can run forever on a pathological answer. Callers run it inside
`workers.judge.isolation.VerifierChild`, which enforces a hard deadline with SIGKILL. Parsed sympy objects are
opaque: never `str()`, repr or log them (printing a huge expression can hang outside every timeout).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

from broker.schemas import Verdict

log = logging.getLogger(__name__)

ANSWER_LINE = re.compile(r"^[\s*#>_]*(?:final\s+)?answer\s*[*_]*\s*[:：]\s*[*_]*", re.IGNORECASE)
"""The DAPO prompt's "Answer: $Answer" line, or "Final Answer:", tolerating markdown: "**Final Answer:** 42"."""

BOX_COMMANDS = ("\\boxed", "\\fbox")
DIGIT_GROUP = re.compile(r"(?<=\d)(?:\{,\}|\\,|\\!|\\ )(?=\d{3}(?!\d))")
"""Thousands separators LaTeX writes between digit groups: 1{,}234 and 1\\,234 mean 1234."""

AnswerRule = Literal["nemo_gym", "last_box"]
"""Which part of a completion math-verify judges; see the module docstring."""
DEFAULT_RULE: AnswerRule = "nemo_gym"

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


def prediction(response: str, rule: AnswerRule = DEFAULT_RULE) -> str | None:
    """What the verifier child is sent for one completion: the whole completion ("nemo_gym": math-verify
    finds the answer in it, under the child's deadline) or the extracted answer ("last_box"). None: no answer."""
    if rule == "last_box":
        return extract_answer(response)
    return response if response.strip() else None


def gold_target(ground_truth: str) -> str:
    """The ground truth as math-verify's gold extraction expects it (NeMo Gym wraps it the same way)."""
    return "\\boxed{" + strip_math_delimiters(ground_truth) + "}"


# math-verify proper. Imported lazily so that importing this module (the Celery app, the CLI) stays cheap.


def _targets() -> tuple[Any, Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return (LatexExtractionConfig(),), (LatexExtractionConfig(), ExprExtractionConfig())


def _nemo_gym_targets() -> tuple[Any, ...]:
    """NeMo Gym's prediction targets, in its order (expression first; the order breaks priority ties)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return (ExprExtractionConfig(), LatexExtractionConfig())


def parse_gold(ground_truth: str) -> list[Any]:
    """Parsed ground truth (opaque sympy objects); empty if math-verify finds nothing in it."""
    from math_verify import parse

    gold_config, _ = _targets()
    return parse(gold_target(ground_truth), gold_config, parsing_timeout=None)


def check(gold: list[Any], answer: str, rule: AnswerRule = DEFAULT_RULE) -> Verdict:
    """Compare a `prediction` with a parsed ground truth: "correct", "incorrect" or ("nemo_gym": math-verify
    found nothing in the completion) "no_answer". No deadline."""
    from math_verify import parse
    from math_verify import verify as mv_verify

    if rule == "nemo_gym":
        predicted = parse(answer, _nemo_gym_targets(), parsing_timeout=None)
        if not predicted:
            return "no_answer"
        return "correct" if mv_verify(gold, predicted, timeout_seconds=None) else "incorrect"
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


def verify(response: str, ground_truth: str, rule: AnswerRule = DEFAULT_RULE) -> Verdict:
    """Score one completion in this process, without a deadline (unit tests and the in-process baseline).

    Production scoring goes through `workers.judge.isolation.VerifierChild`, which runs `check` under a hard kill.
    """
    answer = prediction(response, rule)
    if answer is None:
        return "no_answer"
    gold = parse_gold(ground_truth)
    if not gold:
        return "error"
    return check(gold, answer, rule)


def reward_of(verdict: str) -> float:
    return 1.0 if verdict == "correct" else 0.0


def quiet_math_verify() -> None:
    """math-verify logs the offending input on errors; inputs can be megabytes and parsed objects must not be
    printed, so only its critical messages pass."""
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
