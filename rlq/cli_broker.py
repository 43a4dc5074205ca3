"""`rlq broker-server` (a private Redis for a run's head node) and `rlq broker-wait` (block until it answers)."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import typer

from broker.acl import SECRET_ENV, write_acl_file
from broker.connection import PASSWORD_ENV, BrokerUnreachable, connect
from broker.server import RedisServer, TlsFiles
from rlq.errors import UserError

log = logging.getLogger(__name__)


def broker_server(
    port: int = typer.Option(6379, min=1, max=65535, help="TCP port to listen on."),
    directory: Path = typer.Option(Path("runs/redis"), "--dir", help="Where the append-only file and log go."),
    public: bool = typer.Option(False, help="Listen on all interfaces (multi-node runs), not only loopback."),
    appendonly: bool = typer.Option(True, help="Keep an append-only file, so a restarted server loses nothing."),
    run: str = typer.Option("default", "--run", envvar="RLQ_RUN", help="The run whose keys the users may touch."),
    tls_dir: Path | None = typer.Option(
        None, "--tls-dir", help="Serve rediss:// only, with ca.crt, server.crt and server.key from this directory."
    ),
) -> None:
    """Run redis-server in the foreground until SIGTERM/SIGINT, with the run's ACL users (docs/security.md).

    Their passwords derive from the run secret in RLQ_REDIS_SECRET (RLQ_REDIS_PASSWORD, its older name, works too);
    without one nothing starts: a broker nobody must log in to is never offered."""
    secret = os.environ.get(SECRET_ENV) or os.environ.get(PASSWORD_ENV)
    if not secret:
        raise UserError(
            f"rlq broker-server needs the run secret: set {SECRET_ENV} (e.g. `export {SECRET_ENV}=$(openssl rand "
            "-hex 32)`; the Slurm scripts make one per run), roles then log in as its users (docs/security.md)"
        )
    tls = TlsFiles(tls_dir / "server.crt", tls_dir / "server.key", tls_dir / "ca.crt") if tls_dir else None
    for path in (tls.cert, tls.key, tls.ca) if tls else ():
        if not path.is_file():
            raise UserError(f"--tls-dir {tls_dir}: {path.name} is missing (slurm/common.sh make_tls makes them)")
    try:
        acl_file = write_acl_file(directory / "users.acl", run, secret)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot write the ACL file in {directory}: {exc}") from None
    server = RedisServer(
        directory=directory, port=port, appendonly=appendonly, host="0.0.0.0" if public else "127.0.0.1",
        acl_file=acl_file, tls=tls,
    )  # fmt: skip
    server.start()
    log.info("redis-server listening on port %d%s, data in %s", server.port, " (TLS only)" if tls else "", directory)
    stop = {"now": False}

    def _stop(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop["now"] and server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
    finally:
        server.stop()


def broker_wait(
    broker: str = typer.Option(..., envvar="RLQ_BROKER_URL", help="Redis URL to wait for."),
    timeout: float = typer.Option(60.0, min=0.0, help="Seconds to wait before giving up."),
) -> None:
    """Block until Redis at --broker answers a PING (for scripts that start the server in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect(broker, client_name="rlq-wait").close()
            return
        except BrokerUnreachable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)
