"""The rollout log of real `rlq train` runs (private Redis, Celery judge, vLLM CPU worker, torchrun learner):
pandas reads it, `rlq rollouts` prints a step, `rlq replay` reproduces the loss curve, and two synchronous runs
with the same seed log the same rollouts (vLLM's per-request seeds derive from the group ids)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rlq.data import ArithConfig, prepare_arith

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.vllm
STEPS = 4


def _train(tmp_path: Path, model_dir: Path, name: str, *overrides: str) -> Path:
    data_dir = tmp_path / "arith"
    if not data_dir.exists():
        prepare_arith(data_dir, ArithConfig(n_train=200, n_val=20, seed=3))
    run_dir = tmp_path / name
    argv = [sys.executable, "-m", "rlq", "train", "--config", str(REPO / "configs" / "tiny_arith_cpu.yaml"),
            f"policy.model_name={model_dir}", f"data.path={data_dir}", f"logger.log_dir={run_dir}",
            f"checkpointing.checkpoint_dir={run_dir / 'ckpt'}", "logger.wandb_enabled=false",
            "grpo.num_prompts_per_step=8", "grpo.num_generations_per_prompt=4", "grpo.prompts_per_message=4",
            f"grpo.max_num_steps={STEPS}", "grpo.val_at_start=false", *overrides]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _losses(path: Path) -> list[float]:
    return [r["loss/total"] for r in map(json.loads, path.read_text().splitlines()) if "loss/total" in r]


def first_divergence(a: pd.DataFrame, b: pd.DataFrame) -> str:
    """Where two runs' trained rollouts first differ ("" when they do not): step, group, what."""
    for step in sorted(set(a.step) | set(b.step)):
        x, y = (f[f.step == step].sort_values(["group_index", "sample_index"]) for f in (a, b))
        if list(x.group_id) != list(y.group_id):
            same = set(x.group_id) == set(y.group_id)
            return f"step {step}: {'order of the groups' if same else 'groups'} differ"
        for (_, r), (_, s) in zip(x.iterrows(), y.iterrows(), strict=True):
            where = f"step {step} group {r.group_id} sample {r.sample_index}"
            ids, jds = list(r.completion_ids), list(s.completion_ids)
            if ids != jds:
                k = next((i for i, (t, u) in enumerate(zip(ids, jds, strict=False)) if t != u), min(len(ids), len(jds)))
                return f"{where}: token {k} of {len(ids)}/{len(jds)} differs"
            lp, lq = np.asarray(r.behaviour_logprobs), np.asarray(s.behaviour_logprobs)
            if not np.array_equal(lp, lq):
                return f"{where}: same tokens, logprobs differ by up to {np.abs(lp - lq).max():.3g}"
    return ""


def test_demo_run_logs_rollouts_that_pandas_reads_and_replay_reproduces(tmp_path, tiny_policy_dir):
    run_dir = _train(tmp_path, tiny_policy_dir, "run")
    frame = pd.read_parquet(run_dir / "rollouts")
    trained = frame[frame.dropped_reason.isna()]
    assert sorted(trained.step.unique()) == list(range(1, STEPS + 1)) and len(trained) == STEPS * 8 * 4
    assert set(trained.verdict) <= {"correct", "incorrect", "no_answer", "timeout", "error"}
    assert trained.worker_id.str.endswith("gen-0").all() and (trained.judge_id != "").all()
    assert trained.judge_verify_s.notna().all() and (trained.judge_latency_s > 0).all()
    assert trained.staleness.between(0, 1).all() and trained.completion_text.str.len().gt(0).any()

    shown = subprocess.run([sys.executable, "-m", "rlq", "rollouts", "--run-dir", str(run_dir), "--step", "2"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert shown.returncode == 0 and shown.stdout.startswith("step 2: 8 groups trained"), shown.stderr[-2000:]

    replay = subprocess.run([sys.executable, "-m", "rlq", "replay", "--run-dir", str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert replay.returncode == 0, replay.stderr[-3000:]
    run, replayed = _losses(run_dir / "metrics.jsonl"), _losses(run_dir / "replay" / "metrics.jsonl")
    assert len(run) == len(replayed) == STEPS
    assert max(abs(x - y) for x, y in zip(run, replayed, strict=True)) <= 1e-6, (run, replayed)


def test_two_synchronous_runs_with_the_same_seed_log_the_same_rollouts(tmp_path, tiny_policy_dir):
    sync = ("grpo.max_staleness=0", "cluster.generation_workers=1")
    run_dirs = [_train(tmp_path, tiny_policy_dir, name, *sync) for name in ("a", "b")]
    logs = [pd.read_parquet(run_dir / "rollouts") for run_dir in run_dirs]
    a, b = (f[f.dropped_reason.isna()] for f in logs)
    assert (a.staleness == 0).all() and (b.staleness == 0).all()
    divergence = first_divergence(a, b)
    print(f"synchronous runs: {divergence or 'identical rollouts (token ids and logprobs)'}")
    assert "token" not in divergence and "groups differ" not in divergence, divergence
    if not divergence:  # the same batches in the same order: the same updates
        assert _losses(run_dirs[0] / "metrics.jsonl") == _losses(run_dirs[1] / "metrics.jsonl")
