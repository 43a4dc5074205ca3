"""`rlq prepare-data` (the tutorial's ng_prepare_data) and `rlq build-policy` (the tiny offline policy).

Only typer is imported here; rlq.data / rlq.tiny_policy (pydantic, torch, transformers) load inside the commands.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer


class Source(str, Enum):
    dapo = "dapo"
    arith = "arith"


class Template(str, Enum):
    compact = "compact"
    full = "full"


def prepare_data(
    source: Source = typer.Option(..., "--source", help="dapo: DAPO-Math-17k; arith: generated arithmetic."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Where train/validation.jsonl + manifest go."),
    inputs: list[Path] = typer.Option(None, "--input", "-i", help="dapo: local parquet/jsonl/json file(s)."),
    download: bool = typer.Option(False, "--download", help="dapo: load the hub copy through `datasets`."),
    val_fraction: float = typer.Option(0.02, "--val-fraction", help="dapo: share held out for validation."),
    n_train: int = typer.Option(2000, "--n-train", min=0, help="arith: training problems."),
    n_val: int = typer.Option(200, "--n-val", min=0, help="arith: validation problems (disjoint)."),
    digits: int = typer.Option(1, "--digits", min=1, max=6, help="arith: largest operand digit count."),
    ops: str = typer.Option("+-", "--ops", help="arith: operators, a subset of '+-*'."),
    min_steps: int = typer.Option(1, "--min-steps", min=1, max=8, help="arith: fewest operators per problem."),
    steps: int = typer.Option(2, "--steps", min=1, max=8, help="arith: most operators per problem."),
    template: Template = typer.Option(Template.compact, "--template", help="arith: compact (tiny policy) or full."),
    seed: int = typer.Option(0, "--seed", help="arith: generator seed."),
) -> None:
    """Write train.jsonl, validation.jsonl and manifest.json (counts, duplicates, skipped rows, content hash)."""
    from rlq import data, data_dapo

    if source is Source.dapo:
        manifest = data_dapo.prepare_dapo(
            output_dir, inputs=list(inputs or []), download=download, val_fraction=val_fraction
        )
    else:
        cfg = data.ArithConfig(
            n_train=n_train, n_val=n_val, digits=digits, ops=ops, min_steps=min_steps, steps=steps, seed=seed,
            template=template.value,
        )  # fmt: skip
        manifest = data.prepare_arith(output_dir, cfg)
    summary = {k: manifest[k] for k in ("counts", "duplicates_dropped", "skipped", "content_hash") if k in manifest}
    typer.echo(json.dumps({"output_dir": str(output_dir), **summary}))


def build_policy(
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Directory of the warm-started tiny policy."),
    seed: int = typer.Option(0, "--seed", help="Model init and batch-order seed."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads for the warm start."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the directory holds this exact build."),
    base_only: bool = typer.Option(False, "--base-only", help="Only the untrained model + tokenizer."),
) -> None:
    """Tiny Qwen3 + local tokenizer, warm-started on arith to 20-50 % greedy accuracy (base_accuracy.json)."""
    from rlq import tiny_policy, warm_start

    if base_only:
        tiny_policy.build_base_model(output_dir, seed=seed)
        typer.echo(json.dumps({"output_dir": str(output_dir)}))
        return
    warm_start.build_policy(output_dir, warm_start.WarmStartConfig(seed=seed, threads=threads), force=force)
    accuracy = json.loads((output_dir / warm_start.ACCURACY_FILE).read_text())
    keys = ("greedy_accuracy", "sampled_accuracy_t1", "n_problems", "in_band", "seconds")
    typer.echo(json.dumps({"output_dir": str(output_dir), **{k: accuracy.get(k) for k in keys}}))


def register(app: typer.Typer) -> None:
    """Hang these commands on the top-level `rlq` app."""
    app.command("prepare-data")(prepare_data)
    app.command("build-policy")(build_policy)
