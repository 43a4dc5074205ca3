"""Does the tiny arithmetic run learn? `rlq train` from the warm-started tiny policy, timed, on this machine.

Figures: greedy accuracy on held-out problems (the warm start's validation split minus anything in the RL
training set) before and after RL; the sampled training reward of the first and of the last steps (means over
WINDOW steps: one step's 128 samples are too noisy to quote alone); the minutes until that windowed sampled
reward first reached 0.8; wall-clock minutes of the whole `rlq train` (start-up included). Baseline: the same
policy before RL. One row per warm start, built with seeds 0, 1 and 2 (another host's float rounding stops the
warm start's build at another step: the seeds stand in for hosts). Targets (issues 7 and 20, "reported on held-out
problems"): on every seed, held-out accuracy <= 0.5 before and >= 0.8 after, within 10 minutes of `rlq train`.
Each row also scores the final checkpoint with `rlq eval` as a user types it (the figure must be the same).

Usage: .venv/bin/python bench/learning.py [overrides for rlq train...] [--seeds 0 1 2]  (overrides first)
Writes bench/results/learning.json; `met` only when every seed of 0, 1, 2 ran and met every target.
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


SEEDS = (0, 1, 2)
TARGET_MINUTES = 10.0


def policy_dir(seed: int) -> Path:
    """Seed 0 is `rlq build-policy`'s default (what `make train` uses); the others sit beside it."""
    return POLICY if seed == 0 else POLICY.with_name(f"tiny-policy-seed{seed}")


def rlq_eval_greedy(model_dir: Path, heldout_file: Path, out: Path) -> float:
    """The same figure through the command a user types (issue 18: `rlq eval` on the final checkpoint)."""
    argv = [sys.executable, "-m", "rlq", "eval", "-c", str(CONFIG), "-m", str(model_dir), "-d", str(heldout_file),
            "--samples", "0", "--max-new-tokens", "24", "-o", str(out), "policy.generation.backend=hf"]  # fmt: skip
    subprocess.run(argv, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())["figures"]["greedy_accuracy"]


def run_seed(seed: int, data_dir: Path, heldout_file: Path, overrides: list[str]) -> dict:
    """Warm start built with `seed`, greedy before, `rlq train`, greedy after (twice: bench code, `rlq eval`)."""
    from rlq.warm_start import WarmStartConfig, build_policy

    policy = policy_dir(seed)
    build_policy(policy, WarmStartConfig(seed=seed))
    before = greedy(policy, heldout_file)
    run_dir = WORK / f"run-seed{seed}-{int(time.time())}"
    launched = time.time()  # metrics records carry wall-clock times
    records, minutes = train(str(CONFIG), data_dir, run_dir, overrides, f"bench-seed{seed}", policy)
    rewards = [r["rollout/reward_mean"] for r in records]
    final = final_policy(run_dir)
    after = greedy(final, heldout_file)
    windowed = [sum(rewards[i - WINDOW : i]) / WINDOW for i in range(WINDOW, len(rewards) + 1)]
    reached = next((i + WINDOW - 1 for i, value in enumerate(windowed) if value >= TARGET_REWARD), None)
    return {
        "warm_start_seed": seed,
        "heldout_greedy_before": round(before, 4),
        "heldout_greedy_after": round(after, 4),
        "rlq_eval_greedy_after": round(rlq_eval_greedy(final, heldout_file, run_dir / "eval.json"), 4),
        "minutes": round(minutes, 2),
        "steps": len(records),
        "seconds_per_step": round((records[-1]["time"] - records[0]["time"]) / max(len(records) - 1, 1), 3),
        "start_reward": round(sum(rewards[:WINDOW]) / len(rewards[:WINDOW]), 4),
        "final_reward": round(sum(rewards[-WINDOW:]) / len(rewards[-WINDOW:]), 4),
        "minutes_to_reward_0.8": (None if reached is None else round((records[reached]["time"] - launched) / 60, 2)),
        # Sampled accuracy on the prepared validation split, measured by the run itself (learner/validation.py).
        "in_run_validation": [
            [int(r["val/policy_version"]), round(r["val/accuracy"], 4)] for r in validation_records(run_dir)
        ],  # fmt: skip
        "reward_curve_every_10": [
            round(sum(rewards[i : i + 10]) / len(rewards[i : i + 10]), 3) for i in range(0, len(rewards), 10)
        ],  # fmt: skip
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the machine slows the run
        "run_dir": str(run_dir.relative_to(REPO)),
    }


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS),
                    help="Warm-start seeds, one row each (a stand-in for other hosts, whose float rounding stops the "
                    "warm start's build elsewhere).")  # fmt: skip
    ap.add_argument("overrides", nargs="*", help="Overrides for rlq train, e.g. grpo.max_num_steps=300.")
    args = ap.parse_args()
    data_dir = WORK / "arith"
    examples = held_out(prepare(data_dir))
    heldout_file = write_held_out(data_dir, examples)
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, data_dir, heldout_file, args.overrides))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "reward_curve_every_10"}), flush=True)
    afters = [r["heldout_greedy_after"] for r in rows]
    figures = {
        "rows": rows,
        "heldout_problems": len(examples),
        # `rlq eval -c configs/tiny_arith_cpu.yaml -m <policy> -d <this> --samples 0 --max-new-tokens 24
        # policy.generation.backend=hf` prints the same figures (docs/eval.md); each row checks it
        "heldout_file": str(heldout_file.relative_to(REPO)),
        "heldout_greedy_after_min": min(afters),
        "heldout_greedy_after_max": max(afters),
        "minutes_max": max(r["minutes"] for r in rows),
        "overrides": args.overrides,
    }
    targets = {"every seed: heldout_greedy_before": "<= 0.5", "every seed: heldout_greedy_after": ">= 0.8",
               "every seed: minutes": f"<= {TARGET_MINUTES:g}"}  # fmt: skip
    met = set(args.seeds) >= set(SEEDS) and all(
        r["heldout_greedy_before"] <= 0.5 and r["heldout_greedy_after"] >= TARGET_REWARD
        and r["minutes"] <= TARGET_MINUTES for r in rows
    )  # fmt: skip
    write("learning", figures, targets, met)


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
