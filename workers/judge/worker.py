"""The judge role's entry point: a Celery worker for the run's judge queue, started in this process.

`run()` builds the app from the typed settings it is given (workers.judge.app.make_app) and hands the process to
Celery's own worker command (`app.worker_main`): the same code `celery -A ... worker` runs, with the same signal
handling, pool and remote control, so `celery inspect` and Flower see an ordinary Celery worker. No setting
travels through the environment; only secrets do (the Redis password, an LLM judge's API key).
"""

from __future__ import annotations

import logging
import os

from broker.keys import Keys
from workers.judge.app import make_app
from workers.judge.config import JudgeConfig

log = logging.getLogger(__name__)


def worker_argv(run: str, concurrency: int, loglevel: str, events: bool, hostname: str | None = None) -> list[str]:
    """Celery's worker command line for the run's queue (mingle and gossip off: they only slow start-up and
    chatter on Redis). `%h` is Celery's own placeholder for this host's name."""
    argv = ["worker", "-Q", Keys(run).judge_queue, "--concurrency", str(concurrency), "--loglevel", loglevel,
            "-n", hostname or f"judge-{run}-{os.getpid()}@%h", "--without-mingle", "--without-gossip"]  # fmt: skip
    return [*argv, "-E"] if events else argv


def run(
    cfg: JudgeConfig,
    *,
    run: str,
    broker_url: str,
    concurrency: int,
    loglevel: str = "INFO",
    events: bool = False,
    hostname: str | None = None,
) -> int:
    """Serve the run's judge queue until Celery stops (SIGTERM: warm shutdown); returns the worker's exit code."""
    app = make_app(broker_url, run, cfg)
    log.info("judge for run %s on queue %s; a killed worker's tasks return after %.0f s", run, Keys(run).judge_queue,
             cfg.redelivery_bound_s)  # fmt: skip
    code = app.start(worker_argv(run, concurrency, loglevel, events, hostname))  # worker_main drops the code
    return int(code or 0)
