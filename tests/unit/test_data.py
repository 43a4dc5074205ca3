"""rlq.data: the arith generator, DAPO-shaped parquet/jsonl preparation (dedup, skip counts, manifest), loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from broker.prepared import Example
from rlq.data import (
    DAPO_TEMPLATE,
    ArithConfig,
    generate_arith,
    load_prepared,
    prepare_arith,
    solve,
)
from rlq.data_dapo import prepare_dapo
from rlq.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def dapo_row(problem: str, answer, index: int = 0, **over) -> dict:
    """A row in the hub copy's schema (the prompt already carries the tutorial template)."""
    row = {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": DAPO_TEMPLATE.format(problem=problem)}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": f"id-{index}"},
    }
    row.update(over)
    return row


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ---------------------------------------------------------------- arith


def test_solve_follows_precedence_and_shows_each_step() -> None:
    assert solve([3, 4, 5], ["+", "*"]) == (23, ["4*5=20", "3+20=23"])
    assert solve([9, 7, 5], ["-", "-"]) == (-3, ["9-7=2", "2-5=-3"])


def test_arith_is_deterministic_disjoint_and_correct() -> None:
    cfg = ArithConfig(n_train=300, n_val=50, digits=2, ops="+-*", min_steps=1, steps=3, seed=7)
    train, val = generate_arith(cfg)
    assert (train, val) == generate_arith(cfg)
    assert generate_arith(cfg.model_copy(update={"seed": 8}))[0] != train
    assert len(train) == 300 and len(val) == 50
    problems = [ex.extra_info["problem"] for ex in train + val]
    assert len(set(problems)) == len(problems)  # distinct, so validation is truly held out
    for ex in train + val:
        problem = ex.extra_info["problem"]
        assert int(ex.ground_truth) == eval(problem)  # noqa: S307  (our own digits-and-operators string)
        assert 1 <= sum(problem.count(op) for op in "+*") + problem.count("-") <= 3
        assert all(len(tok) <= 2 for tok in problem.replace("*", " ").replace("+", " ").replace("-", " ").split())
        assert ex.extra_info["solution"].splitlines()[-1] == f"Answer: {ex.ground_truth}"
        assert ex.messages[0]["content"].startswith("Compute ") and problem in ex.messages[0]["content"]
        assert ex.reward_model["ground_truth"] == ex.ground_truth and ex.verifier == "math"


def test_arith_splits_share_one_distribution() -> None:
    # The one-operator space (200 problems at these knobs) is small: a validation split drawn first used it up
    # (45 % of validation, 5 % of training), so "held-out accuracy" measured another task than the one trained.
    train, val = generate_arith(ArithConfig(n_train=2000, n_val=400, seed=0))

    def one_op_share(examples: list) -> float:
        return sum(len(ex.extra_info["solution"].splitlines()) == 2 for ex in examples) / len(examples)

    assert abs(one_op_share(val) - one_op_share(train)) < 0.04
    assert [ex.extra_info["index"] for ex in val] == list(range(400))  # indices count within each split
    assert {ex.extra_info["split"] for ex in train} == {"train"} and {ex.extra_info["split"] for ex in val} == {
        "validation"
    }


def test_arith_full_template_is_the_tutorials() -> None:
    train, _ = generate_arith(ArithConfig(n_train=3, n_val=0, template="full"))
    assert train[0].messages[0]["content"] == DAPO_TEMPLATE.format(problem=train[0].extra_info["problem"])


def test_arith_knobs_are_validated() -> None:
    with pytest.raises(ValueError, match="ops"):
        ArithConfig(ops="+/")
    with pytest.raises(ValueError, match="min_steps"):
        ArithConfig(min_steps=3, steps=2)
    with pytest.raises(UserError, match="distinct problems"):
        generate_arith(ArithConfig(n_train=500, n_val=0, digits=1, ops="+", steps=1))  # only 100 exist


def test_prepared_arith_files_validate_and_are_byte_identical(tmp_path: Path) -> None:
    cfg = ArithConfig(n_train=40, n_val=10, seed=3)
    manifest = prepare_arith(tmp_path / "a", cfg)
    prepare_arith(tmp_path / "b", cfg)
    for name in ("train.jsonl", "validation.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert manifest["counts"] == {"train": 40, "validation": 10}
    assert manifest["content_hash"] == json.loads((tmp_path / "b" / "manifest.json").read_text())["content_hash"]
    train = load_prepared(tmp_path / "a")  # a directory means its train.jsonl
    assert [ex.prompt_id for ex in train] == [f"arith-train-{i:06d}" for i in range(40)]
    assert len(load_prepared(tmp_path / "a" / "validation.jsonl")) == 10
    for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert {"prompt_id", "messages", "ground_truth", "verifier", "data_source"} <= set(row)
        assert {"data_source", "ability", "reward_model", "extra_info"} <= set(row)  # the DAPO columns too


# ---------------------------------------------------------------- DAPO


def good_rows() -> list[dict]:
    return [dapo_row(f"What is {i} squared?", str(i * i), i) for i in range(6)]


def test_dapo_parquet_dedup_and_skips(tmp_path: Path) -> None:
    rows = good_rows()
    rows += [dapo_row("What is 1 squared?", "1", 101), dapo_row("What is 2 squared?", "4", 102)]  # exact repeats
    rows += [dapo_row("What  is 3\nsquared?", "9", 103)]  # same prompt up to whitespace
    rows += [dapo_row("What is 4 squared?", "17", 104)]  # same prompt, conflicting answer: first one wins
    rows += [dapo_row("Empty answer", "  ", 105), dapo_row("No answer", None, 106)]
    rows += [dapo_row("Broken", "1", 107, prompt=[])]
    rows += [dapo_row("No source", "1", 108, data_source=None)]
    path = write_parquet(tmp_path / "dapo.parquet", rows)

    manifest = prepare_dapo(tmp_path / "out", inputs=[path], val_fraction=0.0)

    assert manifest["rows_read"] == 14
    assert manifest["duplicates_dropped"] == 4 and manifest["conflicting_duplicates_dropped"] == 1
    assert manifest["skipped"] == {
        "broken_prompt": 1, "empty_answer": 1, "missing_column:data_source": 1, "non_string_answer": 1
    }  # fmt: skip
    assert manifest["counts"] == {"train": 6, "validation": 0}
    train = load_prepared(tmp_path / "out" / "train.jsonl")
    assert [ex.ground_truth for ex in train] == [str(i * i) for i in range(6)]
    assert train[4].ground_truth == "16"  # not the conflicting "17"
    assert train[0].messages == rows[0]["prompt"]  # template kept verbatim, not wrapped twice
    assert all(ex.verifier == "math" and ex.prompt_id.startswith("dapo-") for ex in train)


def test_dapo_jsonl_dedup_and_skips_across_files(tmp_path: Path) -> None:
    rows = [
        *good_rows()[:3],
        "{not json",
        dapo_row("Int answer", 7, 20),  # a number where the schema has a string
        dapo_row("Broken list", "1", 21, prompt=["just a string"]),
        dapo_row("No content", "1", 22, prompt=[{"role": "user"}]),
        {k: v for k, v in dapo_row("No reward model", "1", 23).items() if k != "reward_model"},
        [1, 2, 3],
        {**dapo_row("Bare problem", "5", 24), "prompt": [{"role": "user", "content": "What is 2+3?"}]},
    ]
    first = write_jsonl(tmp_path / "a.jsonl", rows)
    second = write_jsonl(tmp_path / "b.jsonl", good_rows())  # all already seen in the first file

    manifest = prepare_dapo(tmp_path / "out", inputs=[first, second], val_fraction=0.0)

    assert manifest["rows_read"] == 16 and manifest["duplicates_dropped"] == 3
    assert manifest["skipped"] == {
        "broken_prompt": 2, "missing_column:reward_model": 1, "non_string_answer": 1, "not_an_object": 1,
        "not_json": 1,
    }  # fmt: skip
    assert manifest["skipped_total"] == 6 and manifest["counts"]["train"] == 7
    assert {"where": f"{first}:4", "reason": "not_json"} in manifest["skipped_samples"]
    bare = [ex for ex in load_prepared(tmp_path / "out") if ex.ground_truth == "5"][0]
    assert bare.messages[0]["content"] == DAPO_TEMPLATE.format(problem="What is 2+3?")


def test_dapo_validation_split_is_stable(tmp_path: Path) -> None:
    rows = [dapo_row(f"Problem number {i}", str(i), i) for i in range(400)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    m1 = prepare_dapo(tmp_path / "o1", inputs=[path], val_fraction=0.25)
    write_jsonl(tmp_path / "rev.jsonl", rows[::-1])
    m2 = prepare_dapo(tmp_path / "o2", inputs=[tmp_path / "rev.jsonl"], val_fraction=0.25)
    assert 60 < m1["counts"]["validation"] < 140 and m1["counts"] == m2["counts"]
    val1 = {ex.prompt_id for ex in load_prepared(tmp_path / "o1" / "validation.jsonl")}
    assert val1 == {ex.prompt_id for ex in load_prepared(tmp_path / "o2" / "validation.jsonl")}
    assert not val1 & {ex.prompt_id for ex in load_prepared(tmp_path / "o1")}


def test_missing_or_unreadable_source_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="input not found"):
        prepare_dapo(tmp_path / "out", inputs=[tmp_path / "nope.parquet"])
    (tmp_path / "bad.parquet").write_bytes(b"definitely not parquet")
    with pytest.raises(UserError, match="cannot read .*bad.parquet"):
        prepare_dapo(tmp_path / "out", inputs=[tmp_path / "bad.parquet"])
    with pytest.raises(UserError, match="no usable rows"):
        prepare_dapo(tmp_path / "out", inputs=[write_jsonl(tmp_path / "junk.jsonl", ["{", "[]"])])
    with pytest.raises(UserError, match="--input"):
        prepare_dapo(tmp_path / "out")
    assert not (tmp_path / "out" / "train.jsonl").exists()  # nothing half-written


def test_cli_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rlq", "prepare-data", "--source", "dapo", "--input", str(tmp_path / "x.parquet"),
         "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"rlq: input not found: {tmp_path / 'x.parquet'}"]


def test_cli_arith_writes_files(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rlq", "prepare-data", "--source", "arith", "--n-train", "20", "--n-val", "5",
         "--digits", "2", "--ops", "+-*", "--steps", "3", "--seed", "1", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["counts"] == {"train": 20, "validation": 5}
    assert len(load_prepared(tmp_path)) == 20


def test_load_prepared_names_the_bad_line(tmp_path: Path) -> None:
    prepare_arith(tmp_path, ArithConfig(n_train=3, n_val=0))
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["reward_model"]["ground_truth"] = "999"  # disagrees with ground_truth
    (tmp_path / "train.jsonl").write_text("\n".join([lines[0], json.dumps(row), lines[2]]) + "\n")
    with pytest.raises(UserError, match=r"train.jsonl:2: not a prepared example"):
        load_prepared(tmp_path)
    with pytest.raises(UserError, match="not found"):
        load_prepared(tmp_path / "nothing.jsonl")


def test_example_rejects_empty_messages_and_answers() -> None:
    base = {"prompt_id": "x", "messages": [{"role": "user", "content": "hi"}], "ground_truth": "1",
            "data_source": "t", "reward_model": {"ground_truth": "1"}}  # fmt: skip
    assert Example(**base).problem_text == "hi"
    for bad in ({"messages": []}, {"ground_truth": ""}, {"messages": [{"role": "user", "content": " "}]}):
        with pytest.raises(ValueError):
            Example(**{**base, **bad})
