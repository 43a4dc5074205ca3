"""Training data: DAPO-Math-17k (hub or local parquet/jsonl) and an offline arithmetic set, as prepared JSONL.

`rlq prepare-data` is the tutorial's `ng_prepare_data`. Every prepared row carries the DAPO columns
(`data_source`, `prompt`, `ability`, `reward_model`, `extra_info`) plus the fields the learner's feeder reads
(`learner/data_source.py`): `prompt_id`, `messages`, `ground_truth` and `verifier` (the judge queue that scores
it: NeMo Gym's `agent_ref` analogue). See docs/data.md for the row contract.

Bad source rows are skipped and counted by reason; a missing or unreadable source raises `UserError` (one line).
"""

from __future__ import annotations

import logging
import random
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from rlq.errors import UserError

log = logging.getLogger(__name__)

DAPO_HUB_ID = "BytedTsinghua-SIA/DAPO-Math-17k"
# The DAPO-Math-17k / NeMo Gym tutorial template, kept verbatim: the judge extracts the last "Answer:" line.
DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
# The tiny policy's variant: same answer contract, a fraction of the tokens (its context is a few hundred
# positions and every prompt token costs CPU time in training and generation).
COMPACT_TEMPLATE = "Compute {problem}\nEnd with Answer: N"
TEMPLATES = {"full": DAPO_TEMPLATE, "compact": COMPACT_TEMPLATE}
DEFAULT_VERIFIER = "math"
OPS = "+-*"


class Example(BaseModel, frozen=True):
    """One prepared training/validation example (one JSONL row)."""

    prompt_id: str = Field(..., min_length=1, description="Stable id, e.g. 'dapo-000123' or 'arith-train-000042'.")
    messages: list[dict[str, str]] = Field(..., min_length=1, description="Chat messages [{role, content}].")
    ground_truth: str = Field(..., min_length=1, description="Reference answer the verifier compares against.")
    verifier: str = Field(DEFAULT_VERIFIER, min_length=1, description="Judge queue that scores it (agent_ref).")
    data_source: str = Field(..., description="Origin dataset, e.g. 'math_dapo' or 'arith'.")
    ability: str = Field("MATH", description="DAPO's ability column.")
    reward_model: dict[str, Any] = Field(..., description="DAPO's {ground_truth, style}.")
    extra_info: dict[str, Any] = Field(default_factory=dict, description="DAPO's {index, ...}; arith adds more.")

    @field_validator("messages")
    @classmethod
    def _roles(cls, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        for m in messages:
            if set(m) != {"role", "content"} or not m["content"].strip():
                raise ValueError("each message needs exactly a role and a non-empty content")
        return messages

    @model_validator(mode="after")
    def _answer_agrees(self) -> Example:
        if str(self.reward_model.get("ground_truth")) != self.ground_truth:
            raise ValueError("reward_model.ground_truth differs from ground_truth")
        return self

    @property
    def problem_text(self) -> str:
        return self.messages[-1]["content"]


# ---------------------------------------------------------------- arithmetic generator


class ArithConfig(BaseModel):
    """Knobs of the arithmetic generator (difficulty = digits x ops x steps)."""

    n_train: int = Field(2000, ge=0, description="Training problems.")
    n_val: int = Field(200, ge=0, description="Validation problems, disjoint from training.")
    digits: int = Field(2, ge=1, le=6, description="Largest operand digit count (1..digits, uniformly).")
    ops: str = Field("+-", min_length=1, description="Operators to draw from, a subset of '+-*'.")
    min_steps: int = Field(1, ge=1, le=8, description="Fewest operators per problem.")
    steps: int = Field(1, ge=1, le=8, description="Most operators per problem.")
    seed: int = Field(0, description="Generator seed; same config + seed -> same files.")
    template: Literal["full", "compact"] = Field("compact", description="Prompt template (see module doc).")

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, ops: str) -> str:
        if not set(ops) <= set(OPS):
            raise ValueError(f"ops must be drawn from {OPS!r}, got {ops!r}")
        return "".join(sorted(set(ops), key=OPS.index))

    @model_validator(mode="after")
    def _step_range(self) -> ArithConfig:
        if self.min_steps > self.steps:
            raise ValueError(f"min_steps ({self.min_steps}) > steps ({self.steps})")
        return self


def _operand(rng: random.Random, digits: int) -> int:
    d = rng.randint(1, digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)


def random_problem(rng: random.Random, cfg: ArithConfig) -> tuple[list[int], list[str]]:
    """(operands [k+1], operators [k]) with k in [min_steps, steps]."""
    k = rng.randint(cfg.min_steps, cfg.steps)
    return [_operand(rng, cfg.digits) for _ in range(k + 1)], [rng.choice(cfg.ops) for _ in range(k)]


def solve(nums: list[int], ops: list[str]) -> tuple[int, list[str]]:
    """Value with the usual precedence, and one worked line per operation ('4*5=20')."""
    nums, ops, lines = list(nums), list(ops), []
    while ops:
        i = ops.index("*") if "*" in ops else 0
        a, b, op = nums[i], nums[i + 1], ops[i]
        c = a * b if op == "*" else a + b if op == "+" else a - b
        lines.append(f"{a}{op}{b}={c}")
        nums[i : i + 2], ops[i : i + 1] = [c], []
    return nums[0], lines


def expression(nums: list[int], ops: list[str]) -> str:
    return "".join(f"{n}{op}" for n, op in zip(nums, [*ops, ""], strict=True))


def arith_solution(problem: str, answer: int, lines: list[str]) -> str:
    """The completion the warm start teaches: worked lines, then the judge's 'Answer: N' line."""
    return "\n".join([*lines, f"Answer: {answer}"])


def arith_example(nums: list[int], ops: list[str], *, split: str, index: int, template: str) -> Example:
    problem = expression(nums, ops)
    answer, lines = solve(nums, ops)
    return Example(
        prompt_id=f"arith-{split}-{index:06d}",
        messages=[{"role": "user", "content": TEMPLATES[template].format(problem=problem)}],
        ground_truth=str(answer),
        data_source="arith",
        ability="MATH",
        reward_model={"ground_truth": str(answer), "style": "rule-lighteval/MATH_v2"},
        extra_info={
            "index": index,
            "split": split,
            "problem": problem,
            "solution": arith_solution(problem, answer, lines),
        },
    )


def generate_arith(cfg: ArithConfig) -> tuple[list[Example], list[Example]]:
    """Deterministic (train, validation): distinct problems, validation disjoint from training."""
    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    splits: dict[str, list[Example]] = {"train": [], "validation": []}
    for split, n in (("validation", cfg.n_val), ("train", cfg.n_train)):
        misses = 0
        while len(splits[split]) < n:
            nums, ops = random_problem(rng, cfg)
            if expression(nums, ops) in seen:
                misses += 1
                if misses > 100 * max(n, 1):
                    raise UserError(f"arith: only {len(seen)} distinct problems exist for these knobs; lower n")
                continue
            seen.add(expression(nums, ops))
            splits[split].append(arith_example(nums, ops, split=split, index=len(splits[split]), template=cfg.template))
    return splits["train"], splits["validation"]
