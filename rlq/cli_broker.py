"""`rlq broker-server` (a private Redis for a run's head node) and `rlq broker-wait` (block until it answers)."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import typer

from broker.connection import PASSWORD_ENV, BrokerUnreachable, connect
from broker.server import RedisServer

log = logging.getLogger(__name__)


def broker_server(
    port: int = typer.Option(6379, min=1, max=65535, help="TCP port to listen on."),
    directory: Path = typer.Option(Path("runs/redis"), "--dir", help="Where the append-only file and log go."),
    public: bool = typer.Option(False, help="Listen on all interfaces (multi-node runs), not only loopback."),
    appendonly: bool = typer.Option(True, help="Keep an append-only file, so a restarted server loses nothing."),
) -> None:
    """Run redis-server in the foreground until SIGTERM/SIGINT; the password, if any, comes from RLQ_REDIS_PASSWORD."""
    server = RedisServer(
        directory=directory, port=port, password=os.environ.get(PASSWORD_ENV) or None,
        appendonly=appendonly, host="0.0.0.0" if public else "127.0.0.1",
        extra_args=[] if not public or os.environ.get(PASSWORD_ENV) else ["--protected-mode", "no"],
    )  # fmt: skip
    server.start()
    log.info("redis-server listening on port %d, data in %s", server.port, directory)
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
