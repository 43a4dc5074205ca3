"""What the live views and the metrics endpoint know about a run: the broker's report plus the run directory's files.

One snapshot joins three sources, each written by the roles themselves: Redis (streams, the judges' Celery
queue, the worker registry, the policy hash), the learner's `metrics.jsonl` (step, reward, staleness, refit
seconds) and the supervisor's `events.jsonl` (one line per restart). Reading never changes any of them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlq.config import adopt_run_credentials, private_broker_url

METRICS_FILE = "metrics.jsonl"  # learner/metrics.py METRICS_FILE (not imported: that would pull in the learner)
EVENTS_FILE = "events.jsonl"
"""rlq/supervisor.py appends `{"time", "role", "cause", "restart", "backoff_s"}` per restart."""
METRICS_TAIL_BYTES = 256 * 1024
"""Bytes read from the end of metrics.jsonl: ~150 step lines, enough for the last step, the last validation
pass and a recent steps/min."""
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Target:
    """Which run to look at: its broker, its name and (if known) its run directory."""

    url: str
    run: str
    run_dir: Path | None


def resolve_target(
    config: Path | None,
    overrides: list[str],
    broker: str | None,
    run: str | None,
    run_dir: Path | None,
    user: str = "rlq-inspect",
) -> Target:
    """`--config` gives all three; `--broker`/`--run`/`--run-dir` override it. Without a broker anywhere, the one
    the run directory names (`broker_url`: the private server of a running `rlq train`, or a Slurm run's). With a
    run directory and no password in the environment, this process logs in as `user` (read-only by default) with
    the run's secret file (rlq/config.py BROKER_SECRET_FILE)."""
    env_url = os.environ.get("RLQ_BROKER_URL")
    if config is not None:
        from rlq.config import load_run_config

        cfg = load_run_config(config, overrides)
        run_dir = run_dir or cfg.run_dir
        url = broker or cfg.broker.url or env_url or private_broker_url(run_dir) or DEFAULT_BROKER_URL
        adopt_run_credentials(run_dir, user)
        return Target(url, run or cfg.run_name, run_dir)
    url = broker or env_url or (private_broker_url(run_dir) if run_dir else None) or DEFAULT_BROKER_URL
    if run_dir is not None:
        adopt_run_credentials(run_dir, user)
    return Target(url, run or os.environ.get("RLQ_RUN") or "default", run_dir)


@dataclass(frozen=True)
class MetricsTail:
    """The newest figures of metrics.jsonl."""

    step: dict[str, Any] | None  # the last training step's record
    validation: dict[str, Any] | None  # the last validation pass's record (`val/*` keys)
    steps_per_min: float | None  # over the steps in the tail that was read


def read_metrics_tail(path: Path, max_bytes: int = METRICS_TAIL_BYTES) -> MetricsTail:
    """The last step and validation records of a metrics.jsonl that the learner may be appending to."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - max_bytes))
            chunk = fh.read()
    except OSError:
        return MetricsTail(None, None, None)
    lines = chunk.split(b"\n")
    if len(chunk) == max_bytes and size > max_bytes:
        lines = lines[1:]  # the first line is cut
    steps, validation = [], None
    for line in lines:
        record = _parse(line)
        if record is None:
            continue  # a line still being written, or not JSON
        if any(key.startswith("val/") for key in record):
            validation = record
        else:
            steps.append(record)
    return MetricsTail(steps[-1] if steps else None, validation, _steps_per_min(steps))


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


def _steps_per_min(steps: list[dict[str, Any]]) -> float | None:
    if len(steps) < 2:
        return None
    first, last = steps[0], steps[-1]
    elapsed = float(last.get("time", 0)) - float(first.get("time", 0))
    return (float(last["step"]) - float(first["step"])) / elapsed * 60 if elapsed > 0 else None


def restart_counts(path: Path) -> dict[str, int]:
    """Restarts per role from the supervisor's events.jsonl (lines of other kinds are skipped)."""
    counts: dict[str, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return counts
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("role"), str) and "restart" in event:
            counts[event["role"]] = counts.get(event["role"], 0) + 1
    return counts


def snapshot(r: Any, target: Target, *, celery_consumers: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a view shows: `queues_report` + the policy version + the run directory's figures."""
    from broker.connection import describe
    from broker.inspect import queues_report
    from broker.keys import POLICY_UPDATED_AT, POLICY_VERSION, Keys

    keys = Keys(target.run)
    report = queues_report(r, keys, broker=describe(target.url))
    if celery_consumers is not None:
        report["judge_queue"].update(celery_consumers)
    policy = r.hmget(keys.policy, [POLICY_VERSION, POLICY_UPDATED_AT])
    report["policy_version"] = int(policy[0]) if policy[0] is not None else None
    report["policy_updated_at"] = float(policy[1]) if policy[1] is not None else None
    return {**report, **run_files(target.run_dir)}


def run_files(run_dir: Path | None) -> dict[str, Any]:
    """The run directory's part of a snapshot (it stays readable when the broker is not)."""
    tail = read_metrics_tail(run_dir / METRICS_FILE) if run_dir else MetricsTail(None, None, None)
    return {
        "run_dir": str(run_dir) if run_dir else None,
        "metrics": {"step": tail.step, "validation": tail.validation, "steps_per_min": tail.steps_per_min},
        "restarts": restart_counts(run_dir / EVENTS_FILE) if run_dir else {},
    }


def celery_consumers(url: str, run: str, timeout_s: float = 1.0) -> dict[str, Any]:
    """The judges that consume the run's queue by their own word (Celery's `inspect active_queues` broadcast)."""
    from broker.judge_queue import base_app
    from broker.keys import Keys

    queue = Keys(run).judge_queue
    app = base_app(url, run, name="rlq-inspect")
    try:
        replies = app.control.inspect(timeout=timeout_s).active_queues() or {}
    finally:
        app.close()
    names = sorted(host for host, queues in replies.items() if any(q.get("name") == queue for q in queues or ()))
    return {"consumers": len(names), "consumer_names": names, "consumers_source": "celery"}


def worker_state(worker: dict[str, Any]) -> str:
    """What a registry entry says now: its own status while alive, `dead` once its heartbeat lapsed."""
    return str(worker["status"]) if worker["alive"] else "dead"


def throughput_unit(role: str) -> str:
    """Heartbeat throughput units: generated tokens/s, verified answers/s (broker/schemas.py WorkerHeartbeat)."""
    return {"generate": "tok/s", "judge": "ans/s"}.get(role, "/s")
