"""`rlq worker judge`: validate the config, then run the judge role: a Celery worker, in this very process.

No wrapper process: the supervisor's signals reach Celery directly, and the process is an ordinary Celery worker
that `celery -A workers.judge.celery_app inspect ...` and Flower see.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer


def judge_command(
    config: Path = typer.Option(..., "--config", "-c", help="Run config YAML (env.math: the judge)."),
    overrides: list[str] = typer.Argument(None, help="key=value, ++key=value, +key=value, ~key"),
    concurrency: int | None = typer.Option(
        None, min=1, help="Pool processes, each with one verifier child (default: cluster.judge_workers)."
    ),
    loglevel: str = typer.Option("INFO", help="Celery log level."),
    events: bool = typer.Option(False, "--events", "-E", help="Send task events (for Flower)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print Celery's worker arguments instead of running."),
) -> None:
    """Run a judge worker (Celery + math-verify) for the run; broker from broker.url or RLQ_BROKER_URL."""
    from broker.acl import JUDGE
    from broker.connection import connect
    from rlq.config import adopt_run_credentials, load_run_config
    from workers.judge.worker import run, worker_argv

    cfg = load_run_config(config, overrides or [])
    workers = concurrency or cfg.cluster.judge_workers
    if dry_run:
        sys.stdout.write(" ".join(worker_argv(cfg.run_name, workers, loglevel, events)) + "\n")
        return
    adopt_run_credentials(cfg.run_dir, JUDGE)  # started by hand beside a running `rlq train`
    url = cfg.broker_url()
    connect(url, client_name="rlq-judge-check").close()  # BrokerUnreachable -> one line, before Celery starts
    raise typer.Exit(run(cfg.env.math, run=cfg.run_name, broker_url=url, concurrency=workers, loglevel=loglevel,
                         events=events))  # fmt: skip
