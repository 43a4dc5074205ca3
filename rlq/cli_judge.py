"""`rlq worker judge`: validate the config, then exec a plain `celery worker` for `workers.judge.celery_app`.

Exec, not a wrapper process: the supervisor's signals reach Celery directly, and the process is an ordinary
Celery worker that `celery -A workers.judge.celery_app inspect ...` and Flower see.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

log = logging.getLogger(__name__)


def judge_command(
    config: Path | None = typer.Option(None, "--config", "-c", help="Run config YAML (env.math: the judge)."),
    overrides: list[str] = typer.Argument(None, help="key=value, ++key=value, +key=value, ~key"),
    concurrency: int | None = typer.Option(
        None, min=1, help="Pool processes, each with one verifier child (default: cluster.judge_workers)."
    ),
    loglevel: str = typer.Option("INFO", help="Celery log level."),
    events: bool = typer.Option(False, "--events", "-E", help="Send task events (for Flower)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the celery command instead of running it."),
) -> None:
    """Run a judge worker (Celery + math-verify) for the run; broker from broker.url or RLQ_BROKER_URL."""
    from broker.connection import connect
    from broker.keys import Keys, check_run_name
    from workers.judge.app import BROKER_URL_ENV, CONFIG_ENV, RUN_ENV
    from workers.judge.config import JudgeConfig

    if config is not None:
        from rlq.config import load_run_config

        cfg = load_run_config(config, overrides or [])
        run, judge, url, workers = cfg.run_name, cfg.env.math, cfg.broker_url(), cfg.cluster.judge_workers
    else:
        run = check_run_name(os.environ.get(RUN_ENV, "default"))
        judge, url, workers = JudgeConfig(), os.environ.get(BROKER_URL_ENV, ""), 1
        if not url:
            raise typer.BadParameter(f"no broker: pass --config with broker.url, or set {BROKER_URL_ENV}")
    argv = celery_argv(Keys(run).judge_queue, concurrency or workers, loglevel, events, run)
    env = {**os.environ, BROKER_URL_ENV: url, RUN_ENV: run, CONFIG_ENV: judge.model_dump_json()}
    if dry_run:
        sys.stdout.write(" ".join(argv) + "\n")
        return
    connect(url, client_name="rlq-judge-check").close()  # BrokerUnreachable -> one line, before Celery starts
    log.info("judge for run %s on queue %s; a killed worker's tasks return after %.0f s", run, Keys(run).judge_queue,
             judge.redelivery_bound_s)  # fmt: skip
    os.execve(sys.executable, argv, env)


def celery_argv(queue: str, concurrency: int, loglevel: str, events: bool, run: str) -> list[str]:
    """The plain Celery command line (mingle and gossip off: they only slow start-up and chatter on Redis)."""
    argv = [sys.executable, "-m", "celery", "-A", "workers.judge.celery_app", "worker", "-Q", queue,
            "--concurrency", str(concurrency), "--loglevel", loglevel, "-n", f"judge-{run}-{os.getpid()}@%h",
            "--without-mingle", "--without-gossip"]  # fmt: skip
    return [*argv, "-E"] if events else argv
