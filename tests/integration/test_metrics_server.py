"""`rlq metrics-server` started as a user does, scraped with urllib: the named series with their values, basic auth,
the refusal to listen off loopback without credentials, and a prompt exit on SIGTERM."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.server import free_port
from tests.integration.views_support import Run, populated_run

START_TIMEOUT_S = 60.0


@pytest.fixture
def populated(redis_url: str, run_name: str, tmp_path: Path) -> Iterator[Run]:
    with populated_run(redis_url, run_name, tmp_path) as run:
        yield run


def start_server(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv = [sys.executable, "-m", "rlq", "metrics-server", "--port", str(port), *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})  # fmt: skip
    return proc, port


def scrape(port: int, auth: str | None = None, timeout_s: float = START_TIMEOUT_S) -> str:
    """The exposition text, waiting for the server to listen."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.read().decode()
        except urllib.error.URLError as exc:
            if isinstance(exc, urllib.error.HTTPError) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def samples(text: str) -> dict[tuple, float]:
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "run"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def stop(proc: subprocess.Popen) -> tuple[str, float]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    return err, time.monotonic() - started


def test_a_scrape_returns_the_runs_figures(populated: Run) -> None:
    proc, port = start_server("--config", str(populated.config))
    try:
        text = scrape(port)
        got = samples(text)
    finally:
        err, took = stop(proc)
    assert proc.returncode == 0 and took < 5, err
    expected = {
        ("rlq_broker_up", ()): 1,
        ("rlq_policy_version", ()): 3,
        ("rlq_learner_step", ()): 3,
        ("rlq_reward_mean", ()): 0.75,
        ("rlq_staleness_mean", ()): 0.5,
        ("rlq_staleness_max", ()): 1,
        ("rlq_refit_seconds", ()): 0.125,
        ("rlq_step_seconds", ()): 1.5,
        ("rlq_val_accuracy", ()): 0.625,
        ("rlq_stream_length", (("stream", "prompts"),)): 4,
        ("rlq_stream_pending", (("group", "generate"), ("stream", "prompts"))): 2,
        ("rlq_stream_lag", (("group", "generate"), ("stream", "prompts"))): 1,
        ("rlq_stream_max_deliveries", (("group", "generate"), ("stream", "prompts"))): 1,
        ("rlq_dead_letters", ()): 1,
        ("rlq_judge_queue_depth", ()): 2,
        ("rlq_judge_queue_unacked", ()): 1,
        ("rlq_judge_queue_consumers", ()): 0,
        ("rlq_worker_throughput", (("node", os.uname().nodename), ("role", "generate"), ("worker", "gen-0"))): 123.4,
        ("rlq_worker_policy_version", (("node", os.uname().nodename), ("role", "generate"), ("worker", "gen-0"))): 3,
        ("rlq_worker_up", (("node", os.uname().nodename), ("role", "judge"), ("worker", "judge-old"))): 0,
        ("rlq_workers_alive", (("role", "generate"),)): 1,
        ("rlq_restarts_total", (("role", "generate-0"),)): 2,
        ("rlq_restarts_total", (("role", "judge"),)): 1,
        ("rlq_step_metric", (("name", "perf/tokens_per_s"),)): 640,
    }
    for key, value in expected.items():
        assert got.get(key) == pytest.approx(value), (key, got.get(key))
    assert got[("rlq_stream_oldest_pending_age_seconds", (("group", "generate"), ("stream", "prompts")))] >= 0
    assert 0 <= got[("rlq_judge_queue_oldest_unacked_age_seconds", ())] < 60
    assert f'run="{populated.keys.run}"' in text, "every series names its run"


def test_basic_auth_and_a_secret_that_is_never_logged(populated: Run) -> None:
    secret = "s3cr3t-9f2a"
    env = {"RLQ_METRICS_AUTH": f"prom:{secret}", "RLQ_LOG_LEVEL": "DEBUG"}
    proc, port = start_server("--config", str(populated.config), env=env)
    try:
        assert "rlq_policy_version" in scrape(port, auth=f"prom:{secret}")
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(port, auth="prom:wrong")
        assert refused.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            scrape(port)
        assert anonymous.value.code == 401
    finally:
        err, _ = stop(proc)
    assert proc.returncode == 0, err
    assert "basic auth" in err and secret not in err


def test_off_loopback_without_credentials_is_refused_in_one_line(populated: Run) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RLQ_METRICS_AUTH"}
    proc = subprocess.run(
        [sys.executable, "-m", "rlq", "metrics-server", "--config", str(populated.config), "--addr", "0.0.0.0",
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "rlq: refusing to serve metrics on 0.0.0.0 without credentials: set RLQ_METRICS_AUTH=user:password "
        "(HTTP basic auth), or keep --addr 127.0.0.1"
    ]


def test_the_run_directory_figures_survive_a_missing_broker(tmp_path: Path, populated: Run) -> None:
    dead_url = f"redis://127.0.0.1:{free_port()}/0"
    proc, port = start_server("--broker", dead_url, "--run", populated.keys.run, "--run-dir", str(populated.run_dir))
    try:
        got = samples(scrape(port))
    finally:
        err, _ = stop(proc)
    assert got[("rlq_broker_up", ())] == 0 and got[("rlq_reward_mean", ())] == 0.75, err
    assert ("rlq_judge_queue_depth", ()) not in got
