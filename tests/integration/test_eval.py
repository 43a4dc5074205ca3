"""`rlq eval` end to end on the tiny policy: the greedy accuracy bench/learning.py reports, and a DAPO-schema file
through the CLI with the vLLM CPU engine."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny_arith_cpu.yaml"


def bench_learning():
    spec = importlib.util.spec_from_file_location("bench_learning", REPO / "bench" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_eval(*args: str) -> dict:
    """`rlq eval ... --json --output F` in a subprocess (vLLM starts its engine with spawn); the written report."""
    out = Path(args[args.index("--output") + 1])
    argv = [sys.executable, "-m", "rlq", "eval", "--json", *args]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(result.stdout)["figures"] == report["figures"]  # stdout holds the report alone
    return report


@pytest.fixture(scope="module")
def held_out(tiny_policy_dir, tmp_path_factory):
    """bench/learning.py's held-out problems (the warm start's validation split minus the demo's RL training set,
    `rlq prepare-data --source arith` at its defaults), the file it writes for `rlq eval`, and its greedy figure."""
    from rlq.data import ArithConfig, generate_arith

    bench = bench_learning()
    train_problems = {ex.extra_info["problem"] for ex in generate_arith(ArithConfig())[0]}
    examples = bench.held_out(train_problems)
    path = bench.write_held_out(tmp_path_factory.mktemp("heldout"), examples)
    return examples, path, bench.greedy(tiny_policy_dir, path)


def test_rlq_eval_gives_the_greedy_accuracy_bench_learning_reports(tiny_policy_dir, held_out, tmp_path):
    """The command bench/learning.py names prints its figure; and its completions are the ones bench's former
    scorer (the warm start's generate() + 'Answer: N' regex) saw: re-scored with that regex they give its figure."""
    from rlq.tiny_policy import load_policy
    from rlq.warm_start import extracted_answer, greedy_accuracy

    examples, path, bench_figure = held_out
    report = run_eval("-c", str(CONFIG), "-m", str(tiny_policy_dir), "-d", str(path), "--samples", "0",
                      "--max-new-tokens", "24", "--output", str(tmp_path / "eval.json"),
                      "policy.generation.backend=hf")  # fmt: skip
    figures = report["figures"]
    assert figures["problems"] == len(examples) == 297
    assert figures["greedy_accuracy"] == bench_figure
    assert 0.2 <= bench_figure <= 0.5  # the warm start's band: a figure worth comparing

    model, tokenizer = load_policy(tiny_policy_dir)
    regex_figure = greedy_accuracy(model, tokenizer, examples)  # bench/learning.py's former figure
    texts = [p["greedy_text"] for p in report["per_problem"]]
    rescored = sum(extracted_answer(t) == ex.ground_truth for t, ex in zip(texts, examples, strict=True)) / 297
    assert rescored == regex_figure  # the same 297 completions
    assert abs(regex_figure - bench_figure) <= 2 / 297  # the judge and the regex differ on a rare completion
    print(f"rlq eval (hf) {bench_figure:.4f} = bench; former regex scorer {regex_figure:.4f}")


def test_vllm_greedy_is_close_to_bench_learning(tiny_policy_dir, held_out, tmp_path):
    """The tiny config's own engine (vLLM CPU, float32): other kernels, so an arg-max may flip on a near tie."""
    _, path, bench_figure = held_out
    report = run_eval("-c", str(CONFIG), "-m", str(tiny_policy_dir), "-d", str(path), "--samples", "0",
                      "--max-new-tokens", "24", "--output", str(tmp_path / "eval.json"))  # fmt: skip
    assert report["settings"]["backend"] == "vllm"
    assert abs(report["figures"]["greedy_accuracy"] - bench_figure) <= 3 / 297
    print(f"rlq eval (vllm) {report['figures']['greedy_accuracy']:.4f} vs bench {bench_figure:.4f}")


def test_cli_on_a_dapo_schema_file_with_vllm_from_a_checkpoint_dir(tiny_policy_dir, tmp_path):
    """A DAPO/AIME-schema file (DAPO-Math-17k's columns, as the AIME-2024 copy in that schema has them) through
    `rlq eval` with the tiny config's vLLM CPU engine, the model named by a checkpoint_dir (its latest step)."""
    from rlq.data import DAPO_TEMPLATE

    problems = [("Find 2+3.", "5"), ("What is $7-4$?", "3"), ("Compute 1+1+1.", "3"), ("Let $x=2$. Find $x+x$.", "4")]
    rows = [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": DAPO_TEMPLATE.format(problem=problem)}],
            "ability": "MATH",
            "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": f"aime-{i}"},
        }
        for i, (problem, answer) in enumerate(problems)
    ]
    data = tmp_path / "aime.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_policy_dir, ckpt / "step_3" / "policy")
    (ckpt / "step_3" / "learner_state.json").write_text("{}")
    (ckpt / "latest").write_text("step_3")
    report = run_eval("--model", str(ckpt), "--data", str(data), "--config", str(CONFIG), "-k", "4",
                      "--max-new-tokens", "16", "--output", str(tmp_path / "eval.json"))  # fmt: skip
    figures = report["figures"]
    assert report["model_path"] == str(ckpt / "step_3" / "policy")
    assert report["settings"]["backend"] == "vllm" and report["settings"]["answer_rule"] == "nemo_gym"
    assert figures["problems"] == 4 and figures["samples_per_problem"] == 4
    assert sum(figures["verdicts"].values()) == 16 and sum(figures["greedy_verdicts"].values()) == 4
    assert list(figures["pass@k"]) == ["1", "2", "4"]
    assert figures["pass@k"]["1"] == pytest.approx(figures["mean@k"])
    assert figures["pass@k"]["1"] <= figures["pass@k"]["2"] <= figures["pass@k"]["4"]
    assert "Chen et al. 2021" in report["estimator"]
    assert [p["ground_truth"] for p in report["per_problem"]] == ["5", "3", "3", "4"]
    assert all(0 <= p["correct"] <= 4 for p in report["per_problem"])
