"""The `rlq` console script: one subcommand per role or tool; each imports its module lazily."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Asynchronous GRPO over Redis streams.")
# `rlq worker generate` and `rlq worker judge` hang off this group; modules register on it.
worker_app = typer.Typer(no_args_is_help=True, help="Run one worker role (generation or judge).")
app.add_typer(worker_app, name="worker")

# --- subcommand registration (one line per module; keep sorted) ---


def main() -> None:
    app()


if __name__ == "__main__":
    main()
