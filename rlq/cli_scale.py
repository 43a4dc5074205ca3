"""`rlq scale`: more or fewer generation and judge processes for a running `rlq train`, from any terminal.

    rlq scale --config runs/x/config.yaml generate=3 judge=2
    rlq scale --config runs/x/config.yaml            # the counts asked for, and the workers alive

The request goes to the run's `scale` hash (broker/scaling.py); the launcher starts or stops processes within a
second (rlq/scaler.py) and this command waits until the registry shows them (`--wait 0`: do not wait).
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from rlq.cli_queues import BrokerOpt, ConfigOpt, RunOpt, _broker, _fail, _target


def scale(
    requests: list[str] = typer.Argument(None, help="role=count (generate=N, judge=N); none: show the counts."),
    config: Path | None = ConfigOpt,
    broker: str | None = BrokerOpt,
    run: str | None = RunOpt,
    wait_s: float = typer.Option(180.0, "--wait", min=0, max=3600, help="Seconds to wait for the workers; 0: none."),
) -> None:
    """Ask the run's launcher for more or fewer worker processes; it starts or stops them live."""
    from broker.registry import Registry
    from broker.scaling import desired_counts, request_scale

    counts = _parse(requests or [])
    target = _target(config, [], broker, run, None, user="rlq-operator")  # it writes the run's scale hash
    per_judge = _judge_pool_size(config)
    with _broker(target.url, target.run) as (r, keys):
        if counts:
            request_scale(r, keys, counts)
            typer.echo(f"asked run {target.run} for " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        desired = desired_counts(r, keys)
        if not desired:
            _fail(f"run {target.run} has no launcher that scales (rlq train starts one); start workers with "
                  "`rlq worker generate|judge` instead")  # fmt: skip
        registry = Registry(r, keys)
        deadline = time.monotonic() + (wait_s if counts else 0)
        while True:
            alive = {kind: sum(s.alive for s in registry.workers(kind)) for kind in desired}
            # A judge process registers one entry per pool process (cluster.judge_workers of them).
            expected = {kind: n * (per_judge if kind == "judge" else 1) for kind, n in desired.items()}
            if alive == expected or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
    for kind, n in desired.items():
        typer.echo(f"{kind}: {n} processes asked for, {alive[kind]} workers alive (expected {expected[kind]})")
    if counts and alive != expected:
        _fail(f"the run did not reach the asked counts within {wait_s:.0f} s: see its launcher's log")


def _parse(requests: list[str]) -> dict[str, int]:
    from broker.scaling import check_request

    counts = {}
    for item in requests:
        role, sep, number = item.partition("=")
        try:
            if not sep:
                raise ValueError(f"{item!r} is not role=count (e.g. generate=3)")
            count = int(number)
            check_request(role, count)
        except ValueError as exc:
            text = str(exc) if "invalid literal" not in str(exc) else f"{item!r}: the count must be a whole number"
            raise typer.BadParameter(text) from None
        counts[role] = count
    return counts


def _judge_pool_size(config: Path | None) -> int:
    if config is None:
        return 1
    from rlq.config import load_run_config

    return load_run_config(config).cluster.judge_workers
