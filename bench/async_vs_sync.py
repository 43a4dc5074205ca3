"""Asynchronous vs synchronous GRPO on the same tiny arithmetic run, in one benchmark run.

The same config twice: `grpo.max_staleness=0` (synchronous, on-policy: generation waits for every weight
update) and `grpo.max_staleness=2` (generation runs up to two versions ahead while the learner trains).
Figures: steps per minute of each (measured between the first and the last step, so engine start-up is left
out), their ratio, and the final sampled rewards (mean of the last `learning.WINDOW` steps). Targets
(issue 7): ratio >= 1.5, final rewards within 0.05.

Usage: .venv/bin/python bench/async_vs_sync.py [overrides for both runs...]
(default: `grpo.max_num_steps=100` each, as recorded; the tiny config's own 900 would take ~25 min)
Writes bench/results/async_vs_sync.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import learning  # noqa: E402  (sibling bench module: shared run/prepare/write helpers)

STALENESS = {"sync": 0, "async": 2}
DEFAULT_STEPS = 100


def steps_per_minute(records: list[dict]) -> float:
    """Steady-state rate: steps after the first, over the wall time between the first and last record."""
    if len(records) < 2:
        return 0.0
    return (len(records) - 1) / ((records[-1]["time"] - records[0]["time"]) / 60)


def main() -> None:
    from rlq.warm_start import build_policy

    overrides = sys.argv[1:] or [f"grpo.max_num_steps={DEFAULT_STEPS}"]
    build_policy(learning.POLICY)
    data_dir = learning.WORK / "arith"
    learning.prepare(data_dir)
    config = str(learning.REPO / "configs" / "tiny_arith_cpu.yaml")
    figures: dict = {"overrides": overrides}
    for mode, staleness in STALENESS.items():
        run_dir = learning.WORK / f"{mode}-{int(time.time())}"
        records, minutes = learning.train(config, data_dir, run_dir, [*overrides, f"grpo.max_staleness={staleness}"],
                                          f"bench-{mode}")  # fmt: skip
        rewards = [r["rollout/reward_mean"] for r in records]
        figures[f"{mode}_steps_per_min"] = round(steps_per_minute(records), 3)
        last = rewards[-learning.WINDOW :]
        figures[f"{mode}_final_reward"] = round(sum(last) / len(last), 4)
        figures[f"{mode}_minutes"] = round(minutes, 2)
        figures[f"{mode}_reward_curve"] = [round(r, 3) for r in rewards]
    figures["steps_per_min_ratio"] = round(figures["async_steps_per_min"] / figures["sync_steps_per_min"], 3)
    figures["final_reward_gap"] = round(abs(figures["async_final_reward"] - figures["sync_final_reward"]), 4)
    targets = {"steps_per_min_ratio": ">= 1.5", "final_reward_gap": "<= 0.05"}
    met = figures["steps_per_min_ratio"] >= 1.5 and figures["final_reward_gap"] <= 0.05
    learning.write("async_vs_sync", figures, targets, met)


if __name__ == "__main__":
    main()
