"""`rlq train`'s supervision, as a user meets it: a generation worker and then the judge SIGKILLed mid-run are
restarted and the run completes; `rlq scale` from another terminal adds and removes workers of a live run; Ctrl-C
(SIGINT) to `rlq train` stops every process it started within 10 s, the learner checkpointing first, and the same
command started again resumes from that checkpoint with nothing lost or trained twice. vLLM CPU generation
workers, the real Celery judge and the torchrun learner on the untrained tiny policy.
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

from tests.ctrl_c import sigint_default
from tests.e2e.tiny_run import tiny_train_argv

pytestmark = pytest.mark.vllm
STOP_BOUND_S = 10.0


def _start(tmp_path: Path, model_dir: Path, *overrides: str) -> subprocess.Popen:
    argv = tiny_train_argv(tmp_path, model_dir, "grpo.val_at_start=false", "cluster.generation_workers=2", *overrides)
    out = open(tmp_path / "train.out", "w")  # noqa: SIM115  (the child holds it; closed when the test ends)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                            preexec_fn=sigint_default)  # fmt: skip


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


# The judge's deadlines made short enough that a task the killed judge held comes back within ~30 s (the default
# visibility timeout is 120 s), which is what an operator who expects judge deaths would set too.
SHORT_JUDGE = ["env.math.answer_timeout_s=2", "env.math.group_timeout_s=10", "env.math.task_time_limit_s=20",
               "env.math.visibility_timeout_s=25"]  # fmt: skip


def _trained_groups(run_dir: Path) -> list[str]:
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    return [group for entry in ledger for group in entry["trained"]]


def test_sigkilled_workers_and_judges_are_restarted_and_the_run_completes(tmp_path, tiny_model_dir):
    train = _start(tmp_path, tiny_model_dir, "grpo.max_num_steps=12", "checkpointing.save_period=4", *SHORT_JUDGE)
    run_dir = tmp_path / "run"
    try:
        _wait_for_step(train, run_dir, 3)
        _role(train, "rlq worker generate tiny-arith-gen-1 ").kill()
        _wait_for_step(train, run_dir, 6)
        # The Celery main process (Celery retitles it "[celeryd: judge-<run>-<pid>@host:MainProcess] ..."); its pool
        # goes with its process group.
        _role(train, "celeryd: judge-").kill()
        assert train.wait(timeout=600) == 0, _output(tmp_path)
    finally:
        if train.poll() is None:
            train.send_signal(signal.SIGTERM)
            train.wait(timeout=60)
    assert _steps(run_dir) == list(range(1, 13)), "every step of the run, versions advancing"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [(e["role"], e["restart"], e["backoff_s"]) for e in events] == [("generate-1", 1, 1.0), ("judge", 1, 1.0)]
    assert all(e["cause"].startswith("was killed by SIGKILL") for e in events)
    log = (run_dir / "logs" / "generate-1.log").read_text()
    restarted = log.split("=== rlq train: restart 1 of generate-1 ===")
    assert len(restarted) == 2 and "tiny-arith-gen-1 starts from" in restarted[1], "a new worker process started"
    judge_log = (run_dir / "logs" / "judge.log").read_text().split("=== rlq train: restart 1 of judge ===")
    assert len(judge_log) == 2 and "ready." in judge_log[1], "a new Celery judge came up"
    trained = _trained_groups(run_dir)
    assert len(trained) == len(set(trained)) == 12 * 8, "no group lost or trained twice"
    assert "generate-1 was killed by SIGKILL" in _output(tmp_path) and "restarts 2" in _output(tmp_path)


def _rlq(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlq", *args], capture_output=True, text=True, timeout=timeout)


def _worker_status(config: str, worker_id: str) -> str | None:
    """The worker's state as `rlq workers --json` shows it (None: not listed)."""
    listed = json.loads(_rlq("workers", "--config", config, "--json").stdout)["workers"]
    return next((w["status"] for w in listed if w["worker_id"] == worker_id), None)


def test_rlq_scale_adds_and_removes_workers_of_a_live_run(tmp_path, tiny_model_dir):
    steps = 150  # long enough (1-2 min) for a new vLLM worker to load and train a few steps
    train = _start(tmp_path, tiny_model_dir, f"grpo.max_num_steps={steps}", "cluster.generation_workers=1")
    run_dir = tmp_path / "run"
    config = str(run_dir / "config.yaml")  # all another terminal needs: the broker is found from the run directory
    try:
        _wait_for_step(train, run_dir, 2)
        up = _rlq("scale", "--config", config, "generate=2", "judge=2")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "generate: 2 processes asked for, 2 workers alive" in up.stdout, up.stdout
        assert "judge: 2 processes asked for, 2 workers alive" in up.stdout, up.stdout
        deadline = time.monotonic() + 300
        while _worker_status(config, "tiny-arith-gen-1") in (None, "starting"):  # loading its engine
            assert train.poll() is None and time.monotonic() < deadline, _output(tmp_path)
            time.sleep(1.0)
        _wait_for_step(train, run_dir, max(_steps(run_dir)) + 2)  # the new worker serves while these train
        down = _rlq("scale", "--config", config, "generate=1")
        assert down.returncode == 0 and "generate: 1 processes asked for, 1 workers alive" in down.stdout, down.stdout
        bad = _rlq("scale", "--config", config, "learner=3")
        assert bad.returncode != 0 and "cannot scale 'learner'" in bad.stderr and "Traceback" not in bad.stderr
        assert train.wait(timeout=600) == 0, _output(tmp_path)
    finally:
        if train.poll() is None:
            train.send_signal(signal.SIGTERM)
            train.wait(timeout=60)
    assert _steps(run_dir) == list(range(1, steps + 1))
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [(e["role"], e["scaled"]) for e in events] == [("generate-1", "up"), ("judge-1", "up"),
                                                          ("generate-1", "down")]  # fmt: skip
    assert "generate-1 left (scaled down; exit code 0)" in (tmp_path / "train.out").read_text(), "left cleanly, once"
    trained = _trained_groups(run_dir)
    assert len(trained) == len(set(trained)) == steps * 8, "no group lost or trained twice"


@pytest.mark.slow  # two runs: 2-3 min on the shared 2-core machine
@pytest.mark.parametrize("stop_signal", [signal.SIGINT])
def test_ctrl_c_stops_every_role_within_10_s_and_the_run_resumes_from_its_checkpoint(
    tmp_path, tiny_model_dir, stop_signal
):
    # No periodic checkpoint: the one on disk afterwards is the one the stop made.
    train = _start(tmp_path, tiny_model_dir, "grpo.max_num_steps=200", "checkpointing.save_period=1000")
    run_dir = tmp_path / "run"
    try:
        _wait_for_step(train, run_dir, 3)
        started = psutil.Process(train.pid).children(recursive=True)  # redis, judge (+ pool), workers, torchrun + rank
        assert len(started) >= 6
        train.send_signal(stop_signal)
        sent = time.monotonic()
        gone, alive = psutil.wait_procs(started, timeout=STOP_BOUND_S)
        stop_s = time.monotonic() - sent
        assert not alive, f"still running {STOP_BOUND_S:.0f} s after {stop_signal.name}: {[p.pid for p in alive]}"
        assert train.wait(timeout=30) == 128 + stop_signal, _output(tmp_path)
    finally:
        if train.poll() is None:
            train.kill()
            train.wait(timeout=60)
    last = max(_steps(run_dir))
    assert (run_dir / "ckpt" / f"step_{last}").is_dir(), f"a checkpoint of the last step {last}"
    assert f"stopped by {stop_signal.name}; every role stopped" in _output(tmp_path)
    sys.stderr.write(f"every role gone {stop_s:.1f} s after {stop_signal.name}\n")
    before = _trained_groups(run_dir)
    # The same command again, asking for two more steps: it resumes from that checkpoint (and the private broker's
    # append-only file in the run directory), so the streams carry on where they were.
    again = _start(tmp_path, tiny_model_dir, f"grpo.max_num_steps={last + 2}", "checkpointing.save_period=1000")
    assert again.wait(timeout=500) == 0, _output(tmp_path)
    assert _steps(run_dir) == list(range(1, last + 3)), "steps continue from the checkpoint, none repeated"
    trained = _trained_groups(run_dir)
    assert trained[: len(before)] == before and len(trained) == len(set(trained)) == (last + 2) * 8
