"""The prepared-row contract: what `rlq prepare-data` writes and the learner's feeder reads.

A prepared directory holds `train.jsonl`, `validation.jsonl` (one `Example` per line) and `manifest.json`. Every
row carries DAPO-Math-17k's columns (`data_source`, `prompt`, `ability`, `reward_model`, `extra_info`) plus what
the feeder reads: `prompt_id`, the chat `messages`, the `ground_truth` and the `verifier` (the judge queue that
scores it: NeMo Gym's `agent_ref`). The writer (rlq/data.py) validates every row as an `Example`; the feeder
(learner/data_source.py) reads rows with `read_rows`, which also takes hand-written files of `prompt`/`answer`
rows. docs/data.md describes the contract for people. No torch here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from broker.errors import UserError

TRAIN_FILE, VALIDATION_FILE, MANIFEST_FILE = "train.jsonl", "validation.jsonl", "manifest.json"
"""The splits and the manifest inside a prepared directory."""
DEFAULT_VERIFIER = "math"


class Example(BaseModel, frozen=True):
    """One prepared training/validation example (one JSONL row)."""

    prompt_id: str = Field(..., min_length=1, description="Stable id: 'dapo-<16 hex>' or 'arith-train-000042'.")
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


def read_rows(path: Path) -> list[dict]:
    """Every row of a prepared JSONL file.

    Raises:
        UserError: (one line) the file is missing or unreadable, or a row is malformed (naming its line).
    """
    rows = []
    for number, line in jsonl_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or ("messages" not in row and "prompt" not in row):
            raise UserError(f"{path}:{number}: row has neither 'messages' nor 'prompt'")
        rows.append(row)
    return rows


def jsonl_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every non-blank line of a prepared file; one UserError if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prepared data not found: {path} (rlq prepare-data writes it)")
    try:
        with open(path, encoding="utf-8") as fh:
            return [(number, line) for number, line in enumerate(fh, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """An OS or decoding error in a few words ("Permission denied"), without the path it repeats."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
