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
    from rlq.supervisor import Stopped

    try:
        train(load_run_config(config, overrides or []))
    except Stopped as exc:  # asked to stop, every role stopped: the shell's code for death by that signal
        typer.echo(f"rlq: {exc}", err=True)
        raise typer.Exit(128 + exc.signum) from None


def doctor_command(
    config: Path = typer.Option(..., "--config", "-c", help="The run config you are about to train with."),
    overrides: list[str] = typer.Argument(None, help="key=value, ++key=value, +key=value, ~key"),
) -> None:
    """Single-node sanity checks: Redis, a judge on known answers, the model, and a one-step run of the loop."""
    from rlq.config import load_run_config
    from rlq.doctor import CheckResult, run_doctor

    cfg = load_run_config(config, overrides or [])

    def report(result: CheckResult) -> None:
        mark = "ok  " if result.ok else "FAIL"
        typer.echo(f"{mark} {result.name:<6} {result.detail} ({result.seconds:.1f}s)")

    if not run_doctor(cfg, report):
        raise typer.Exit(1)
