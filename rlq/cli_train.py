"""`rlq train`: the whole job on one machine (or one node of a larger run when broker.url is set)."""

from __future__ import annotations

from pathlib import Path

import typer


def train_command(
    config: Path = typer.Option(..., "--config", "-c", help="Run config YAML (see configs/)."),
    overrides: list[str] = typer.Argument(None, help="key=value, ++key=value, +key=value, ~key"),
) -> None:
    """Train end to end: Redis, judges, generation workers and the learner, stopped together."""
    from rlq.config import load_run_config
    from rlq.launch import train

    train(load_run_config(config, overrides or []))
