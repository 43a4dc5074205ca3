"""`rlq learner`: the learner role, started under torchrun (`torchrun --nproc-per-node N -m rlq learner ...`)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer


def learner_command(
    config: Path = typer.Option(..., "--config", "-c", help="Run config YAML, or a learner-only one (has `learner:`)."),
    overrides: list[str] = typer.Argument(None, help="key=value, ++key=value, +key=value, ~key"),
) -> None:
    """Train: read scored groups, update the policy, broadcast weights, checkpoint (one process per rank)."""
    from learner.config import LearnerConfig
    from rlq.config import RunConfig, load_typed
    from rlq.overrides import load_yaml

    # A learner-only file (its `learner:` section holds run and broker_url) or a run config: both through the one
    # loader, so an override that `rlq train` accepts is accepted here too.
    learner_only = bool({"run", "broker_url", "run_dir"} & set(load_yaml(config).get("learner") or {}))
    if learner_only:
        cfg = load_typed(config, overrides or [], LearnerConfig)
    else:
        from broker.acl import LEARNER
        from rlq.config import adopt_run_credentials

        run_cfg = load_typed(config, overrides or [], RunConfig)
        adopt_run_credentials(run_cfg.run_dir, LEARNER)
        cfg = run_cfg.learner_config()
    from rlq.models import resolve_model

    # every rank loads the same local directory (a hub id resolves through the HF cache), as the workers do
    cfg.policy.model_name = resolve_model(cfg.policy.model_name)
    if cfg.policy.tokenizer_name:
        cfg.policy.tokenizer_name = resolve_model(cfg.policy.tokenizer_name)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank-0 output only
    try:
        from setproctitle import setproctitle

        setproctitle(f"rlq learner rank {rank} ({cfg.learner.run})")
    except ImportError:
        pass
    from learner.train import run

    run(cfg)
    exit_without_finalizing()


def exit_without_finalizing() -> None:
    """End a finished rank at once, its files and logs flushed, without tearing the interpreter down.

    `run` destroys the process group, but DDP and the weight group keep their gloo backends, whose worker threads
    live on into interpreter finalization. One that drops a tensor then needs the GIL and is killed mid-destructor:
    the rank aborts ("terminate called without an active exception", SIGABRT) after a run that succeeded, and
    torchrun reports it as failed. Seen in CI about once in tens of runs. Nothing is left to do here: metrics,
    ledger and checkpoints are closed by `run`, and W&B belongs to the launcher.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
