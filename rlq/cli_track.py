"""`rlq track`: follow a run's metrics.jsonl into W&B and the PNG curves, for runs `rlq train` did not start.

`rlq train` follows its own run (rlq/launch.py). The multi-node Slurm scripts start this on the head node next to
the learner and stop it with SIGTERM once the learner has exited: it then reads the last lines, finishes the W&B
run (offline unless WANDB_API_KEY is set) and draws the curves, as `rlq train` does at its end.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

log = logging.getLogger(__name__)


def track_command(
    config: Path = typer.Option(..., "--config", "-c", help="The run config the roles were started with."),
    overrides: list[str] = typer.Argument(None, help="key=value, ++key=value, +key=value, ~key"),
    poll_s: float = typer.Option(5.0, min=0.1, help="Seconds between reads of metrics.jsonl."),
) -> None:
    """Forward metrics.jsonl to W&B and draw reward/staleness/sync PNGs in the run directory until SIGTERM/SIGINT."""
    import signal
    import threading

    from rlq.config import load_run_config, save_resolved
    from rlq.tracking import MetricsFollower, WandbSettings

    cfg = load_run_config(config, overrides or [])
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, run_dir / "config.yaml")
    wandb = cfg.logger.wandb
    follower = MetricsFollower(
        run_dir / "metrics.jsonl", config=cfg.model_dump(mode="json"),
        wandb=WandbSettings(enabled=cfg.logger.wandb_enabled, project=wandb.project, name=wandb.name or cfg.run_name,
                            entity=wandb.entity, mode=wandb.mode),
    )  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    log.info("following %s", follower.metrics_path)
    try:
        while not stop.wait(poll_s):
            follower.poll()
    finally:
        follower.close()
    log.info("%d records tracked; curves in %s", len(follower.records), run_dir)
