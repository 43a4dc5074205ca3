"""The live views and the Prometheus endpoint on a running tiny `rlq train`, as an operator uses them: the endpoint
that `logger.prometheus_port` has `rlq train` serve, and, from another terminal, `rlq workers` and `rlq top --once`
given only the run's saved config (the private broker is found from the run directory's `broker_url`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.server import free_port
from tests.ctrl_c import sigint_default
from tests.e2e.tiny_run import tiny_train_argv

pytestmark = pytest.mark.vllm  # ~80 s on 2 cores, most of it the tiny run itself
RUN_TIMEOUT_S = 900.0


def _scrape(port: int) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "run"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _rlq(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "rlq", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_views_and_metrics_while_training(tmp_path: Path, tiny_model_dir: Path) -> None:
    run_dir, port = tmp_path / "run", free_port()
    argv = tiny_train_argv(
        tmp_path,
        tiny_model_dir,
        "grpo.max_num_steps=8",
        "grpo.val_at_start=false",
        "grpo.val_period=0",
        f"logger.prometheus_port={port}",
    )
    env = {k: v for k, v in os.environ.items() if k != "RLQ_BROKER_URL"}
    train_log = (tmp_path / "train.log").open("w")
    train = subprocess.Popen(argv, cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=train_log,
                             stderr=subprocess.STDOUT, preexec_fn=sigint_default)  # fmt: skip
    config = run_dir / "config.yaml"
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (run_dir / "broker_url").exists() or not config.exists():
            assert train.poll() is None and time.monotonic() < deadline, (tmp_path / "train.log").read_text()[-3000:]
            time.sleep(0.5)
        got: dict[tuple, float] = {}
        while got.get(("rlq_learner_step", ()), 0) < 2 or got.get(("rlq_workers_alive", (("role", "generate"),))) != 1:
            assert train.poll() is None and time.monotonic() < deadline, (tmp_path / "train.log").read_text()[-3000:]
            time.sleep(1.0)
            try:
                got = _scrape(port)
            except (urllib.error.URLError, ConnectionError):
                continue
        assert got[("rlq_broker_up", ())] == 1 and got[("rlq_policy_version", ())] >= 2
        for name in ("rlq_reward_mean", "rlq_staleness_mean", "rlq_refit_seconds", "rlq_step_seconds",
                     "rlq_dead_letters", "rlq_judge_queue_depth", "rlq_judge_queue_unacked"):  # fmt: skip
            assert (name, ()) in got, name
        assert ("rlq_stream_pending", (("group", "learner"), ("stream", "scored"))) in got
        assert any(n == "rlq_worker_throughput" and ("role", "generate") in labels for n, labels in got)
        workers = _rlq("workers", "--config", str(config))
        rows = [line.split() for line in workers.splitlines()[2:]]
        assert any(row[1] == "generate" and row[-1] != "dead" for row in rows), workers
        assert any(row[1] == "judge" for row in rows), workers  # a judge registers once it has scored
        frame = _rlq("top", "--once", "--config", str(config))
        print(workers, frame, sep="\n")  # shown with -s: what an operator sees mid-run
        assert "judge queue rlq." in frame and "policy version" in frame and "prompts" in frame
        # The queue commands find the private broker and log in from the saved config too (read-only user).
        report = json.loads(_rlq("queues", "--json", "--config", str(config)))
        assert {s["name"] for s in report["streams"]} >= {"prompts", "scored"}, report
        assert json.loads(_rlq("dlq", "list", "--json", "-c", str(config)))["letters"] == []
        assert train.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, (tmp_path / "train.log").read_text()
        assert not (run_dir / "broker_url").exists(), "the note of the private broker goes with it"
    finally:
        if train.poll() is None:
            train.send_signal(signal.SIGINT)
            train.wait(60)
        train_log.close()
