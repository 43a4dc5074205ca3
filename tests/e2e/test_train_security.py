"""#22 end to end: `rlq train` with defaults runs a Redis nobody can use without the run's credentials, and the whole
tiny loop (vLLM worker, Celery judge, torchrun learner) runs with each role logged in as its own ACL user, over
plain TCP and over TLS with a per-run CA (docs/security.md). 3 steps each, as tests/e2e/test_train.py."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import redis

from broker.acl import ADMIN, USERS, password_for, write_acl_file
from broker.server import RedisServer, TlsFiles
from tests.e2e.tiny_run import REPO, tiny_train_argv

pytestmark = pytest.mark.vllm
SHORT = ("grpo.max_num_steps=3", "grpo.val_period=3", "grpo.max_val_samples=8")


def _clean_env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RLQ_")}, "PYTHONUNBUFFERED": "1"}


def _steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss/total" in r]


def test_default_train_broker_refuses_anyone_without_the_password_and_no_log_holds_it(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    argv = tiny_train_argv(tmp_path, tiny_model_dir, *SHORT)
    train = subprocess.Popen(argv, cwd=tmp_path, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "broker_url").exists() and time.monotonic() < deadline:
            assert train.poll() is None, train.communicate()[1][-3000:]
            time.sleep(0.2)
        url = (run_dir / "broker_url").read_text().strip()
        secret_file = run_dir / "broker_secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600 and "@" not in url, "no password in the URL file"
        secret = secret_file.read_text().strip()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url).ping()  # no password
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url, password=secret).ping()  # the secret is no user's password
        # Another terminal of the same Unix user: found through the run directory, logged in read-only.
        queues = subprocess.run([*argv[:3], "queues", "--json", "--broker", url, "--run", "tiny-arith"],
                                env=_clean_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
        assert queues.returncode == 2, "without the run directory it has no credentials"
        workers = subprocess.run([*argv[:3], "workers", "--config", str(run_dir / "config.yaml")], env=_clean_env(),
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
        assert workers.returncode == 0, workers.stderr
        out, err = train.communicate(timeout=900)
    finally:
        if train.poll() is None:
            train.kill()
    assert train.returncode == 0, err[-3000:]
    assert _steps(run_dir) == [1, 2, 3]
    assert not secret_file.exists(), "removed with the server"
    secrets = [secret, *(password_for(secret, user) for user in USERS)]
    texts = {"stdout": out, "stderr": err}
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix not in (".safetensors", ".png", ".parquet", ".aof", ".rdb", ".bin"):
            texts[str(path)] = path.read_text(errors="replace")
    leaks = [(name, s[:6]) for name, text in texts.items() for s in secrets if s in text]
    assert not leaks, f"a secret in {leaks}"
    assert "RLQ_REDIS_PASSWORD" not in (run_dir / "logs" / "commands.txt").read_text()


def _make_tls(tmp_path: Path) -> TlsFiles:
    """The Slurm scripts' own per-run CA (slurm/common.sh make_tls), for 127.0.0.1."""
    env = {**os.environ, "RLQ_CONFIG": "c.yaml", "RLQ_RUN_DIR": str(tmp_path / "tlsrun"), "RLQ_RUN": "t"}
    subprocess.run(["bash", "-c", "source slurm/common.sh && make_tls 127.0.0.1"], cwd=REPO, env=env, check=True,
                   timeout=120)  # fmt: skip
    tls = tmp_path / "tlsrun" / "tls"
    return TlsFiles(tls / "server.crt", tls / "server.key", tls / "ca.crt")


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_the_tiny_loop_runs_with_each_role_as_its_own_user(tmp_path, tiny_model_dir, scheme):
    """An external broker with the run's ACL (and an admin user for the test only): `rlq train` given the secret
    hands each role its user; no command of any role is refused (ACL LOG stays empty)."""
    secret, admin_password = "loop-secret", "loop-admin"
    acl = write_acl_file(tmp_path / "users.acl", "tiny-arith", secret, admin_password)
    tls = _make_tls(tmp_path) if scheme == "rediss" else None
    env = {**_clean_env(), "RLQ_REDIS_SECRET": secret}
    if tls is not None:
        env["RLQ_REDIS_TLS_CA"] = str(tls.ca)
    with RedisServer(directory=tmp_path / "redis", acl_file=acl, tls=tls) as server:
        admin = redis.Redis.from_url(server.url, username=ADMIN, password=admin_password,
                                     **({"ssl_ca_certs": str(tls.ca)} if tls else {}))  # fmt: skip
        if tls is not None:  # the port speaks TLS only
            with pytest.raises(redis.exceptions.ConnectionError):
                redis.Redis(port=server.port, username=ADMIN, password=admin_password, socket_timeout=5).ping()
        argv = tiny_train_argv(tmp_path, tiny_model_dir, *SHORT, f"broker.url={server.url}")
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        denied = admin.acl_log(count=100)
        assert denied == [], denied
        clients = {c["user"] for c in admin.client_list()}
    assert _steps(tmp_path / "run") == [1, 2, 3]
    assert clients <= {ADMIN}, "every role has left"
    assert secret not in result.stderr + (tmp_path / "run" / "logs" / "commands.txt").read_text()
