"""Does the tiny arithmetic run learn? `rlq train` from the warm-started tiny policy, timed, on this machine.

Figures: greedy accuracy on held-out problems (the warm start's validation split minus anything in the RL
training set) before and after RL; the sampled training reward of the first and of the last steps (means over
WINDOW steps: one step's 128 samples are too noisy to quote alone); the minutes until that windowed sampled
reward first reached 0.8; wall-clock minutes of the whole `rlq train` (start-up included). Baseline: the same
policy before RL. Targets (issue 7, "reported on held-out problems"): held-out accuracy <= 0.5 before and
>= 0.8 after, within 15 minutes.

Usage: .venv/bin/python bench/learning.py [--warm-start-seed N] [overrides for rlq train...]
Writes bench/results/learning.json (learning_seed<N>.json with --warm-start-seed: the same run from a warm start
built with another seed, as another host's float rounding would build it).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]
RESULT = REPO / "bench" / "results" / "learning.json"
WORK = REPO / "runs" / "bench-learning"
POLICY = REPO / "artifacts" / "tiny-policy"
CONFIG = REPO / "configs" / "tiny_arith_cpu.yaml"
WINDOW = 10
TARGET_REWARD = 0.8


def held_out(train_problems: set[str]) -> list:
    from rlq.data import generate_arith
    from rlq.warm_start import WarmStartConfig

    _, validation = generate_arith(WarmStartConfig().task)
    return [ex for ex in validation if ex.extra_info["problem"] not in train_problems]


def write_held_out(data_dir: Path, examples: list) -> Path:
    """The held-out problems as a prepared file, for `rlq eval` (docs/eval.md)."""
    from rlq.data import example_line

    path = data_dir / "heldout.jsonl"
    path.write_text("".join(map(example_line, examples)))
    return path


def greedy(model_dir: Path, heldout_file: Path) -> float:
    """Greedy accuracy as `rlq eval` computes it (the same code): arg-max completions of 24 new tokens from the
    transformers engine in batches of 100, scored by the run's judge (the config's env.math.answer_rule). Until
    issue 18 it was scored by the warm start's 'Answer: N' regex, which also took "Answer: -11-5" for -11."""
    import torch

    from rlq.eval_run import EvalSettings, evaluate, run_sections

    torch.set_num_threads(2)
    generation, judge = run_sections(CONFIG, ["policy.generation.backend=hf"])
    settings = EvalSettings(model=str(model_dir), data=heldout_file, samples=0, max_new_tokens=24, batch_prompts=100,
                            generation=generation, judge=judge)  # fmt: skip
    return evaluate(settings)["figures"]["greedy_accuracy"]


def train(
    config: str, data_dir: Path, run_dir: Path, overrides: list[str], tag: str, policy: Path = POLICY
) -> tuple[list[dict], float]:
    """Run `rlq train`; returns its per-step metrics records (validation passes: `validation_records`) and minutes."""
    argv = [sys.executable, "-m", "rlq", "train", "--config", config, f"policy.model_name={policy}",
            f"data.path={data_dir}", f"logger.log_dir={run_dir}", f"checkpointing.checkpoint_dir={run_dir / 'ckpt'}",
            f"run_name={tag}", "logger.wandb_enabled=false", *overrides]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(argv, cwd=REPO, stderr=subprocess.PIPE, text=True)
    minutes = (time.monotonic() - started) / 60
    if result.returncode != 0:
        raise SystemExit(f"rlq train failed: {result.stderr.strip().splitlines()[-1]}")
    return [r for r in metrics_records(run_dir) if "loss/total" in r], minutes


def metrics_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def validation_records(run_dir: Path) -> list[dict]:
    """The in-run validation passes (learner/validation.py), in the order they completed."""
    return [r for r in metrics_records(run_dir) if "val/accuracy" in r]


def prepare(data_dir: Path) -> set[str]:
    from rlq.data import ArithConfig, load_prepared, prepare_arith

    prepare_arith(data_dir, ArithConfig())
    return {ex.extra_info["problem"] for ex in load_prepared(data_dir / "train.jsonl")}


def final_policy(run_dir: Path) -> Path:
    steps = sorted((run_dir / "ckpt").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    return steps[-1] / "policy"


def main() -> None:
    import argparse

    from rlq.warm_start import WarmStartConfig, build_policy

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warm-start-seed", type=int, default=None,
                    help="Build the warm start with this seed instead of the default (a stand-in for another host, "
                    "whose float rounding stops the build elsewhere); writes learning_seed<N>.json.")  # fmt: skip
    ap.add_argument("overrides", nargs="*", help="Overrides for rlq train, e.g. grpo.max_num_steps=300.")
    args = ap.parse_args()
    overrides, seed = args.overrides, args.warm_start_seed
    name = "learning" if seed is None else f"learning_seed{seed}"
    policy = POLICY if seed is None else POLICY.with_name(f"tiny-policy-seed{seed}")
    build_policy(policy, WarmStartConfig() if seed is None else WarmStartConfig(seed=seed))
    data_dir = WORK / "arith"
    train_problems = prepare(data_dir)
    examples = held_out(train_problems)
    heldout_file = write_held_out(data_dir, examples)
    before = greedy(policy, heldout_file)
    run_dir = WORK / f"run-{int(time.time())}"
    launched = time.time()  # metrics records carry wall-clock times
    records, minutes = train(str(CONFIG), data_dir, run_dir, overrides, "bench", policy)
    rewards = [r["rollout/reward_mean"] for r in records]
    after = greedy(final_policy(run_dir), heldout_file)
    windowed = [sum(rewards[i - WINDOW : i]) / WINDOW for i in range(WINDOW, len(rewards) + 1)]
    reached = next((i + WINDOW - 1 for i, value in enumerate(windowed) if value >= TARGET_REWARD), None)
    figures = {
        "heldout_greedy_before": round(before, 4),
        "heldout_greedy_after": round(after, 4),
        "heldout_problems": len(examples),
        # `rlq eval -c configs/tiny_arith_cpu.yaml -m <policy> -d <this> --samples 0 --max-new-tokens 24
        # policy.generation.backend=hf` prints the same figures (docs/eval.md)
        "heldout_file": str(heldout_file.relative_to(REPO)),
        "start_reward": round(sum(rewards[:WINDOW]) / len(rewards[:WINDOW]), 4),
        "final_reward": round(sum(rewards[-WINDOW:]) / len(rewards[-WINDOW:]), 4),
        "reward_window_steps": WINDOW,
        "minutes_to_reward_0.8": (None if reached is None else round((records[reached]["time"] - launched) / 60, 2)),
        "minutes": round(minutes, 2),
        "steps": len(records),
        "seconds_per_step": round((records[-1]["time"] - records[0]["time"]) / max(len(records) - 1, 1), 3),
        "reward_curve": [round(r, 3) for r in rewards],
        # Sampled accuracy on the prepared validation split, measured by the run itself (learner/validation.py).
        "in_run_validation": [
            [int(r["val/policy_version"]), round(r["val/accuracy"], 4)] for r in validation_records(run_dir)
        ],  # fmt: skip
        "overrides": overrides,
        "run_dir": str(run_dir.relative_to(REPO)),
    }
    targets = {"heldout_greedy_before": "<= 0.5", "heldout_greedy_after": ">= 0.8", "minutes": "<= 15"}
    met = before <= 0.5 and after >= TARGET_REWARD and minutes <= 15
    if seed is not None:
        figures["warm_start_seed"] = seed
    write(name, figures, targets, met)


def cpu_model() -> str:
    """The CPU's model name (figures from different sessions ran on different hosts)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def write(name: str, figures: dict, targets: dict, met: bool) -> None:
    result = {
        "bench": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {cpu_model()}, {platform.platform()}",
        "figures": figures,
        "targets": targets,
        "met": met,
    }
    out = REPO / "bench" / "results" / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
