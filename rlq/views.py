"""Rendering of a run snapshot (rlq/run_state.py): the plain `rlq workers` table and the `rlq top` frame (rich).

Pure functions of the snapshot dict and the current time, so a frame can be tested without a terminal.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from rlq.run_state import throughput_unit, worker_state

WORKER_HEADER = ["WORKER", "ROLE", "NODE", "ACCELERATOR", "VERSION", "THROUGHPUT", "HEARTBEAT", "STATE"]
STREAM_HEADER = ["STREAM", "LENGTH", "GROUP", "CONSUMERS", "PENDING", "LAG", "OLDEST PENDING", "MAX DELIV"]


def worker_rows(workers: list[dict[str, Any]]) -> list[list[str]]:
    """One row per registry entry (without the header)."""
    return [
        [
            w["worker_id"],
            w["role"],
            w["node"],
            w["accelerator"],
            "-" if w["policy_version"] < 0 else str(w["policy_version"]),
            f"{w['throughput']:.1f} {throughput_unit(w['role'])}" + (f" ({w['share']:.0%})" if w.get("share") else ""),
            f"{w['heartbeat_age_s']:.1f}s ago",
            worker_state(w),
        ]
        for w in workers
    ]


def stream_rows(streams: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for s in streams:
        if not s["groups"]:
            rows.append([s["name"], str(s["length"]), "-", "", "", "", "", ""])
        for g in s["groups"]:
            lag = str(g["lag"]) if g["lag_exact"] else f">={g['lag']}"
            rows.append([s["name"], str(s["length"]), g["group"], str(len(g["consumers"])), str(g["pending"]), lag,
                         duration(_seconds(g["oldest_pending_idle_ms"])), str(g["max_deliveries"])])  # fmt: skip
    return rows


def judge_queue_line(jq: dict[str, Any]) -> str:
    unacked = str(jq["unacked"]) if jq["unacked_exact"] else f">={jq['unacked']}"
    oldest = jq["oldest_unacked_age_s"]
    oldest_text = f" (oldest {duration(oldest)})" if oldest is not None else ""
    names = f" ({', '.join(jq['consumer_names'])})" if jq["consumer_names"] else ""
    return (
        f"judge queue {jq['queue']}: {jq['depth']} waiting, {unacked} unacked{oldest_text}, "
        f"{jq['consumers']} consumers{names} [{jq['consumers_source']}]"
    )


def plain_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def headline(snap: dict[str, Any], now: float | None = None) -> list[tuple[str, str]]:
    """(label, value) pairs of the run's progress: version, step, reward, staleness, throughputs, restarts."""
    now = time.time() if now is None else now
    step = snap["metrics"]["step"] or {}
    val = snap["metrics"]["validation"] or {}
    workers = [w for w in snap["workers"] if w["alive"]]
    restarts = snap["restarts"]
    stale_max = step.get("rollout/staleness_max")
    pairs = [
        ("policy version", _text(snap["policy_version"])),
        ("step", _text(step.get("step"))),
        ("reward", _num(step.get("rollout/reward_mean"), ".3f")),
        ("staleness", f"{_num(step.get('rollout/staleness_mean'), '.2f')} max {_text(stale_max)}"),
        ("steps/min", _num(snap["metrics"]["steps_per_min"], ".2f")),
        ("step time", _num(step.get("perf/step_s"), ".2f", "s")),
        ("refit", _num(step.get("sync/broadcast_s"), ".3f", "s")),
        ("learner", _num(step.get("perf/tokens_per_s"), ".0f", " tok/s")),
        ("generation", f"{sum(w['throughput'] for w in workers if w['role'] == 'generate'):.0f} tok/s"),
        ("judges", f"{sum(w['throughput'] for w in workers if w['role'] == 'judge'):.1f} ans/s"),
        ("val accuracy", _num(val.get("val/accuracy"), ".3f")),
        ("metrics age", duration(now - step["time"]) if "time" in step else "-"),
        ("dead letters", str(snap["dead_letters"])),
        ("restarts", ", ".join(f"{role} {n}" for role, n in sorted(restarts.items())) or "0"),
    ]  # fmt: skip
    return pairs


def frame(snap: dict[str, Any], now: float | None = None, error: str | None = None) -> Group:
    """One `rlq top` frame."""
    title = Text(f"rlq run {snap['run']} on {snap['broker']}", style="bold")
    if snap.get("run_dir"):
        title.append(f"  ({snap['run_dir']})", style="dim")
    head = Table.grid(padding=(0, 2))
    for _ in range(4):
        head.add_column(style="cyan")
        head.add_column()
    pairs = headline(snap, now)
    for i in range(0, len(pairs), 4):
        cells = [c for pair in pairs[i : i + 4] for c in pair]
        head.add_row(*cells, *[""] * (8 - len(cells)))
    parts: list[Any] = [title, head]
    if error:
        parts.append(Text(error, style="bold red"))
    parts.append(_table("queues", STREAM_HEADER, stream_rows(snap["streams"])))
    parts.append(Text(judge_queue_line(snap["judge_queue"])))
    alive = sum(w["alive"] for w in snap["workers"])
    workers = _table(f"workers ({alive} alive of {len(snap['workers'])})", WORKER_HEADER, worker_rows(snap["workers"]))
    parts.append(workers)
    parts.append(Text("Ctrl-C to quit", style="dim"))
    return Group(*parts)


def _table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold", box=None, pad_edge=False)
    for name in header:
        table.add_column(name, no_wrap=True)
    for row in rows:
        style = "red" if row[-1] == "dead" and header is WORKER_HEADER else None
        table.add_row(*row, style=style)
    return table


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000


def _text(value: Any) -> str:
    if value is None:
        return "-"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _num(value: Any, spec: str, unit: str = "") -> str:
    return f"{value:{spec}}{unit}" if isinstance(value, (int, float)) else "-"
