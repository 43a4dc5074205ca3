"""`rlq eval`: pass@k, mean@k and greedy accuracy of a checkpoint on a prepared file (rlq/eval_run.py, docs/eval.md).

Only typer is imported here; the config, the engine and the judge load inside the command.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def eval_command(
    model: str = typer.Option(
        ..., "--model", "-m", help="step_<N> (or policy/ in it), a checkpoint_dir (its latest), a model dir or hub id."
    ),
    data: Path = typer.Option(..., "--data", "-d", help="Prepared JSONL (or a prepared directory: validation.jsonl)."),
    config: Path = typer.Option(None, "--config", "-c", help="Run config: policy.generation and env.math from it."),
    samples: int = typer.Option(8, "--samples", "-k", min=0, help="Samples per problem for pass@k/mean@k; 0: none."),
    pass_k: list[int] = typer.Option(None, "--pass-k", help="k of pass@k (repeatable); default 1, 2, 4, ... and n."),
    greedy: bool = typer.Option(True, "--greedy/--no-greedy", help="Also one greedy completion per problem."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help="Default: policy.generation's."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N problems."),
    batch_prompts: int = typer.Option(100, "--batch-prompts", min=1, help="Prompts per engine call."),
    seed: int = typer.Option(0, "--seed", help="Base of the per-problem sampling seeds."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
    output: Path = typer.Option(None, "--output", "-o", help="Also write the JSON report (per problem too) here."),
    overrides: list[str] = typer.Argument(None, help="Run-config overrides, e.g. policy.generation.backend=hf"),
) -> None:
    """Evaluate a policy with the run's engine and judge: a table (or --json) and an optional JSON file."""
    import contextlib
    import sys

    from rlq.eval import table
    from rlq.eval_run import EvalSettings, evaluate, run_sections

    generation, judge = run_sections(config, list(overrides or []))
    settings = EvalSettings(
        model=model, data=data, samples=samples, ks=list(pass_k or []) or None, greedy=greedy,
        max_new_tokens=max_new_tokens, limit=limit, batch_prompts=batch_prompts, seed=seed,
        generation=generation, judge=judge,
    )  # fmt: skip
    with contextlib.redirect_stdout(sys.stderr):  # vLLM logs to stdout: keep stdout for the report alone
        report = evaluate(settings)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1) + "\n")
    if as_json:
        typer.echo(json.dumps({k: v for k, v in report.items() if k != "per_problem"}, indent=1))
    else:
        typer.echo(table(report))


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
