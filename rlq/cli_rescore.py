"""`rlq rescore`: the run's logged rollouts judged again with other `env.math` settings (rlq/rescore.py).

    rlq rescore --run-dir runs/x env.math.answer_rule=last_box
    rlq rescore --run-dir runs/x --step 12 env.math.answer_timeout_s=30 env.math.group_timeout_s=120 \
        env.math.task_time_limit_s=130 env.math.visibility_timeout_s=200
    rlq rescore --run-dir runs/x env.math.llm_judge.enabled=true env.math.llm_judge.model=judge

Prints the verdict flips by kind (before -> after) and writes RUN_DIR/rescore/rescore.json and rescored.parquet.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import typer

log = logging.getLogger(__name__)

OVERRIDE_PREFIX = "env.math."


def rescore_command(
    run_dir: Path = typer.Option(..., "--run-dir", help="The run directory (holds rollouts/ and config.yaml)."),
    overrides: list[str] = typer.Argument(None, help="env.math.KEY=VALUE: the judge settings to score with."),
    judges: int = typer.Option(1, min=1, max=64, help="Judge processes to start."),
    concurrency: int | None = typer.Option(
        None, min=1, max=256, help="Pool processes per judge [default: the run's cluster.judge_workers]."
    ),
    step: int | None = typer.Option(None, "--step", min=0, help="Only the groups of this step."),
    limit: int | None = typer.Option(None, min=1, help="Only the first this many groups (in step order)."),
    out: Path | None = typer.Option(None, "--out", help="Where the report goes [RUN_DIR/rescore]."),
    timeout: float = typer.Option(3600.0, min=1.0, help="Seconds to wait for every group to come back."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Judge the run's logged rollouts again, through Celery judges, with other env.math settings."""
    from broker.errors import UserError
    from learner.rollout_log import read_log
    from rlq.config import load_run_config, save_resolved
    from rlq.rescore import LOG_COLUMNS, RESCORE_SUFFIX, JudgePool, logged_groups, rescore, unknown_verdicts

    overrides = overrides or []
    for item in overrides:
        if not item.lstrip("+~").startswith(OVERRIDE_PREFIX):
            raise UserError(f"rlq rescore takes only {OVERRIDE_PREFIX}* settings, got {item!r}")
    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        raise UserError(f"{config} does not exist (rlq train writes config.yaml in the run directory)")
    before = load_run_config(config).env.math
    cfg = load_run_config(config, overrides)
    out = out or Path(run_dir) / "rescore"
    groups = logged_groups(read_log(run_dir, step=step, columns=LOG_COLUMNS), _tokenizer(cfg.policy.model_name))
    groups = groups[:limit]
    if not groups:
        raise UserError(f"no groups in the rollout log of {run_dir}" + (f" at step {step}" if step is not None else ""))
    strange = unknown_verdicts(groups)
    if strange:
        raise UserError(f"the rollout log holds verdicts this rlq does not know: {sorted(strange)}")
    if cfg.env.math == before:
        log.warning("the judge settings are the run's own: a flip means the verdict is not reproducible")
    judged = cfg.model_copy(
        update={"run_name": f"{cfg.run_name[: 64 - len(RESCORE_SUFFIX)]}{RESCORE_SUFFIX}"}, deep=True
    )  # fmt: skip  (its broker and logger are set below: not the run's own)
    judged.broker.url = None  # the pool's private server, never the run's broker
    judged.logger.log_dir = out
    save_resolved(judged, out / "config.yaml")
    pool = JudgePool(out / "config.yaml", out, judges, concurrency or cfg.cluster.judge_workers)
    log.info("re-scoring %d groups with %d judge(s)", len(groups), judges)
    try:
        comparison, dead = rescore(groups, judged.run_name, pool.start(), timeout)
    finally:
        pool.stop()
    report = {
        "run_dir": str(run_dir), "step": step, "groups": len(groups), "dead_lettered": dead,
        "judge_before": before.model_dump(mode="json"), "judge_after": cfg.env.math.model_dump(mode="json"),
        "overrides": overrides, **comparison.summary(),
    }  # fmt: skip
    _write(out, report, comparison.rows)
    typer.echo(json.dumps(report, indent=2) if as_json else render(report))


def _tokenizer(model_name: str) -> str | None:
    from broker.errors import UserError
    from rlq.models import resolve_model

    try:
        return resolve_model(model_name)
    except UserError:
        return None  # only needed when the log has no text; rlq.rescore says so then


def _write(out: Path, report: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    (out / "rescore.json").write_text(json.dumps(report, indent=2) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), out / "rescored.parquet")


def render(report: dict[str, Any]) -> str:
    """The verdict matrix (rows: before, columns: after) and the reward before and after."""
    from rlq.views import plain_table

    before, after = report["verdicts_before"], report["verdicts_after"]
    kinds = sorted(set(before) | set(after))
    flips = report["flips"]
    matrix = [["BEFORE \\ AFTER", *kinds, "TOTAL"]]
    for b in kinds:
        cells = [str(before.get(b, 0) - sum(n for k, n in flips.items() if k.startswith(f"{b}->"))) if a == b
                 else str(flips.get(f"{b}->{a}", 0)) for a in kinds]  # fmt: skip
        matrix.append([b, *cells, str(before.get(b, 0))])
    lines = [
        f"{report['groups']} groups, {report['samples']} samples re-scored; {report['changed']} verdicts changed"
        + (f"; {len(report['dead_lettered'])} groups dead-lettered" if report["dead_lettered"] else ""),
        plain_table(matrix),
        f"mean reward {report['mean_reward_before']:.4f} -> {report['mean_reward_after']:.4f}",
    ]
    return "\n".join(lines)
