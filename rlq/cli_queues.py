"""`rlq queues`, `rlq peek` and `rlq dlq list|requeue|purge`: look into a run's Redis streams.

`queues` and `peek` are read-only (see broker/inspect.py); `dlq requeue` and `dlq purge` are the only commands
here that change anything, and only in the dead-letter stream and the source streams it names. Every command
takes the run's config (`--config`, the saved `<log_dir>/config.yaml` too: broker, run name, run directory and,
for `rlq train`'s private broker, its address and credentials) or `--broker` (env RLQ_BROKER_URL) and `--run`
(env RLQ_RUN), as `rlq top` does (rlq/run_state.py resolve_target); `--json` output is documented in
docs/queues.md. An unreachable broker gives one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer

EXIT_UNREACHABLE = 2

ConfigOpt = typer.Option(None, "--config", "-c", help="The run's config: broker, run name and run directory.")
BrokerOpt = typer.Option(
    None, "--broker", help="Redis URL [default: the config's, env RLQ_BROKER_URL, the run's private server]."
)
RunOpt = typer.Option(
    None, "--run", help="Run name, the key namespace rlq:<run>:* [default: the config's, env RLQ_RUN, `default`]."
)
RunDirOpt = typer.Option(
    None,
    "--run-dir",
    help="Run directory: metrics, events, the private broker's address and secret [default: the config's].",
)
JsonOpt = typer.Option(False, "--json", help="Machine-readable output (fields in docs/queues.md).")

dlq_app = typer.Typer(no_args_is_help=True, help="List, requeue or purge dead letters.")


def register(app: typer.Typer) -> None:
    """Hang these commands on the top-level `rlq` app."""
    app.command("queues")(queues)
    app.command("peek")(peek)
    app.add_typer(dlq_app, name="dlq")


def _target(config: Path | None, overrides: list[str] | None, broker: str | None, run: str | None,
            run_dir: Path | None, user: str = "rlq-inspect") -> Any:  # fmt: skip
    """Where the run's Redis is, under which name, logged in as `user` (rlq.run_state.Target); shared with the
    views (rlq/cli_views.py)."""
    from rlq.run_state import resolve_target

    return resolve_target(config, overrides or [], broker, run, run_dir, user)


@contextlib.contextmanager
def _broker(url: str, run: str) -> Iterator[tuple[Any, Any]]:
    """(client, Keys) for the command; any connection failure becomes the one-line error and exit code 2."""
    from redis.exceptions import ConnectionError, TimeoutError

    from broker.connection import BrokerUnreachable, connect, describe
    from broker.keys import Keys

    try:
        keys = Keys(run)
        client = connect(url, client_name="rlq-inspect")
    except (BrokerUnreachable, ValueError) as exc:
        _fail(str(exc))
    try:
        yield client, keys
    except (ConnectionError, TimeoutError, OSError) as exc:
        _fail(f"cannot reach Redis at {describe(url)}: {exc}")
    except ValueError as exc:  # a bad argument found on the server side, e.g. peek at a hash
        _fail(str(exc))
    finally:
        client.close()


def _fail(line: str) -> NoReturn:
    typer.echo(line, err=True)
    raise typer.Exit(EXIT_UNREACHABLE)


def _emit_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2))


def queues(
    config: Path | None = ConfigOpt,
    broker: str | None = BrokerOpt,
    run: str | None = RunOpt,
    run_dir: Path | None = RunDirOpt,
    as_json: bool = JsonOpt,
    celery: bool = typer.Option(False, "--celery", help="Count judges by Celery's `inspect active_queues`."),
) -> None:
    """Streams, consumer groups (pending, lag, oldest idle, delivery counts), dead letters, judge queue, workers."""
    from broker.connection import describe
    from broker.inspect import queues_report
    from rlq.run_state import celery_consumers
    from rlq.views import judge_queue_line

    target = _target(config, None, broker, run, run_dir)
    with _broker(target.url, target.run) as (r, keys):
        report = queues_report(r, keys, broker=describe(target.url))
        if celery:
            report["judge_queue"].update(celery_consumers(target.url, target.run))
    if as_json:
        _emit_json(report)
        return
    typer.echo(f"run {report['run']} on {report['broker']}")
    typer.echo(_table(_stream_rows(report["streams"])))
    typer.echo(f"dead letters: {report['dead_letters']}")
    typer.echo(judge_queue_line(report["judge_queue"]))
    workers = report["workers"]
    typer.echo(f"workers: {len(workers)} registered, {sum(w['alive'] for w in workers)} alive")
    if workers:
        typer.echo(_table(_worker_rows(workers)))


def peek(
    stream: str = typer.Argument(..., help="Stream name (prompts, scored, dead, ...) or a full key."),
    n: int = typer.Option(10, "-n", "--count", min=1, max=10_000, help="How many entries."),
    last: bool = typer.Option(False, "--last", help="The newest entries instead of the oldest."),
    config: Path | None = ConfigOpt,
    broker: str | None = BrokerOpt,
    run: str | None = RunOpt,
    run_dir: Path | None = RunDirOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Decoded entries of one stream with arrays summarised, and each entry's state in every group."""
    from broker.inspect import peek as peek_entries
    from broker.inspect import resolve_stream

    target = _target(config, None, broker, run, run_dir)
    with _broker(target.url, target.run) as (r, keys):
        key = resolve_stream(stream, keys)
        entries = peek_entries(r, key, count=n, last=last)
    if as_json:
        _emit_json({"version": 1, "stream": key, "entries": entries})
        return
    typer.echo(f"{key}: {len(entries)} entries")
    for entry in entries:
        typer.echo(_entry_line(entry))


@dlq_app.command("list")
def dlq_list(
    n: int = typer.Option(100, "-n", "--count", min=1, max=100_000, help="How many letters."),
    last: bool = typer.Option(False, "--last", help="The newest letters instead of the oldest."),
    config: Path | None = ConfigOpt,
    broker: str | None = BrokerOpt,
    run: str | None = RunOpt,
    run_dir: Path | None = RunDirOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Dead letters: source stream and entry, reason, delivery count, payload size and kind."""
    from broker.inspect import dead_letters

    target = _target(config, None, broker, run, run_dir)
    with _broker(target.url, target.run) as (r, keys):
        letters = dead_letters(r, keys.dead, count=n, last=last)
    if as_json:
        _emit_json({"version": 1, "stream": keys.dead, "letters": letters})
        return
    rows: list[list[Any]] = [["ID", "SOURCE", "ENTRY", "DELIV", "BYTES", "KIND", "REASON"]]
    for d in letters:
        payload = d["payload"] or {}
        source = (d["source_stream"] or "").rsplit(":", 1)[-1]
        rows.append(
            [d["id"], source, d["entry_id"], d["deliveries"], payload.get("bytes"), payload.get("kind"), d["reason"]]
        )
    typer.echo(f"{keys.dead}: {len(letters)} letters")
    typer.echo(_table(rows))


@dlq_app.command("requeue")
def dlq_requeue(
    ids: list[str] = typer.Argument(None, help="Dead-letter ids (from `rlq dlq list`)."),
    all_: bool = typer.Option(False, "--all", help="Every dead letter."),
    force: bool = typer.Option(False, "--force", help="Requeue even payloads that still do not decode."),
    config: Path | None = ConfigOpt,
    broker: str | None = BrokerOpt,
    run: str | None = RunOpt,
    run_dir: Path | None = RunDirOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Put the original payloads back on their source streams (consumers see them as new entries)."""
    from broker.dead_letters import dead_letter_ids, requeue_dead

    _check_selection(ids, all_)
    target = _target(config, None, broker, run, run_dir, "rlq-operator")
    with _broker(target.url, target.run) as (r, keys):
        chosen = dead_letter_ids(r, keys.dead) if all_ else list(ids)
        result = requeue_dead(r, keys.dead, chosen, allowed_prefix=f"rlq:{keys.run}:", force=force)
    if as_json:
        _emit_json({"version": 1, **result})
        return
    for moved in result["requeued"]:
        typer.echo(f"requeued {moved['dead_id']} -> {moved['source_stream']} {moved['new_id']}")
    for skip in result["skipped"]:
        typer.echo(f"skipped {skip['dead_id']}: {skip['reason']}")
    typer.echo(f"{len(result['requeued'])} requeued, {len(result['skipped'])} skipped")


@dlq_app.command("purge")
def dlq_purge(
    ids: list[str] = typer.Argument(None, help="Dead-letter ids to delete."),
    all_: bool = typer.Option(False, "--all", help="Delete every dead letter."),
    config: Path | None = ConfigOpt,
    broker: str | None = BrokerOpt,
    run: str | None = RunOpt,
    run_dir: Path | None = RunDirOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Delete dead letters for good."""
    from broker.dead_letters import purge_dead

    _check_selection(ids, all_)
    target = _target(config, None, broker, run, run_dir, "rlq-operator")
    with _broker(target.url, target.run) as (r, keys):
        removed = purge_dead(r, keys.dead, None if all_ else list(ids))
    if as_json:
        _emit_json({"version": 1, "purged": removed})
    else:
        typer.echo(f"purged {removed} dead letters")


def _check_selection(ids: list[str] | None, all_: bool) -> None:
    if bool(ids) == all_:
        typer.echo("name dead-letter ids or pass --all (not both)", err=True)
        raise typer.Exit(EXIT_UNREACHABLE)


# Plain-text rendering ----------------------------------------------------------------------------------------


def _stream_rows(streams: list[dict]) -> list[list[Any]]:
    rows: list[list[Any]] = [["STREAM", "LENGTH", "GROUP", "CONSUMERS", "PENDING", "LAG", "OLDEST IDLE", "MAX DELIV"]]
    for s in streams:
        if not s["groups"]:
            rows.append([s["name"], s["length"], "-", "", "", "", "", ""])
        for g in s["groups"]:
            lag = g["lag"] if g["lag_exact"] else f">={g['lag']}"
            idle = _duration_ms(g["oldest_pending_idle_ms"])
            names = ",".join(c["name"] for c in g["consumers"])
            consumers = f"{len(g['consumers'])} ({names})" if names else "0"
            rows.append([s["name"], s["length"], g["group"], consumers, g["pending"], lag, idle, g["max_deliveries"]])
    return rows


def _worker_rows(workers: list[dict]) -> list[list[Any]]:
    rows: list[list[Any]] = [
        ["WORKER", "ROLE", "NODE", "ACCELERATOR", "CAP", "SHARE", "STATUS", "VERSION", "HEARTBEAT", "ALIVE"]
    ]
    for w in workers:
        rows.append(
            [
                w["worker_id"],
                w["role"],
                w["node"],
                w["accelerator"],
                w["capacity"],
                f"{w['share']:.0%}" if w.get("share") else "-",
                w["status"],
                w["policy_version"],
                f"{w['heartbeat_age_s']:.1f}s ago",
                "yes" if w["alive"] else "no",
            ]
        )
    return rows


def _entry_line(entry: dict) -> str:
    head = f"{entry['id']}  {entry['age_s']:.1f}s ago  {entry['bytes']} B  "
    states = " ".join(_state(s) for s in entry["groups"])
    if entry["error"]:
        return f"{head}UNDECODABLE: {entry['error']}  {states}".rstrip()
    message = entry["message"]
    fields = " ".join(f"{k}={_brief(v)}" for k, v in message.items() if k not in ("kind", "schema"))
    return f"{head}{entry['kind']}  {fields}  {states}".rstrip()


def _state(state: dict) -> str:
    if state["state"] == "pending":
        idle = _duration_ms(state["idle_ms"])
        return f"[{state['group']}: pending on {state['consumer']}, idle {idle}, {state['deliveries']} deliveries]"
    return f"[{state['group']}: {state['state']}]"


def _brief(value: Any) -> str:
    if isinstance(value, dict) and "dtype" in value:
        return f"{value['dtype']}{value['shape']}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_brief(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return f"[{len(value)} items]"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _duration_ms(ms: int | None) -> str:
    if ms is None:
        return "-"
    seconds = ms / 1000
    return f"{seconds:.1f}s" if seconds < 120 else time.strftime("%Hh%Mm%Ss", time.gmtime(seconds))


def _table(rows: list[list[Any]]) -> str:
    cells = [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)
