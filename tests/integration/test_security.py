"""#22: a broker started by rlq takes no client without the run's credentials, and each role's Redis user can do
only what that role does (real redis-server with the ACL file of broker/acl.py; docs/security.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from broker.acl import ADMIN, GENERATE, INSPECT, JUDGE, LEARNER, USERS, RunAcl, password_for, write_acl_file
from broker.keys import Keys
from broker.server import RedisServer, free_port
from broker.streams import send_dead_letter

SECRET = "test-run-secret"
ADMIN_PASSWORD = "test-admin"
FORBIDDEN = [("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("CONFIG", "SET", "appendonly", "no"), ("KEYS", "*"),
             ("DEBUG", "SLEEP", "0"), ("SHUTDOWN", "NOSAVE"), ("MODULE", "LIST"), ("REPLICAOF", "NO", "ONE"),
             ("ACL", "LIST"), ("MONITOR",)]  # fmt: skip


@pytest.fixture
def acl_server(tmp_path: Path, run_name: str):
    acl = write_acl_file(tmp_path / "users.acl", run_name, SECRET, ADMIN_PASSWORD)
    with RedisServer(directory=tmp_path / "redis", acl_file=acl) as server:
        yield server


def login(server: RedisServer, user: str, password: str | None = None) -> redis.Redis:
    return redis.Redis(port=server.port, username=user, password=password or password_for(SECRET, user))


def role_env(user: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLQ_")}
    return {**env, "RLQ_REDIS_USER": user, "RLQ_REDIS_PASSWORD": password_for(SECRET, user)}


def test_the_acl_file_holds_hashes_only_and_is_private(tmp_path: Path, run_name: str):
    path = write_acl_file(tmp_path / "users.acl", run_name, SECRET)
    text = path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    assert SECRET not in text and not any(password_for(SECRET, user) in text for user in USERS)
    assert ADMIN not in text, "no admin unless a test asks for one"
    default = next(line for line in text.splitlines() if line.startswith("user default "))
    assert " nopass" not in default and "+@all" not in default and "-flushall" in default


def test_transactions_survive_a_restart_from_the_append_only_file(tmp_path: Path, run_name: str):
    """Redis replays the AOF as `default`: were it off, every MULTI/EXEC and Lua effect would be dropped on
    restart (redis/redis#14541): the fault suite's Redis SIGKILL then accounted for 8 of 40 trained groups."""
    keys = Keys(run_name)
    acl = write_acl_file(tmp_path / "users.acl", run_name, SECRET, ADMIN_PASSWORD)
    server = RedisServer(directory=tmp_path / "redis", acl_file=acl, appendonly=True,
                         extra_args=["--appendfsync", "always"]).start()  # fmt: skip
    gen = login(server, GENERATE)
    with gen.pipeline(transaction=True) as pipe:
        pipe.hset(keys.workers, "w0", b"beat").set(keys.worker_alive("w0"), b"1")
        pipe.execute()
    judge = login(server, JUDGE)
    judge.eval("redis.call('SADD', KEYS[2], 'g1'); return redis.call('XADD', KEYS[1], '*', 'm', 'x')", 2,
               keys.scored, keys.done(keys.scored))  # fmt: skip
    server.stop(signal.SIGKILL)
    server.process = None
    server.start()
    try:
        admin = login(server, ADMIN, ADMIN_PASSWORD)
        assert admin.hget(keys.workers, "w0") == b"beat" and admin.exists(keys.worker_alive("w0"))
        assert admin.xlen(keys.scored) == 1 and admin.sismember(keys.done(keys.scored), "g1")
        assert "CRITICAL" not in (tmp_path / "redis" / "redis.log").read_text()
    finally:
        server.stop()


def test_a_public_broker_refuses_clients_without_or_with_wrong_credentials(tmp_path: Path, run_name: str):
    port = free_port()
    env = {**os.environ, "RLQ_REDIS_SECRET": SECRET}
    server = subprocess.Popen([sys.executable, "-m", "rlq", "broker-server", "--public", "--port", str(port),
                               "--dir", str(tmp_path / "redis"), "--run", run_name, "--no-appendonly"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        _wait_for_port(port, server)
        assert "protected-mode" not in " ".join(_redis_argv(port)), "no protected mode switched off"
        with pytest.raises(redis.AuthenticationError):  # NOAUTH: the default user is off
            redis.Redis(port=port).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password=SECRET).ping()  # the secret is no password of any user
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, username=INSPECT, password="wrong").ping()
        assert redis.Redis(port=port, username=INSPECT, password=password_for(SECRET, INSPECT)).ping()
        cli = subprocess.run([sys.executable, "-m", "rlq", "queues", "--broker", f"redis://127.0.0.1:{port}/0",
                              "--run", run_name], env={k: v for k, v in os.environ.items() if not k.startswith("RLQ_")},
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1, cli.stderr
        assert "authentication" in cli.stderr.lower() or "noauth" in cli.stderr.lower(), cli.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        out = server.communicate(timeout=30)[0]
    assert SECRET not in out


def test_a_broker_server_without_a_secret_refuses_to_start_in_one_line(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("RLQ_REDIS_SECRET", "RLQ_REDIS_PASSWORD")}
    result = subprocess.run([sys.executable, "-m", "rlq", "broker-server", "--public", "--port", str(free_port()),
                             "--dir", str(tmp_path / "redis")], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "RLQ_REDIS_SECRET" in result.stderr, result.stderr
    assert not (tmp_path / "redis" / "redis.log").exists(), "no server started"


def test_a_generation_worker_cannot_write_the_scored_stream_flush_or_configure(acl_server, run_name: str):
    keys = Keys(run_name)
    gen = login(acl_server, GENERATE)
    gen.xadd(keys.prompts, {"m": b"x"})  # its own stream: allowed
    gen.hset(keys.policy, "join:w0", b"x")  # asking to join the weight group: allowed
    with pytest.raises(redis.exceptions.NoPermissionError):
        gen.xadd(keys.scored, {"m": b"forged"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        gen.xrange(keys.scored)
    with pytest.raises(redis.exceptions.NoPermissionError):
        gen.set(f"rlq:other-run:{keys.prompts}", b"x")  # another run's keys
    for command in FORBIDDEN:
        assert_refused(acl_server, GENERATE, command)
    assert login(acl_server, ADMIN, ADMIN_PASSWORD).xlen(keys.scored) == 0


@pytest.mark.parametrize("user", USERS)
def test_no_role_may_administer_the_server(acl_server, user: str):
    for command in FORBIDDEN:
        assert_refused(acl_server, user, command)


def assert_refused(server: RedisServer, user: str, command: tuple[str, ...]) -> None:
    """`user` is refused `command`, and by its ACL (ACL DRYRUN): DEBUG is also off server-wide, which would refuse
    it before the ACL is asked."""
    with pytest.raises(redis.exceptions.ResponseError):
        login(server, user).execute_command(*command)
    verdict = login(server, ADMIN, ADMIN_PASSWORD).execute_command("ACL", "DRYRUN", user, *command)
    assert b"no permissions" in verdict, (user, command, verdict)


def test_the_judge_and_the_learner_stay_on_their_side(acl_server, run_name: str):
    keys = Keys(run_name)
    judge, learner = login(acl_server, JUDGE), login(acl_server, LEARNER)
    judge.xadd(keys.scored, {"m": b"x"})
    learner.xadd(keys.prompts, {"m": b"x"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        judge.xadd(keys.prompts, {"m": b"x"})  # a judge never feeds prompts
    with pytest.raises(redis.exceptions.NoPermissionError):
        judge.hset(keys.policy, "version", 99)  # nor announces weights
    with pytest.raises(redis.exceptions.NoPermissionError):
        learner.lpush(keys.judge_queue, b"task")  # the learner only reads the judge queue


def test_the_inspection_user_cannot_write_and_rlq_queues_peek_and_dlq_list_work_with_it(acl_server, run_name: str):
    keys = Keys(run_name)
    admin = login(acl_server, ADMIN, ADMIN_PASSWORD)
    entry = admin.xadd(keys.prompts, {"m": b"not msgpack"}).decode()
    admin.xgroup_create(keys.prompts, "generate", id="0")
    admin.xreadgroup("generate", "w0", {keys.prompts: ">"}, count=1)
    send_dead_letter(admin, keys.dead, source_stream=keys.prompts, entry_id=entry, reason="test", deliveries=3,
                     payload=b"not msgpack")  # fmt: skip
    reader = login(acl_server, INSPECT)
    for write in (lambda: reader.xadd(keys.prompts, {"m": b"x"}), lambda: reader.xack(keys.prompts, "generate", entry),
                  lambda: reader.hset(keys.scale, "generate", 9), lambda: reader.delete(keys.dead),
                  lambda: reader.eval("return redis.call('DEL', KEYS[1])", 1, keys.dead),
                  lambda: reader.eval_ro("return redis.call('DEL', KEYS[1])", 1, keys.dead)):  # fmt: skip
        with pytest.raises((redis.exceptions.NoPermissionError, redis.exceptions.ResponseError)):
            write()
    assert admin.xlen(keys.dead) == 1 and admin.xlen(keys.prompts) == 1
    url = f"redis://127.0.0.1:{acl_server.port}/0"
    admin.acl_log_reset()
    for args in (["queues", "--json"], ["peek", "prompts", "--json"], ["dlq", "list", "--json"]):
        result = subprocess.run([sys.executable, "-m", "rlq", *args, "--broker", url, "--run", run_name],
                                env=role_env(INSPECT), capture_output=True, text=True, timeout=120)  # fmt: skip
        assert result.returncode == 0, (args, result.stderr)
        assert run_name in result.stdout
        if args[0] == "queues":
            assert '"lag": 0' in result.stdout, "lag counted by the read-only Lua (EVAL_RO)"
    assert admin.acl_log() == [], "the inspection commands asked for nothing their user lacks"


def test_the_rules_are_one_function_of_the_run(run_name: str):
    rules = RunAcl(run_name).rules(GENERATE)
    assert f"~rlq:{run_name}:prompts*" in rules and "-flushall" in rules and "-@all" in rules
    assert not any(rule.startswith("~*") or rule == "allkeys" for rule in rules)


def _wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listened on {port}")


def _redis_argv(port: int) -> list[str]:
    import psutil

    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and "redis-server" in cmdline[0] and str(port) in cmdline:
            return cmdline
    return []
