"""The `rlq` console script: one subcommand per role or tool; each imports its module lazily."""

from __future__ import annotations

import logging
import os

import typer

from rlq.cli_broker import broker_server, broker_wait
from rlq.cli_learner import learner_command
from rlq.cli_train import doctor_command, train_command

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Asynchronous GRPO over Redis streams.")
# `rlq worker generate` and `rlq worker judge` hang off this group; modules register on it.
worker_app = typer.Typer(no_args_is_help=True, help="Run one worker role (generation or judge).")
app.add_typer(worker_app, name="worker")

app.command("broker-server")(broker_server)
app.command("broker-wait")(broker_wait)
app.command("train")(train_command)
app.command("doctor")(doctor_command)
app.command("learner")(learner_command)
# --- subcommand registration (one line per module; keep sorted) ---
from rlq.cli_queues import register as register_queues  # noqa: E402  (typer only; redis is imported per command)

register_queues(app)  # rlq queues, rlq peek, rlq dlq list|requeue|purge
from rlq.cli_judge import judge_command  # noqa: E402  (typer only; celery/math-verify load in the command)

worker_app.command("judge")(judge_command)
from rlq.cli_data import register as register_data  # noqa: E402  (typer only; torch/datasets load per command)

register_data(app)  # rlq prepare-data, rlq build-policy
from rlq.cli_generate import generate_command  # noqa: E402  (typer only; torch/vLLM load in the command)

worker_app.command("generate")(generate_command)


def main() -> None:
    from rlq.errors import run_cli

    logging.basicConfig(
        level=os.environ.get("RLQ_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    run_cli(lambda: app(standalone_mode=True))


if __name__ == "__main__":
    main()
