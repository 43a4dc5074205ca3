"""Replay of a CPU run from its rollout log: a 20-step learner run (torchrun, one gloo rank) beside
`StandInRollouts`, then `rlq replay` on its log, in another process; the loss curve must come out the same.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pandas as pd

from tests.integration.learner_support import (
    REPO,
    StandInRollouts,
    read_jsonl,
    start_learner,
    write_config,
    write_prompts,
)

STEPS = 20
LOSS_TOLERANCE = 1e-6


def test_replay_reproduces_the_loss_curve_of_a_20_step_run(tmp_path, tiny_model_dir, redis_url, run_name):
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "learner.yaml", model=tiny_model_dir, data=write_prompts(tmp_path / "prompts.jsonl"),
        run=run_name, redis_url=redis_url, run_dir=run_dir, max_num_steps=STEPS, max_staleness=1,
    )  # fmt: skip
    rollouts = StandInRollouts(tiny_model_dir, redis_url, run_name)
    rollouts.start()
    started = time.monotonic()
    learner = start_learner(config, 1, tmp_path / "learner.log", "checkpointing.enabled=false",
                            "learner.rollout_log.flush_steps=7")  # fmt: skip
    try:
        rc = learner.wait(timeout=600)
    finally:
        rollouts.stop.set()
        if learner.poll() is None:
            learner.kill()
    assert rc == 0, (tmp_path / "learner.log").read_text()[-3000:]
    run_s = time.monotonic() - started

    # The log: every trained sample, readable by pandas, in parts of at most 7 steps
    frame = pd.read_parquet(run_dir / "rollouts")
    trained = frame[frame["dropped_reason"].isna()]
    assert sorted(trained["step"].unique()) == list(range(1, STEPS + 1))
    assert len(trained) == STEPS * 4 * 4
    assert len(list((run_dir / "rollouts").glob("part-*.parquet"))) == 3  # steps 1-7, 8-14, 15-20
    metrics = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "loss/total" in m]
    assert metrics[-1]["rollout/log_rows_lost"] == 0

    started = time.monotonic()
    out = tmp_path / "replay"
    replay = subprocess.run([sys.executable, "-m", "rlq", "replay", "--config", str(config), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert replay.returncode == 0, replay.stderr[-3000:]
    replay_s = time.monotonic() - started
    replayed = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in replayed] == list(range(1, STEPS + 1))
    diffs = [abs(a["loss/total"] - b["loss/total"]) for a, b in zip(metrics, replayed, strict=True)]
    print(f"run {run_s:.0f} s, replay {replay_s:.0f} s, max |loss difference| {max(diffs):.3g}")
    assert max(diffs) <= LOSS_TOLERANCE, diffs
    for key in ("rollout/reward_mean", "rollout/staleness_mean", "loss/grad_norm", "loss/entropy"):
        assert all(abs(a[key] - b[key]) <= LOSS_TOLERANCE for a, b in zip(metrics, replayed, strict=True)), key
    assert not (out / "rollouts").exists(), "a replay logs no rollouts of its own"
