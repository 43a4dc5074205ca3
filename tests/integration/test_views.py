"""`rlq workers`, `rlq queues` (judge queue) and `rlq top` as a user types them, over a real Redis that the broker's
own functions populated: a registry, prompt batches pending on a worker, a dead letter, judge tasks queued and one
delivered to a consumer but not acknowledged, and a run directory with metrics.jsonl and events.jsonl."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ctrl_c import sigint_default
from tests.integration.views_support import Run, populated_run


@pytest.fixture
def populated(redis_url: str, run_name: str, tmp_path: Path) -> Iterator[Run]:
    with populated_run(redis_url, run_name, tmp_path) as run:
        yield run


def rlq(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "rlq", *args], capture_output=True, text=True, timeout=120,
                          env=full_env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc


def test_workers_lists_role_node_version_throughput_heartbeat_and_state(populated: Run) -> None:
    out = rlq("workers", "--config", str(populated.config)).stdout
    lines = out.splitlines()
    assert lines[0] == f"run {populated.keys.run}: 2 workers, 1 alive"
    assert lines[1].split() == ["WORKER", "ROLE", "NODE", "ACCELERATOR", "VERSION", "THROUGHPUT", "HEARTBEAT", "STATE"]
    gen = next(line for line in lines if line.startswith("gen-0")).split()
    assert gen[1] == "generate" and gen[3:6] == ["cpu", "3", "123.4"] and gen[-1] == "busy"
    judge = next(line for line in lines if line.startswith("judge-old")).split()
    assert judge[4] == "-" and judge[-1] == "dead" and float(judge[7].rstrip("s")) >= 50
    as_json = json.loads(rlq("workers", "--broker", populated.url, "--run", populated.keys.run, "--json").stdout)
    assert {w["worker_id"]: w["alive"] for w in as_json["workers"]} == {"gen-0": True, "judge-old": False}


def test_queues_shows_the_judge_queue(populated: Run) -> None:
    common = ("--broker", populated.url, "--run", populated.keys.run)
    text = rlq("queues", *common).stdout
    line = f"judge queue {populated.keys.judge_queue}: 2 waiting, 1 unacked (oldest "
    assert line in text, text
    jq = json.loads(rlq("queues", "--json", *common).stdout)["judge_queue"]
    assert (jq["depth"], jq["unacked"], jq["unacked_exact"], jq["consumers"]) == (2, 1, True, 0)
    assert 0 <= jq["oldest_unacked_age_s"] < 60 and jq["consumers_source"] == "registry"


def test_top_once_renders_a_frame(populated: Run) -> None:
    out = rlq("top", "--once", "--config", str(populated.config)).stdout
    assert f"rlq run {populated.keys.run}" in out
    for label, value in [
        ("policy version", "3"),
        ("step", "3"),
        ("reward", "0.750"),
        ("staleness", "0.50 max 1"),
        ("refit", "0.125s"),
        ("learner", "640 tok/s"),
        ("generation", "123 tok/s"),
        ("val accuracy", "0.625"),
        ("restarts", "generate-0 2, judge 1"),
        ("dead letters", "1"),
    ]:
        assert re.search(rf"(^|  ){label}\s+{re.escape(value)}( *$|  )", out, re.M), (label, out)
    assert "judge queue" in out and "2 waiting, 1 unacked" in out
    prompts = next(line for line in out.splitlines() if line.startswith("prompts")).split()
    assert prompts[:5] == ["prompts", "4", "generate", "1", "2"], "length, group, consumers, pending"
    assert "gen-0" in out and "123.4 tok/s" in out and "dead" in out


def test_top_refreshes_until_ctrl_c(populated: Run) -> None:
    argv = [sys.executable, "-m", "rlq", "top", "--interval", "0.3", "--broker", populated.url, "--run",
            populated.keys.run, "--run-dir", str(populated.run_dir)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"}, preexec_fn=sigint_default)  # fmt: skip
    try:
        time.sleep(4.0)  # start-up (imports) and a few refreshes
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)  # a bound on leaving, generous for a loaded machine
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and out.count("Ctrl-C to quit") >= 1 and "gen-0" in out
