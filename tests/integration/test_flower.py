"""Flower against a real judge worker (`rlq worker judge`, a plain Celery worker): its API lists the judge and the
run's queue. Flower listens on 127.0.0.1 with basic auth, as docs/operations.md tells operators to run it."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from broker.keys import Keys
from broker.server import free_port
from tests.integration.judge_support import judge_argv, judge_config_file
from workers.judge.app import make_app

pytest.importorskip("flower")

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 90.0  # generous: the machine is shared
AUTH = "ops:flower-test-pw"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _workers(port: int) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/workers?refresh=1")
    request.add_header("Authorization", "Basic " + base64.b64encode(AUTH.encode()).decode())
    with urllib.request.urlopen(request, timeout=20) as response:
        return json.loads(response.read())


def test_flower_lists_the_judge(redis_url: str, run_name: str, tmp_path: Path) -> None:
    config = judge_config_file(tmp_path, redis_url, run_name)
    log = (tmp_path / "judge.log").open("ab")
    judge = subprocess.Popen(judge_argv(config, 1), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    node = f"judge-{run_name}-{judge.pid}@{socket.gethostname()}"
    port = free_port()
    flower_log = (tmp_path / "flower.log").open("ab")
    flower = None
    try:
        app = make_app(redis_url, run_name)
        deadline = time.monotonic() + WAIT_S
        while not app.control.ping(destination=[node], timeout=0.5):
            assert judge.poll() is None and time.monotonic() < deadline, (tmp_path / "judge.log").read_text()[-3000:]
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.judge.celery_app", "--broker", redis_url, "flower",
             "--address=127.0.0.1", f"--port={port}", f"--basic-auth={AUTH}"],
            cwd=REPO, stdout=flower_log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        workers: dict = {}
        while node not in workers:
            assert flower.poll() is None and time.monotonic() < deadline, (tmp_path / "flower.log").read_text()[-3000:]
            try:
                workers = _workers(port)
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        queues = [q["name"] for q in workers[node].get("active_queues") or []]
        assert Keys(run_name).judge_queue in queues, workers[node]
    finally:
        if flower is not None:
            _stop(flower)
        _stop(judge)
        log.close()
        flower_log.close()
