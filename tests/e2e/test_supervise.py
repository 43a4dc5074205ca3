"""`rlq train`'s supervision, as a user meets it: a generation worker SIGKILLed mid-run is restarted and the run
completes; SIGTERM to `rlq train` stops every process it started within 10 s, the learner checkpointing first.
Two vLLM CPU generation workers, the real Celery judge and the torchrun learner on the untrained tiny policy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from rlq.data import ArithConfig, prepare_arith

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.vllm
STOP_BOUND_S = 10.0


def _start(tmp_path: Path, model_dir: Path, *overrides: str) -> subprocess.Popen:
    data_dir = tmp_path / "arith"
    prepare_arith(data_dir, ArithConfig(n_train=200, n_val=20, seed=3))
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "rlq", "train", "--config", str(REPO / "configs" / "tiny_arith_cpu.yaml"),
            f"policy.model_name={model_dir}", f"data.path={data_dir}", f"logger.log_dir={run_dir}",
            f"checkpointing.checkpoint_dir={run_dir / 'ckpt'}", "logger.wandb_enabled=false",
            "grpo.num_prompts_per_step=8", "grpo.num_generations_per_prompt=4", "grpo.prompts_per_message=4",
            "grpo.val_at_start=false", "cluster.generation_workers=2", *overrides]  # fmt: skip
    out = open(tmp_path / "train.out", "w")  # noqa: SIM115  (the child holds it; closed when the test ends)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [r["step"] for r in records if "loss/total" in r]


def _wait_for_step(train: subprocess.Popen, run_dir: Path, step: int, timeout_s: float = 400) -> None:
    deadline = time.monotonic() + timeout_s
    while max(_steps(run_dir), default=0) < step:
        assert train.poll() is None, f"rlq train ended (code {train.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout_s:.0f} s"
        time.sleep(0.5)


def _role(train: subprocess.Popen, title: str) -> psutil.Process:
    """A role process of this `rlq train` by its process title (`rlq worker generate <worker id> (<run>)`)."""
    [role] = [p for p in psutil.Process(train.pid).children() if title in " ".join(p.cmdline())]
    return role


def _output(tmp_path: Path) -> str:
    return (tmp_path / "train.out").read_text()[-4000:]


def test_a_sigkilled_generation_worker_is_restarted_and_the_run_completes(tmp_path, tiny_model_dir):
    train = _start(tmp_path, tiny_model_dir, "grpo.max_num_steps=12", "checkpointing.save_period=4")
    run_dir = tmp_path / "run"
    try:
        _wait_for_step(train, run_dir, 3)
        victim = _role(train, "rlq worker generate tiny-arith-gen-1 ")
        victim.kill()
        assert train.wait(timeout=500) == 0, _output(tmp_path)
    finally:
        if train.poll() is None:
            train.send_signal(signal.SIGTERM)
            train.wait(timeout=60)
    assert _steps(run_dir) == list(range(1, 13)), "every step of the run, versions advancing"
    [event] = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert event["role"] == "generate-1" and event["cause"].startswith("was killed by SIGKILL")
    assert event["restart"] == 1 and event["backoff_s"] == 1.0
    log = (run_dir / "logs" / "generate-1.log").read_text()
    restarted = log.split("=== rlq train: restart 1 of generate-1 ===")
    assert len(restarted) == 2 and "tiny-arith-gen-1 starts from" in restarted[1], "a new worker process started"
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    trained = [group for entry in ledger for group in entry["trained"]]
    assert len(trained) == len(set(trained)) == 12 * 8, "no group lost or trained twice"
    assert "generate-1 was killed by SIGKILL" in _output(tmp_path) and "restarts 1" in _output(tmp_path)


@pytest.mark.slow  # 55-90 s on the shared 2-core machine
def test_sigterm_stops_every_role_within_10_s_after_the_learner_checkpoints(tmp_path, tiny_model_dir):
    # No periodic checkpoint: the one on disk afterwards is the one the stop made.
    train = _start(tmp_path, tiny_model_dir, "grpo.max_num_steps=200", "checkpointing.save_period=1000")
    run_dir = tmp_path / "run"
    try:
        _wait_for_step(train, run_dir, 3)
        started = psutil.Process(train.pid).children(recursive=True)  # redis, judge (+ pool), workers, torchrun + rank
        assert len(started) >= 6
        train.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        gone, alive = psutil.wait_procs(started, timeout=STOP_BOUND_S)
        stop_s = time.monotonic() - sent
        assert not alive, f"still running {STOP_BOUND_S:.0f} s after SIGTERM: {[p.pid for p in alive]}"
        assert train.wait(timeout=30) == 128 + signal.SIGTERM, _output(tmp_path)
    finally:
        if train.poll() is None:
            train.kill()
            train.wait(timeout=60)
    last = max(_steps(run_dir))
    assert (run_dir / "ckpt" / f"step_{last}").is_dir(), f"a checkpoint of the last step {last}"
    assert "stopped by SIGTERM; every role stopped" in _output(tmp_path)
    sys.stderr.write(f"every role gone {stop_s:.1f} s after SIGTERM\n")
