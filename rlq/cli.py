"""The `rlq` console script: one subcommand per role or tool.

The command modules import only typer at the top; torch, vLLM, Celery and redis load inside the command that
needs them, so `rlq --help` and config errors answer in a fraction of a second.
"""

from __future__ import annotations

import logging
import os

import typer

from rlq.cli_broker import broker_server, broker_wait
from rlq.cli_data import register as register_data
from rlq.cli_eval import register as register_eval
from rlq.cli_generate import generate_command
from rlq.cli_judge import judge_command
from rlq.cli_learner import learner_command
from rlq.cli_queues import register as register_queues
from rlq.cli_rollouts import register as register_rollouts
from rlq.cli_scale import scale
from rlq.cli_track import track_command
from rlq.cli_train import doctor_command, train_command
from rlq.cli_views import register as register_views

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Asynchronous GRPO over Redis streams.")
worker_app = typer.Typer(no_args_is_help=True, help="Run one worker role (generation or judge).")
app.add_typer(worker_app, name="worker")

app.command("train")(train_command)  # everything on one machine
app.command("doctor")(doctor_command)  # the single-node sanity tests
app.command("track")(track_command)  # W&B and curves for runs rlq train did not start (Slurm)
app.command("learner")(learner_command)  # under torchrun
worker_app.command("generate")(generate_command)
worker_app.command("judge")(judge_command)
app.command("scale")(scale)  # more or fewer workers for a running rlq train
app.command("broker-server")(broker_server)
app.command("broker-wait")(broker_wait)
register_data(app)  # rlq prepare-data, rlq build-policy
register_eval(app)  # rlq eval (pass@k, mean@k, greedy accuracy of a checkpoint)
register_queues(app)  # rlq queues, rlq peek, rlq dlq list|requeue|purge
register_views(app)  # rlq workers, rlq top, rlq metrics-server
register_rollouts(app)  # rlq rollouts, rlq replay, rlq rescore (the rollout log)


def main() -> None:
    from rlq.errors import run_cli

    logging.basicConfig(
        level=os.environ.get("RLQ_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    run_cli(lambda: app(standalone_mode=True))


if __name__ == "__main__":
    main()
