"""A judge slower than generation: judge-aware admission against staleness-only admission, in one benchmark run.

The loop of bench/heterogeneous.py (tiny CPU config, processes as `rlq train` starts them, the fast and the
slowed generation worker with capacity-aware pulls), with the one Celery judge held to a fraction of one core by
a CPU limit (a cgroup v1 `cpu.cfs_quota_us`; the bench needs root and a cgroup v1 cpu controller), so it scores
fewer groups per second than the workers generate. Arms, one after the other:
  * judge_aware: `learner.admission.judge_aware=true` (off by default until this bench shows it helps);
  * staleness_only: the feeder's admission before issue 19 (`learner.admission.judge_aware=false`).
Figures per arm: generation wasted on groups dropped as stale (groups and sampled sequences, and their share of
all generated), steps/min, the mean staleness trained on, the judge backlog and what the feeder held back.
Targets (issue 19): stale waste at least halved; steps/min no worse (>= 0.95x, the run-to-run noise here).

Usage: .venv/bin/python bench/judge_backpressure.py [--seconds 150] [--judge-cpu 0.03]
Writes bench/results/judge_backpressure.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import heterogeneous  # noqa: E402  (the loop harness)
import learning  # noqa: E402  (the results writer)

CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000
ARMS = {
    "staleness_only": ["learner.admission.judge_aware=false"],
    "judge_aware": ["learner.admission.judge_aware=true"],
}


def limited_cgroup(cpu: float) -> Path:
    """A cgroup v1 cpu group that lets its processes use `cpu` of one core."""
    group = CGROUP_ROOT / f"rlq-bench-judge-{os.getpid()}"
    group.mkdir(exist_ok=True)
    (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
    (group / "cpu.cfs_quota_us").write_text(str(max(1000, int(cpu * PERIOD_US))))
    return group


def wrapper(group: Path) -> list[str]:
    """argv prefix that moves the process into `group` before exec (its children stay in it)."""
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "judge"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=150, help="Measured wall time per arm, after the first step.")
    ap.add_argument("--judge-cpu", type=float, default=0.03, help="Share of one core the judge may use.")
    ap.add_argument("--delay", type=float, default=0.001, help="Slow generation worker's seconds per token.")
    args = ap.parse_args()
    if not (CGROUP_ROOT / "cgroup.procs").exists():
        raise SystemExit(f"needs a cgroup v1 cpu controller at {CGROUP_ROOT} (and root) to limit the judge")
    heterogeneous.WORK.mkdir(parents=True, exist_ok=True)
    group = limited_cgroup(args.judge_cpu)
    figures: dict = {"measured_seconds_per_arm": args.seconds, "judge_cpu_share": args.judge_cpu}
    try:
        for arm, overrides in ARMS.items():
            loop = heterogeneous.Loop(heterogeneous.WORK, overrides)
            try:
                loop.start(heterogeneous.worker_overrides(args.delay), judge_wrapper=wrapper(group))
                figures[arm] = heterogeneous.measure(loop, args.seconds)
                figures[arm]["staleness_mean"] = staleness_mean(loop)
            finally:
                loop.stop()
            print(arm, json.dumps(figures[arm]), flush=True)
    finally:
        group.rmdir()
    base, aware = figures["staleness_only"], figures["judge_aware"]
    for f in (base, aware):
        f["judged_groups_per_s"] = round((f["groups_trained"] + f["groups_dropped_stale"]) / args.seconds, 2)
    samples = 8  # grpo.num_generations_per_prompt of the tiny config
    for f in (base, aware):
        f["sequences_wasted_stale"] = f["groups_dropped_stale"] * samples
    figures["stale_waste_ratio"] = round(aware["groups_dropped_stale"] / max(base["groups_dropped_stale"], 1), 3)
    figures["steps_per_min_ratio"] = round(aware["steps_per_min"] / max(base["steps_per_min"], 1e-9), 3)
    targets = {"stale_waste_ratio": "<= 0.5", "steps_per_min_ratio": ">= 0.95"}
    met = (
        base["groups_dropped_stale"] > 0
        and aware["groups_dropped_stale"] <= 0.5 * base["groups_dropped_stale"]
        and figures["steps_per_min_ratio"] >= 0.95
    )
    learning.write("judge_backpressure", figures, targets, met)


def staleness_mean(loop: heterogeneous.Loop) -> float:
    records = loop.records()
    return round(sum(r.get("rollout/staleness_mean", 0.0) for r in records) / max(len(records), 1), 3)


if __name__ == "__main__":
    main()
