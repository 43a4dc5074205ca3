"""DAPO-Math-17k for `rlq prepare-data --source dapo`: rows in the DAPO schema (hub or local parquet/jsonl),
validated and deduplicated into prepared examples (rlq/data.py). Bad source rows are skipped and counted by
reason; a missing or unreadable source raises `UserError` (one line).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from broker.errors import RlqError
from broker.prepared import Example
from rlq.data import DAPO_TEMPLATE, Tally, write_prepared
from rlq.errors import UserError

log = logging.getLogger(__name__)

DAPO_HUB_ID = "BytedTsinghua-SIA/DAPO-Math-17k"

REQUIRED_COLUMNS = ("data_source", "prompt", "reward_model")


# Internal control flow, not an error the user sees: collect_dapo catches every SkipRow and counts the row as
# skipped. Under the root all the same, so that one escaping by mistake still reads as one line.
class SkipRow(RlqError, ValueError):
    """A source row that cannot become an example; `reason` is the manifest's counter key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _messages(prompt: Any) -> list[dict[str, str]]:
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise SkipRow("broken_prompt")
    out = []
    for m in prompt:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise SkipRow("broken_prompt")
        if not m["content"].strip():
            raise SkipRow("empty_prompt")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise SkipRow("broken_prompt")
    return out


def _answer(reward_model: Any) -> str:
    if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
        raise SkipRow("missing_answer")
    answer = reward_model["ground_truth"]
    if not isinstance(answer, str):
        raise SkipRow("non_string_answer")
    if not answer.strip():
        raise SkipRow("empty_answer")
    return answer.strip()


def dedup_key(messages: list[dict[str, str]]) -> str:
    """Whitespace-insensitive hash of the conversation: the hub copy repeats each prompt ~100 times."""
    text = "\x1e".join(f"{m['role']}\x1f{' '.join(m['content'].split())}" for m in messages)
    return hashlib.sha256(text.encode()).hexdigest()


def dapo_example(row: Any) -> Example:
    """One DAPO-schema row as an Example, or SkipRow(reason). A bare problem gets the tutorial template."""
    if not isinstance(row, dict):
        raise SkipRow("not_an_object")
    for column in REQUIRED_COLUMNS:
        if column not in row or row[column] is None:
            raise SkipRow(f"missing_column:{column}")
    messages, answer = _messages(row["prompt"]), _answer(row["reward_model"])
    if "Answer:" not in messages[-1]["content"]:
        messages[-1] = {"role": "user", "content": DAPO_TEMPLATE.format(problem=messages[-1]["content"].strip())}
    extra: dict[str, Any] = row["extra_info"] if isinstance(row.get("extra_info"), dict) else {}
    return Example(
        prompt_id=f"dapo-{dedup_key(messages)[:16]}",
        messages=messages,
        ground_truth=answer,
        data_source=str(row["data_source"]),
        ability=str(row.get("ability") or "MATH"),
        reward_model={"ground_truth": answer, "style": str(row["reward_model"].get("style") or "rule")},
        extra_info=dict(extra),
    )


def _jsonl_rows(path: Path) -> Iterator[Any]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield SkipRow("not_json")


def _parquet_rows(path: Path) -> Iterator[Any]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=8192):
        yield from batch.to_pylist()


def read_source_rows(path: Path) -> Iterator[Any]:
    """Rows of a local parquet / jsonl / json file; one UserError if the file is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            yield from _parquet_rows(path)
        elif suffix in (".jsonl", ".ndjson"):
            yield from _jsonl_rows(path)
        elif suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            yield from rows if isinstance(rows, list) else [SkipRow("not_an_object")]
        else:
            raise UserError(f"unsupported input type {suffix or '(none)'}: {path} (use .parquet, .jsonl or .json)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(
            f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    except Exception as exc:  # pyarrow's errors (ArrowInvalid, ...) share no base class worth importing eagerly
        if type(exc).__module__.startswith("pyarrow"):
            raise UserError(f"cannot read {path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
        raise


def hub_rows(hub_id: str = DAPO_HUB_ID) -> Iterator[Any]:
    """Rows of the hub copy through `datasets`; an unreachable hub is one UserError."""
    from datasets import load_dataset  # imported first: importing resets the hub logger's level

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its per-retry warnings would bury the one line that matters
    try:
        dataset = load_dataset(hub_id, split="train")
    except Exception as exc:  # datasets raises many types (ConnectionError, OfflineModeIsEnabled, HfHubHTTPError)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot download {hub_id} ({first}); pass local files with --input instead") from None
    finally:
        hub_log.setLevel(level)
    yield from dataset


def collect_dapo(sources: Iterable[tuple[str, Iterable[Any]]], tally: Tally) -> list[Example]:
    """Unique valid examples in first-seen order; everything else counted in `tally`."""
    seen: dict[str, str] = {}  # dedup key -> ground truth
    examples = []
    for name, rows in sources:
        for number, row in enumerate(rows, 1):
            tally.rows_read += 1
            try:
                if isinstance(row, SkipRow):
                    raise row
                ex = dapo_example(row)
            except SkipRow as skip:
                tally.skip(skip.reason, f"{name}:{number}")
                continue
            except ValueError:  # pydantic's ValidationError: a row that passed the checks above but not the schema
                tally.skip("invalid_example", f"{name}:{number}")
                continue
            key = dedup_key(ex.messages)
            if key in seen:
                tally.duplicates += 1
                tally.conflicting_duplicates += seen[key] != ex.ground_truth
                continue
            seen[key] = ex.ground_truth
            examples.append(ex)
    return examples


def split_validation(examples: list[Example], val_fraction: float) -> tuple[list[Example], list[Example]]:
    """Hash-based split: an example's side does not depend on order or on what else is in the file."""
    cut = int(val_fraction * 10_000)
    val = [ex for ex in examples if int(hashlib.sha256(ex.prompt_id.encode()).hexdigest()[:8], 16) % 10_000 < cut]
    chosen = {ex.prompt_id for ex in val}
    return [ex for ex in examples if ex.prompt_id not in chosen], val


def prepare_dapo(
    out_dir: Path, *, inputs: list[Path] | None = None, download: bool = False, val_fraction: float = 0.02
) -> dict[str, Any]:
    """DAPO-Math-17k from the hub (`download`) or from local parquet/jsonl files, deduplicated and validated."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not inputs and not download:
        raise UserError("dapo needs --input FILE (parquet/jsonl in the DAPO schema) or --download")
    for path in inputs or []:
        if not Path(path).is_file():
            raise UserError(f"input not found: {path}")
    sources: list[tuple[str, Iterable[Any]]] = [(str(p), read_source_rows(Path(p))) for p in inputs or []]
    if download:
        sources.append((DAPO_HUB_ID, hub_rows()))
    tally = Tally()
    examples = collect_dapo(sources, tally)
    if not examples:
        raise UserError(f"no usable rows in {', '.join(name for name, _ in sources)} (skipped: {dict(tally.skipped)})")
    train, val = split_validation(examples, val_fraction)
    source = {"kind": "dapo", "inputs": [name for name, _ in sources], "val_fraction": val_fraction,
              "template": "full"}  # fmt: skip
    return write_prepared(out_dir, train, val, source=source, tally=tally)
