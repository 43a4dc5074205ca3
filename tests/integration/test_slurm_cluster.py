"""The sbatch scripts on a real Slurm: a private one-machine cluster (scripts/slurm_local_cluster.sh: Debian's
slurmctld, three slurmd under the node aliases rlq-n0..2, munge) runs each script with the tiny CPU config for three
steps, and each run must finish with versions advancing, the weights reaching a worker on another "node", and the
roles stopped in order (the nodes idle again, none drained).

Slow: the three tests take 43-55 s each on this 2-core machine (a vLLM CPU engine starts in each), about three
minutes with the cluster's start. The fixture installs Debian's Slurm itself (through the script) when it is
missing; the module is skipped without root or where apt-get cannot install it. tests/integration/test_slurm.py
renders the same scripts without Slurm.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.acl import GENERATE, password_for
from rlq.data import ArithConfig, prepare_arith

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "scripts" / "slurm_local_cluster.sh"
pytestmark = [pytest.mark.slow, pytest.mark.vllm]
log_ = logging.getLogger(__name__)
RUNNING_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}

TINY = ["grpo.max_num_steps=3", "grpo.val_period=3", "grpo.max_val_samples=8", "grpo.num_prompts_per_step=8",
        "grpo.num_generations_per_prompt=4", "grpo.prompts_per_message=4", "logger.wandb.mode=offline"]  # fmt: skip


def _free_ports(count: int) -> int:
    """A base port with `count` consecutive free loopback ports after it."""
    for _ in range(200):
        base = random.randint(20000, 40000)
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """The local cluster, up for this module; yields the environment its clients need (SLURM_CONF)."""
    if os.geteuid() != 0:
        pytest.skip("the local cluster's daemons (and apt-get, if Slurm is missing) need root")
    directory = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "RLQ_SLURM_PORT": str(_free_ports(4)), "RLQ_SLURM_NODES": "3"}
    started = subprocess.run(["bash", str(CLUSTER), "start", str(directory)], env=env, capture_output=True,
                             text=True, timeout=900)  # fmt: skip
    if started.returncode == 3:
        pytest.skip(f"no Slurm here: {started.stderr.strip()}")
    assert started.returncode == 0, started.stderr[-3000:]
    env["SLURM_CONF"] = str(directory / "etc" / "slurm.conf")
    env.pop("WANDB_API_KEY", None)  # W&B offline, whatever the machine has
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(directory)], env=env, timeout=120)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("arith")
    prepare_arith(directory, ArithConfig(n_train=200, n_val=20, seed=3))
    return directory


def _sbatch(env: dict[str, str], run_dir: Path, script: str, sbatch_args: list[str], overrides: list[str],
            **extra_env: str) -> str:  # fmt: skip
    """Submit `script` and wait for it; returns its job id after checking Slurm recorded it COMPLETED. The
    multi-node runs make their own run secret (or take RLQ_REDIS_PASSWORD): their Redis listens on every interface."""
    base = _free_ports(2)
    full_env = {**env, "RLQ_REPO": str(REPO), "RLQ_PYTHON": sys.executable, "RLQ_RUN_DIR": str(run_dir),
                "RLQ_CONFIG": "configs/tiny_arith_cpu.yaml", "RLQ_REDIS_PORT": str(base),
                "RLQ_TORCH_PORT": str(base + 1), "GPUS_PER_NODE": "1",
                "PYTHONUNBUFFERED": "1", **extra_env}  # fmt: skip
    output = run_dir.parent / f"{run_dir.name}-%j.out"
    argv = ["sbatch", "--parsable", f"--output={output}", *sbatch_args, str(REPO / "slurm" / script), *TINY,
            *overrides]  # fmt: skip
    submitted = subprocess.run(argv, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    records = _wait_for_job(env, job)
    batch_output = Path(str(output).replace("%j", job))
    log = batch_output.read_text() if batch_output.exists() else "(no batch output)"
    assert all("JobState=COMPLETED" in r for r in records), f"{records}\n{log[-3000:]}"
    log_.info("%s: job %s ran %s", script, job, re.search(r"RunTime=(\S+)", records[0]).group(1))
    return job


def _wait_for_job(env: dict[str, str], job: str, timeout_s: float = 600.0) -> list[str]:
    """Poll the job (every component of a hetjob) until it has ended; returns scontrol's one-line records.
    (`sbatch --wait` polls at doubling intervals and added up to half a minute per job here.)"""
    deadline = time.monotonic() + timeout_s
    while True:
        shown = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True)
        records = shown.stdout.splitlines()
        states = {m.group(1) for r in records if (m := re.search(r"JobState=(\S+)", r))}
        if states and not states & RUNNING_STATES:
            return records
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=env)
            raise AssertionError(f"job {job} still {states} after {timeout_s:.0f}s")
        time.sleep(1.0)


def _assert_run_finished(run_dir: Path, learner_log: str) -> None:
    everything = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in everything if "loss/total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3], "one record per step, versions advancing"
    assert all(r["sync/members"] >= 1 and r["sync/failed"] == 0 for r in steps), "weights reached the worker"
    assert all(r["rollout/groups"] == 8 for r in steps), "every group scored by the judge"
    assert sorted(r["val/policy_version"] for r in everything if "val/accuracy" in r) == [0, 3]
    assert (run_dir / "checkpoints" / "step_3").is_dir()
    assert "checkpoint" in (run_dir / "logs" / learner_log).read_text()
    # W&B (offline) and the curves, as `rlq train` leaves them
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb")), "an offline W&B run"
    for png in ("reward.png", "staleness.png", "sync_time.png"):
        assert (run_dir / png).stat().st_size > 0, png


def _assert_nodes_idle(env: dict[str, str], timeout_s: float = 30.0) -> None:
    """Every role was stopped: within a few seconds every node is idle again, none left allocated or drained by a
    task that would not die."""
    deadline = time.monotonic() + timeout_s
    while True:
        shown = subprocess.run(["sinfo", "--noheader", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True)
        states = dict(line.split() for line in shown.stdout.splitlines())
        if set(states.values()) == {"idle"} and len(states) == 3:
            return
        assert not {"drain", "drng", "down"} & set(states.values()), states
        if time.monotonic() > deadline:
            raise AssertionError(f"nodes not idle after {timeout_s:.0f}s: {states} (squeue: {_queue(env)})")
        time.sleep(1.0)


def _queue(env: dict[str, str]) -> str:
    return subprocess.run(["squeue", "-o", "%i %T %r"], env=env, capture_output=True, text=True).stdout


def test_single_node_script_runs_rlq_train(slurm, tmp_path, tiny_model_dir, data_dir):
    run_dir = tmp_path / "single"
    _sbatch(slurm, run_dir, "rlq_single_node.sbatch", [], _inputs(tiny_model_dir, data_dir))
    _assert_run_finished(run_dir, "learner.log")
    _assert_nodes_idle(slurm)


def test_multi_node_script_places_roles_on_three_nodes(slurm, tmp_path, tiny_model_dir, data_dir):
    run_dir = tmp_path / "multi"
    # No secret given: the script makes one (#22); TLS with the run's own CA, every step as its own Redis user.
    _sbatch(slurm, run_dir, "rlq_multi_node.sbatch", ["--nodes=3"], _inputs(tiny_model_dir, data_dir),
            LEARNER_NODES="1", JUDGE_NODES="1", RLQ_REDIS_TLS="1")  # fmt: skip
    _assert_run_finished(run_dir, "learner-0.log")
    commands = (run_dir / "commands.sh").read_text()
    assert "--nodelist=rlq-n2" in commands and "--nodelist=rlq-n1" in commands, "judge and generation nodes"
    assert "rediss://127.0.0.1:" in commands, "the head's NodeAddr, not its alias, in the broker URL"
    secret = (run_dir / "broker_secret").read_text().strip()
    logs = [path.read_text(errors="replace") for path in (run_dir / "logs").glob("*.log")]
    assert not any(s in text for s in (secret, password_for(secret, GENERATE)) for text in [commands, *logs])
    assert "weights v3 loaded" in (run_dir / "logs" / "generate-0.log").read_text()
    assert "Warm shutdown" in (run_dir / "logs" / "judge-0.log").read_text(), "the judge stopped on SIGTERM"
    assert "5 records tracked" in (run_dir / "logs" / "track.log").read_text()
    _assert_nodes_idle(slurm)


def test_hetjob_script_runs_three_components(slurm, tmp_path, tiny_model_dir, data_dir):
    run_dir = tmp_path / "het"
    # One node per component, and one CPU for the judges' (the script asks for 2 GPU nodes and 64 CPUs).
    components = ["--nodes=1", ":", "--nodes=1", ":", "--nodes=1", "--cpus-per-task=1"]
    _sbatch(slurm, run_dir, "rlq_hetjob.sbatch", components, _inputs(tiny_model_dir, data_dir),
            RLQ_REDIS_PASSWORD=secrets.token_hex(12))  # fmt: skip
    _assert_run_finished(run_dir, "learner-0.log")
    commands = (run_dir / "commands.sh").read_text()
    assert all(f"--het-group={g}" in commands for g in (0, 1, 2))
    assert "5 records tracked" in (run_dir / "logs" / "track.log").read_text()
    _assert_nodes_idle(slurm)


def _inputs(model_dir: Path, data_dir: Path) -> list[str]:
    return [f"policy.model_name={model_dir}", f"data.path={data_dir}"]
