"""`rlq workers`, `rlq top` and `rlq metrics-server`: watch a run from another terminal, or from Prometheus.

Each takes the run's config (`--config C`: broker, run name and run directory; `rlq train`'s private broker is
found from its log in the run directory), or `--broker URL --run NAME [--run-dir DIR]` as `rlq queues` does.
Nothing here changes the run (broker/inspect.py only reads). docs/operations.md shows each.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from rlq.cli_queues import BrokerOpt, ConfigOpt, RunDirOpt, RunOpt, _broker, _emit_json, _target

OverridesArg = typer.Argument(None, help="key=value overrides of the config, as the run was started with.")


def register(app: typer.Typer) -> None:
    """Hang these commands on the top-level `rlq` app."""
    app.command("workers")(workers)
    app.command("top")(top)
    app.command("metrics-server")(metrics_server)


def workers(
    config: Path | None = ConfigOpt,
    overrides: list[str] = OverridesArg,
    broker: str | None = BrokerOpt,
    run: str | None = RunOpt,
    as_json: bool = typer.Option(False, "--json", help="The registry entries as JSON (docs/queues.md `workers[]`)."),
) -> None:
    """Every worker of the run: role, node, accelerator, policy version, throughput, heartbeat age, state."""
    from broker.inspect import workers_report
    from broker.keys import Keys
    from rlq.views import WORKER_HEADER, plain_table, worker_rows

    target = _target(config, overrides, broker, run, None)
    with _broker(target.url, target.run) as (r, _):
        found = workers_report(r, Keys(target.run))
    if as_json:
        _emit_json({"version": 1, "run": target.run, "workers": found})
        return
    alive = sum(w["alive"] for w in found)
    typer.echo(f"run {target.run}: {len(found)} workers, {alive} alive")
    if found:
        typer.echo(plain_table([WORKER_HEADER, *worker_rows(found)]))


def top(
    config: Path | None = ConfigOpt,
    overrides: list[str] = OverridesArg,
    broker: str | None = BrokerOpt,
    run: str | None = RunOpt,
    run_dir: Path | None = RunDirOpt,
    interval: float = typer.Option(2.0, "--interval", "-n", min=0.2, max=3600, help="Seconds between refreshes."),
    once: bool = typer.Option(False, "--once", help="Print one frame and exit (for scripts and tests)."),
    celery: bool = typer.Option(False, "--celery", help="Count judges by Celery's `inspect active_queues`."),
) -> None:
    """A refreshing view of the run: queues, judge queue, workers, step, reward, staleness, throughputs."""
    from rich.console import Console

    from rlq.run_state import celery_consumers, snapshot
    from rlq.views import frame

    target = _target(config, overrides, broker, run, run_dir)
    console = Console()
    with _broker(target.url, target.run) as (r, _):

        def take() -> dict:
            return snapshot(r, target, celery_consumers=celery_consumers(target.url, target.run) if celery else None)

        if once:
            console.print(frame(take()))
            return
        _watch(console, take, interval)


def _watch(console: Any, take: Any, interval: float) -> None:
    """Redraw every `interval` seconds until Ctrl-C; a broker that goes away shows on the last frame."""
    from redis.exceptions import RedisError
    from rich.live import Live

    from rlq.views import frame

    last = take()
    try:
        with Live(frame(last), console=console, auto_refresh=False, transient=False) as live:
            while True:
                time.sleep(interval)
                try:
                    last, error = take(), None
                except (RedisError, OSError) as exc:
                    error = f"cannot read the broker: {exc} (showing the last frame)"
                live.update(frame(last, error=error), refresh=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one leaves a watch: exit 0, the last frame stays on screen


def metrics_server(
    config: Path | None = ConfigOpt,
    overrides: list[str] = OverridesArg,
    broker: str | None = BrokerOpt,
    run: str | None = RunOpt,
    run_dir: Path | None = RunDirOpt,
    port: int = typer.Option(9400, "--port", min=0, max=65535, help="TCP port (0: any free one, logged)."),
    addr: str = typer.Option(
        "127.0.0.1", "--addr", help="Listen address; off loopback, RLQ_METRICS_AUTH=user:password is required."
    ),
) -> None:
    """Serve the run's figures to Prometheus (read from Redis and the run directory at each scrape)."""
    from rlq.metrics_server import serve

    serve(_target(config, overrides, broker, run, run_dir), addr=addr, port=port)
