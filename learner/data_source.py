"""Training prompts for the feeder: rows of a prepared JSONL file turned into tokenised `Prompt`s.

The file is what `rlq prepare-data` writes; the row contract and its reader are broker/prepared.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from broker.errors import UserError
from broker.prepared import TRAIN_FILE, VALIDATION_FILE, read_rows
from broker.schemas import Array, Prompt
from learner.config import DataConfig, LearnerConfig

log = logging.getLogger(__name__)


def row_messages(row: dict) -> list[dict]:
    if "messages" in row:
        return list(row["messages"])
    return [{"role": "user", "content": str(row["prompt"])}]


def prompt_from_row(row: dict, index: int, tokenizer) -> Prompt:
    """Apply the chat template (with the generation prompt) and pack the token ids."""
    text = tokenizer.apply_chat_template(row_messages(row), add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return Prompt(
        prompt_id=str(row.get("prompt_id") or row.get("id") or f"row-{index:07d}"),
        token_ids=Array.from_numpy(ids, "int32"),
        ground_truth=str(row.get("ground_truth", row.get("answer", ""))),
        verifier=str(row.get("verifier", "math")),
        text=text,
    )


def prompt_source(cfg: LearnerConfig, tokenizer) -> tuple[Callable[[int], Prompt], int]:
    """(index -> Prompt, number of rows); prompts are tokenised on first use and cached."""
    path = training_file(cfg.data)
    rows = read_rows(path)
    cache: dict[int, Prompt] = {}

    def prompt_at(index: int) -> Prompt:
        if index not in cache:
            cache[index] = prompt_from_row(rows[index], index, tokenizer)
        return cache[index]

    log.info("%d training prompts from %s", len(rows), path)
    return prompt_at, len(rows)


def training_file(data: DataConfig) -> Path:
    """The training split: `data.path`, or train.jsonl in it when it is a prepared directory.

    Raises:
        UserError: (one line) there is no such file.
    """
    path = Path(data.path)
    if path.is_dir():  # a prepare-data output directory: its training split
        path = path / TRAIN_FILE
    if not path.is_file():
        raise UserError(f"no training data at {path}: point data.path at what rlq prepare-data wrote")
    return path


def validation_file(data: DataConfig) -> Path:
    """Where the validation split is: `data.validation_path`, else validation.jsonl in the prepared directory.

    Raises:
        UserError: (one line, for the user: the CLI shows it as such) there is no such file.
    """
    path = data.validation_path
    if path is None:
        if not Path(data.path).is_dir():
            raise UserError(
                f"grpo.val_period/val_at_start need validation data: data.path {data.path} is a file, so set "
                "data.validation_path (rlq prepare-data writes validation.jsonl next to train.jsonl)"
            )
        path = Path(data.path) / VALIDATION_FILE
    if not Path(path).is_file():
        raise UserError(f"no validation file at {path}: set data.validation_path, or grpo.val_period=0")
    return Path(path)


def validation_prompts(cfg: LearnerConfig, tokenizer) -> list[Prompt]:
    """The first `grpo.max_val_samples` prompts of the validation split, tokenised (a pass always uses the same).

    Raises:
        UserError: no validation file, an unreadable or malformed one, or no example in it fits.
    """
    path = validation_file(cfg.data)
    rows = read_rows(path)[: cfg.grpo.max_val_samples]
    prompts = [prompt_from_row(row, index, tokenizer) for index, row in enumerate(rows)]
    # As the feeder does with training prompts: one with no room left to answer would never come back scored.
    limit = cfg.policy.max_total_sequence_length
    fitting = [p for p in prompts if len(p.token_ids) < limit]
    if len(fitting) < len(prompts):
        log.warning("%d validation prompts have >= %d tokens (policy.max_total_sequence_length): left out",
                    len(prompts) - len(fitting), limit)  # fmt: skip
    if not fitting:
        raise UserError(
            f"the validation file {path} has no example shorter than {limit} tokens: "
            "raise policy.max_total_sequence_length or use shorter prompts"
        )
    log.info("%d validation prompts from %s", len(fitting), path)
    return fitting
