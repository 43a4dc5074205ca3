"""`rlq rollouts` and `rlq replay`: read a run's rollout log (learner/rollout_log.py), and train on it again.

`rlq rollouts --run-dir DIR --step N` prints the groups step N trained on and the ones dropped while it was
collected; `--samples` adds a line per completion, `--json` gives everything (docs/rollouts.md). `rlq replay`
re-runs the learner on the logged groups, in order, with no Redis, workers or judges (learner/replay.py), and
writes its own metrics.jsonl to compare with the run's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import typer

log = logging.getLogger(__name__)

TEXT_WIDTH = 60
"""Characters of a completion shown in the table (the JSON has all of it)."""
UNUSED_BROKER = "redis://127.0.0.1:6379/0"
"""Replay reads no stream, but a run config without broker.url cannot build the learner's config otherwise."""


def register(app: typer.Typer) -> None:
    """Hang these commands on the top-level `rlq` app."""
    app.command("rollouts")(rollouts)
    app.command("replay")(replay_command)
    from rlq.cli_rescore import rescore_command

    app.command("rescore")(rescore_command)


def rollouts(
    run_dir: Path = typer.Option(..., "--run-dir", help="The run directory (holds rollouts/)."),
    step: int = typer.Option(..., "--step", min=0, help="The step: metrics.jsonl's step."),
    samples: bool = typer.Option(False, "--samples", help="A line per completion too (reward, verdict, text)."),
    as_json: bool = typer.Option(False, "--json", help="Every group of the step with its samples, as JSON."),
) -> None:
    """Print one step's groups from the rollout log: trained (in batch order) and dropped (with the reason)."""
    from learner.rollout_log import read_log

    rows = [_plain(r) for r in read_log(run_dir, step=step).to_pylist()]
    groups = step_groups(rows)
    if as_json:
        typer.echo(json.dumps({"version": 1, "step": step, "groups": groups}, indent=2))
        return
    if not groups:
        typer.echo(f"step {step}: nothing in the rollout log")
        return
    trained = sum(g["dropped_reason"] is None for g in groups)
    typer.echo(f"step {step}: {trained} groups trained, {len(groups) - trained} dropped")
    typer.echo(group_table(groups, samples))


def step_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one step -> groups (trained first in batch order, then dropped), each with its `samples`."""
    sample_keys = ("sample_index", "completion_ids", "completion_text", "finish_reason", "behaviour_logprobs",
                   "reward", "advantage", "verdict")  # fmt: skip
    groups: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = (row["dropped_reason"] is not None, row["group_index"], row["group_id"])
        group = groups.setdefault(key, {k: v for k, v in row.items() if k not in sample_keys} | {"samples": []})
        group["samples"].append({k: row[k] for k in sample_keys})
    for group in groups.values():
        group["samples"].sort(key=lambda s: s["sample_index"])
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1], k[2]))]


def group_table(groups: list[dict[str, Any]], samples: bool) -> str:
    from rlq.views import plain_table

    header = ["GROUP", "VERSION", "STALE", "WORKER", "JUDGE", "REWARD", "VERDICTS", "JUDGE_S", "STATUS"]
    rows = [header]
    for g in groups:
        rewards = [s["reward"] for s in g["samples"]]
        verdicts: dict[str, int] = {}
        for s in g["samples"]:
            verdicts[s["verdict"]] = verdicts.get(s["verdict"], 0) + 1
        rows.append([g["group_id"], str(g["policy_version"]), str(g["staleness"]), g["worker_id"], g["judge_id"] or "-",
                     f"{sum(rewards) / len(rewards):.3f}", " ".join(f"{k}:{v}" for k, v in sorted(verdicts.items())),
                     f"{g['judge_latency_s']:.2f}", g["dropped_reason"] or "trained"])  # fmt: skip
        if samples:
            for s in g["samples"]:
                text = (s["completion_text"] or "").replace("\n", " ")[:TEXT_WIDTH]
                rows.append([f"  #{s['sample_index']}", "", "", "", "", f"{s['reward']:.3f}", s["verdict"], "",
                             f"adv {s['advantage']:+.3f} {s['finish_reason']} {text!r}"])  # fmt: skip
    return plain_table(rows)


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """Floats that JSON can hold (NaN/inf -> None)."""
    import math

    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def replay_command(
    config: Path | None = typer.Option(None, "--config", "-c", help="The run's config [default: RUN_DIR/config.yaml]."),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="The run directory [default: the config's]."),
    out: Path | None = typer.Option(None, "--out", help="Where the replay's metrics.jsonl goes [RUN_DIR/replay]."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, as the run was started with."),
) -> None:
    """Train again on the run's rollout log, step by step as logged, with no workers or judges (learner only)."""
    from broker.errors import UserError
    from learner.replay import replay

    if config is None and run_dir is None:
        raise UserError("rlq replay needs --config or --run-dir")
    config = config or Path(run_dir) / "config.yaml"  # type: ignore[arg-type]
    if not config.is_file():
        raise UserError(f"{config} does not exist (rlq train writes config.yaml in the run directory)")
    cfg = learner_config(config, overrides or [])
    run_dir = run_dir or cfg.learner.run_dir
    steps = replay(cfg, run_dir, out or run_dir / "replay")
    typer.echo(f"replayed {steps} steps; metrics in {(out or run_dir / 'replay') / 'metrics.jsonl'}")


def learner_config(config: Path, overrides: list[str]):
    """The learner's config from a run config or a learner-only one, as `rlq learner` reads it."""
    from learner.config import LearnerConfig
    from rlq.config import RunConfig, load_typed
    from rlq.models import resolve_model
    from rlq.overrides import load_yaml

    if {"run", "broker_url", "run_dir"} & set(load_yaml(config).get("learner") or {}):
        cfg = load_typed(config, overrides, LearnerConfig)
    else:
        run = load_typed(config, overrides, RunConfig)
        run.broker.url = run.broker.url or UNUSED_BROKER
        cfg = run.learner_config()
    cfg.policy.model_name = resolve_model(cfg.policy.model_name)
    if cfg.policy.tokenizer_name:
        cfg.policy.tokenizer_name = resolve_model(cfg.policy.tokenizer_name)
    return cfg
