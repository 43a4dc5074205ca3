"""The `rlq` console script: one subcommand per role or tool; each imports its module lazily."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Asynchronous GRPO over Redis streams.")

# --- subcommand registration (one line per module; keep sorted) ---


def main() -> None:
    app()


if __name__ == "__main__":
    main()
