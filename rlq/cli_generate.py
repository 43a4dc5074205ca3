"""`rlq worker generate`: one generation worker (vLLM or transformers) for a run.

Torch and vLLM load only inside the command, after the config validated, so `rlq --help` stays light.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

import typer


def generate_command(
    config: Path = typer.Option(..., "--config", "-c", help="Run config YAML (policy.generation: this role)."),
    overrides: list[str] = typer.Argument(None, help="key=value, ++key=value, +key=value, ~key"),
    worker_id: str | None = typer.Option(None, "--worker-id", help="Unique name (default: gen-<host>-<pid>)."),
    max_batches: int | None = typer.Option(None, min=1, help="Stop after this many batches (default: never)."),
) -> None:
    """Pull prompt batches, sample with the current policy, send rollout groups to the judges; weights live."""
    from broker.acl import GENERATE
    from rlq.config import adopt_run_credentials, load_run_config
    from rlq.models import resolve_model

    cfg = load_run_config(config, overrides or [])
    adopt_run_credentials(cfg.run_dir, GENERATE)  # started by hand beside a running `rlq train`
    gen = cfg.policy.generation
    model = resolve_model(gen.model_name or cfg.policy.model_name)  # local dir or HF cache, before Redis and vLLM
    wid = worker_id or f"gen-{socket.gethostname()}-{os.getpid()}"
    try:
        from setproctitle import setproctitle

        setproctitle(f"rlq worker generate {wid} ({cfg.run_name})")
    except ImportError:
        pass
    from workers.generate.worker import run

    run(
        gen, run=cfg.run_name, broker_url=cfg.broker_url(), worker_id=wid, model_name=model, max_batches=max_batches,
        trim_acked=cfg.broker.trim_acked,
    )  # fmt: skip
    # The worker has released its batch and left the registry. Leave now: at interpreter exit vLLM's finalizers
    # tear the engine down (a full gc.collect(), ~5 s here), which made a stopping worker outlast the launcher's
    # grace and die by SIGKILL; nothing of that needs doing for a process that ends.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
