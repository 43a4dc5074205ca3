"""The whole loop on one 2-GPU host: `rlq train` with the learner (NCCL) on GPU0, a transformers generation worker
(FastHFEngine) on GPU1, the Celery judge on CPU and a private Redis, on the tiny policy and arithmetic data.

Checks what the run records: one metrics line per step with versions advancing, every group scored, the weight
broadcast reaching the worker each step (`sync/*`), and the worker log naming an NCCL weight group on cuda:1.
Writes bench/results/gpu_loop.json (and $OUT, with the run's logs as gpu_loop_logs.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.gpu_common import out_dir, write_result

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "artifacts" / "tiny-policy"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--work", default="/tmp/rlq-gpu-loop")
    parser.add_argument("--worker-gpu", default="1", help="cluster.generation_gpus of the worker (the learner: 0).")
    parser.add_argument("--timeout", type=int, default=420)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("overrides", nargs="*", help="Extra rlq train overrides.")
    args = parser.parse_args()
    work = Path(args.work)
    data_dir, run_dir = work / "arith", work / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not data_dir.exists():
        subprocess.run([sys.executable, "-m", "rlq", "prepare-data", "--source", "arith", "-o", str(data_dir),
                        "--n-train", "400", "--n-val", "20"], check=True, env=env, cwd=REPO)  # fmt: skip
    argv = [sys.executable, "-m", "rlq", "train", "--config", str(REPO / "configs" / "tiny_arith_cpu.yaml"),
            f"policy.model_name={args.model}", f"data.path={data_dir}", f"logger.log_dir={run_dir}",
            f"checkpointing.checkpoint_dir={run_dir / 'ckpt'}", "logger.wandb_enabled=false",
            f"grpo.max_num_steps={args.steps}", "policy.generation.backend=hf", "grpo.val_at_start=false",
            "grpo.val_period=0", "cluster.learner_gpus=0", f"cluster.generation_gpus={args.worker_gpu}",
            *args.overrides]  # fmt: skip
    t0 = time.monotonic()
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.monotonic() - t0
    full = {p.name: p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*"))}
    logs = "\n".join(full.values())  # the checks read whole logs; the copy under $OUT keeps heads and tails
    dest = out_dir()
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
        excerpt = "\n".join(f"==> {n}\n{t[:4000]}\n...\n{t[-3000:]}" for n, t in full.items())
        (dest / "gpu_loop_logs.txt").write_text(f"rc {result.returncode}\n{result.stderr[-8000:]}\n{excerpt}")
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    steps = [r["step"] for r in records]
    figures: dict[str, Any] = {
        "setup": "rlq train: learner 1 rank NCCL on cuda:0, 1 transformers worker (FastHFEngine) on "
        f"{args.worker_device}, 1 Celery judge on CPU, private redis-server; tiny policy, arith data",
        "returncode": result.returncode,
        "wall_s": round(wall, 1),
        "steps": steps,
        "versions_advance": steps == list(range(1, args.steps + 1)),
        "groups_per_step": [r.get("rollout/groups") for r in records],
        "sync_members": [r.get("sync/members") for r in records],
        "sync_failed": [r.get("sync/failed") for r in records],
        "sync_s": [round(r.get("sync/seconds", 0.0), 4) for r in records],
        "sync_bytes": records[-1].get("sync/bytes") if records else None,
        "step_s": [round(r.get("perf/step_s", 0.0), 2) for r in records],
        "reward_mean": [round(r.get("rollout/reward_mean", 0.0), 3) for r in records],
        "learner_nccl": "nccl on cuda:0" in logs,
        "worker_joined_weight_group": "joined weight group" in logs,
        "worker_engine": f"FastHFEngine on {args.worker_device}" in logs,
    }
    ok = bool(
        result.returncode == 0
        and figures["versions_advance"]
        and all(m and m >= 1 for m in figures["sync_members"])
        and not any(figures["sync_failed"])
    )
    for k, v in figures.items():
        print(f"{k:20s} {v}")
    if result.returncode:
        print(result.stderr[-3000:])
    if not args.no_write:
        write_result("gpu_loop", figures, {"versions_advance": "== true", "sync_failed": "all 0"}, ok, dest)
    print(f"gpu_loop: {'ok' if ok else 'FAILED'}")


if __name__ == "__main__":
    main()
