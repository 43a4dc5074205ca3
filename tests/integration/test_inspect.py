"""Queue inspection over a real redis-server: reports, peek, dead-letter commands, and that reading changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

import broker.inspect as inspect_module
from broker.connection import connect
from broker.inspect import peek, queues_report
from broker.keys import Keys
from broker.registry import Registry
from broker.schemas import Array, Prompt, PromptBatch, RolloutGroup, Sample, WorkerHeartbeat, encode
from broker.server import free_port
from broker.streams import StreamConsumer, StreamProducer
from rlq.cli import app

QUEUES_FIELDS = {"version", "broker", "run", "time", "streams", "dead_letters", "workers", "judge_queue"}
STREAM_FIELDS = {"stream", "name", "exists", "length", "first_id", "last_id", "last_generated_id", "groups"}
GROUP_FIELDS = {
    "group",
    "consumers",
    "pending",
    "lag",
    "lag_exact",
    "last_delivered_id",
    "oldest_pending_id",
    "oldest_pending_idle_ms",
    "max_deliveries",
    "pending_scanned",
}
WORKER_FIELDS = {"worker_id", "role", "node", "accelerator", "capacity", "status", "heartbeat_age_s", "alive"}
ENTRY_FIELDS = {"id", "age_s", "bytes", "kind", "message", "error", "groups"}


@pytest.fixture
def r(redis_url: str):
    client = connect(redis_url)
    yield client
    client.close()


def batch(i: int) -> PromptBatch:
    prompt = Prompt(prompt_id=f"p{i}", token_ids=Array.from_numpy(np.arange(7), "int32"), ground_truth="1")
    return PromptBatch(batch_id=f"b{i}", prompts=[prompt], n_samples=2)


def rollout() -> RolloutGroup:
    sample = Sample(
        token_ids=Array.from_numpy([5, 9, 2], "int32"),
        logprobs=Array.from_numpy([-0.5, -1.5, -0.25], "float32"),
        finish_reason="stop",
    )
    prompt = Prompt(prompt_id="p0", token_ids=Array.from_numpy([1, 2], "int32"), ground_truth="1")
    return RolloutGroup(
        group_id="p0@b0", batch_id="b0", prompt=prompt, samples=[sample], policy_version=7, worker_id="gen-0"
    )


@pytest.fixture
def busy_run(r, run_name: str) -> Keys:
    """10 prompt batches: 3 acked, 2 pending on gen-a (one reclaimed by gen-b), 5 unread; 2 dead; 2 workers."""
    keys = Keys(run_name)
    StreamProducer(r, keys.prompts).add_many([batch(i) for i in range(10)])
    a = StreamConsumer(r, keys.prompts, "gen", "gen-a", dead_stream=keys.dead, claim_idle_ms=20)
    a.ensure_group()
    got = a.read(count=5, block_ms=0)
    a.ack([d.entry_id for d in got[:3]])
    time.sleep(0.05)
    b = StreamConsumer(r, keys.prompts, "gen", "gen-b", dead_stream=keys.dead, claim_idle_ms=20, count=1)
    (reclaimed,) = b.read(block_ms=0)
    assert reclaimed.deliveries == 2
    StreamProducer(r, keys.prompts).add_encoded([b"\xc1"])  # malformed, unread: peek must show it
    StreamProducer(r, keys.scored).add(rollout())
    d = StreamConsumer(r, keys.scored, "learner", "l0", dead_stream=keys.dead)
    d.ensure_group()
    r.xadd(keys.scored, {b"m": b"\xdd\xff\xff\xff\xff"})
    r.xadd(keys.scored, {b"m": b"\x91" * 2000 + b"\x00"})
    assert [x.message.group_id for x in d.read(block_ms=0)] == ["p0@b0"]
    registry = Registry(r, keys)
    registry.heartbeat(WorkerHeartbeat(worker_id="gen-a", role="generate", capacity=8), ttl_s=30)
    registry.heartbeat(WorkerHeartbeat(worker_id="judge-0", role="judge", sent_at=time.time() - 100), ttl_s=0.001)
    time.sleep(0.01)
    return keys


def pel_snapshot(r, keys: Keys) -> dict:
    out = {}
    for stream in (keys.prompts, keys.scored):
        for g in r.xinfo_groups(stream):
            rows = r.xpending_range(stream, g["name"], "-", "+", 1000)
            out[(stream, g["name"])] = (
                g["last-delivered-id"],
                [(x["message_id"], x["consumer"], x["times_delivered"]) for x in rows],
                [x["time_since_delivered"] for x in rows],
            )
    return out


def test_queues_report_counts_everything(r, busy_run: Keys) -> None:
    report = queues_report(r, busy_run, broker="here")
    assert set(report) == QUEUES_FIELDS
    streams = {s["name"]: s for s in report["streams"]}
    assert list(streams)[:3] == ["prompts", "scored", "dead"]
    prompts = streams["prompts"]
    assert all(set(s) == STREAM_FIELDS for s in report["streams"]) and prompts["length"] == 11
    (gen,) = prompts["groups"]
    assert set(gen) == GROUP_FIELDS
    assert gen["pending"] == 2
    assert gen["lag"] == 6 and gen["lag_exact"]  # 5 unread batches + the malformed entry
    assert gen["max_deliveries"] == 2
    assert gen["oldest_pending_idle_ms"] is not None and gen["oldest_pending_idle_ms"] >= 0
    assert {c["name"]: c["pending"] for c in gen["consumers"]} == {"gen-a": 1, "gen-b": 1}
    assert streams["scored"]["groups"][0]["pending"] == 1 and streams["scored"]["groups"][0]["lag"] == 0
    assert report["dead_letters"] == 2
    workers = {w["worker_id"]: w for w in report["workers"]}
    assert set(workers["gen-a"]) >= WORKER_FIELDS
    assert workers["gen-a"]["alive"] and workers["gen-a"]["capacity"] == 8
    assert not workers["judge-0"]["alive"] and workers["judge-0"]["heartbeat_age_s"] >= 100


def test_lag_is_counted_when_the_group_is_midway(r, run_name: str) -> None:
    keys = Keys(run_name)
    StreamProducer(r, keys.prompts).add_many([batch(i) for i in range(300)])
    c = StreamConsumer(r, keys.prompts, "gen", "a", dead_stream=keys.dead)
    c.ensure_group()
    c.ack([d.entry_id for d in c.read(count=100, block_ms=0)])
    (gen,) = queues_report(r, keys)["streams"][0]["groups"]
    assert (gen["lag"], gen["lag_exact"], gen["pending"]) == (200, True, 0)


def test_a_long_lag_is_reported_as_a_lower_bound(r, run_name: str, monkeypatch) -> None:
    keys = Keys(run_name)
    StreamProducer(r, keys.prompts).add_many([batch(i) for i in range(120)])
    c = StreamConsumer(r, keys.prompts, "gen", "a", dead_stream=keys.dead)
    c.ensure_group()
    c.ack([d.entry_id for d in c.read(count=10, block_ms=0)])
    monkeypatch.setattr(inspect_module, "LAG_COUNT_LIMIT", 50)
    (gen,) = queues_report(r, keys)["streams"][0]["groups"]
    if gen["lag_exact"]:  # Redis >= 7 reports the lag itself
        assert gen["lag"] == 110
    else:
        assert gen["lag"] >= 50


def test_inspection_changes_no_delivery_state(r, busy_run: Keys) -> None:
    before = pel_snapshot(r, busy_run)
    queues_report(r, busy_run)
    for stream in ("prompts", "scored", "dead"):
        peek(r, f"rlq:{busy_run.run}:{stream}", count=100)
    result = CliRunner().invoke(app, ["peek", "prompts", "-n", "20", "--broker", _url(r), "--run", busy_run.run])
    assert result.exit_code == 0, result.output
    after = pel_snapshot(r, busy_run)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key][:2] == after[key][:2], "same last-delivered id, pending ids, owners and delivery counts"
        assert all(a >= b for a, b in zip(after[key][2], before[key][2], strict=True)), "idle times not reset"


def test_peek_decodes_and_summarises(r, busy_run: Keys) -> None:
    entries = peek(r, busy_run.prompts, count=20)
    assert len(entries) == 11 and all(set(e) == ENTRY_FIELDS for e in entries)
    first = entries[0]
    assert first["kind"] == "prompt_batch"
    token_ids = first["message"]["prompts"][0]["token_ids"]
    assert token_ids == {"dtype": "int32", "shape": [7], "min": 0, "max": 6}
    assert [g["state"] for g in first["groups"]] == ["acked"]
    pending = [e for e in entries if e["groups"][0]["state"] == "pending"]
    assert {p["groups"][0]["consumer"] for p in pending} == {"gen-a", "gen-b"}
    assert max(p["groups"][0]["deliveries"] for p in pending) == 2
    assert entries[-1]["error"] and entries[-1]["message"] is None
    assert entries[-1]["groups"][0]["state"] == "unread"
    (scored,) = peek(r, busy_run.scored, count=1)
    logprobs = scored["message"]["samples"][0]["logprobs"]
    assert logprobs == {"dtype": "float32", "shape": [3], "min": -1.5, "max": -0.25}
    assert scored["message"]["policy_version"] == 7
    newest = peek(r, busy_run.prompts, count=2, last=True)
    assert [e["id"] for e in newest] == [e["id"] for e in entries[-2:]]


def _url(r) -> str:
    kw = r.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/0"


def invoke(*args: str) -> dict:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_queues_json_has_the_documented_fields(r, busy_run: Keys) -> None:
    out = invoke("queues", "--json", "--broker", _url(r), "--run", busy_run.run)
    assert set(out) == QUEUES_FIELDS and out["run"] == busy_run.run
    assert set(out["streams"][0]["groups"][0]) == GROUP_FIELDS
    text = CliRunner().invoke(app, ["queues", "--broker", _url(r), "--run", busy_run.run])
    assert text.exit_code == 0 and "prompts" in text.stdout and "gen-a" in text.stdout


def test_cli_run_and_broker_come_from_the_environment(r, busy_run: Keys) -> None:
    result = CliRunner().invoke(app, ["queues", "--json"], env={"RLQ_BROKER_URL": _url(r), "RLQ_RUN": busy_run.run})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["run"] == busy_run.run


def test_cli_takes_the_runs_config_as_the_views_do(r, busy_run: Keys, tmp_path) -> None:
    """`-c <log_dir>/config.yaml` names the broker and the run; `--run` still overrides the config's name."""
    from pathlib import Path

    import yaml

    saved = yaml.safe_load((Path(__file__).parents[2] / "configs" / "tiny_arith_cpu.yaml").read_text())
    saved.update(run_name=busy_run.run, broker={"url": _url(r)}, logger={"log_dir": str(tmp_path / "run")})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(saved))
    assert invoke("queues", "--json", "-c", str(config))["run"] == busy_run.run
    assert invoke("peek", "scored", "-n", "1", "--json", "-c", str(config))["stream"] == busy_run.scored
    assert len(invoke("dlq", "list", "--json", "--config", str(config))["letters"]) == 2
    assert invoke("queues", "--json", "-c", str(config), "--run", "other")["run"] == "other"


def test_cli_peek_json(r, busy_run: Keys) -> None:
    out = invoke("peek", "scored", "-n", "5", "--json", "--broker", _url(r), "--run", busy_run.run)
    assert out["stream"] == busy_run.scored
    assert out["entries"][0]["message"]["samples"][0]["token_ids"]["shape"] == [3]
    text = CliRunner().invoke(app, ["peek", "prompts", "-n", "20", "--broker", _url(r), "--run", busy_run.run])
    assert text.exit_code == 0 and "prompt_batch" in text.stdout and "UNDECODABLE" in text.stdout


def test_cli_dlq_list_requeue_purge(r, busy_run: Keys) -> None:
    common = ("--broker", _url(r), "--run", busy_run.run)
    letters = invoke("dlq", "list", "--json", *common)["letters"]
    assert len(letters) == 2 and all(d["source_stream"] == busy_run.scored and d["reason"] for d in letters)
    assert letters[0]["payload"]["bytes"] == 5 and letters[0]["payload"]["error"]

    # A still-malformed payload is not requeued (it would bounce straight back) unless forced.
    out = invoke("dlq", "requeue", "--all", "--json", *common)
    assert out["requeued"] == [] and len(out["skipped"]) == 2
    length = r.xlen(busy_run.scored)
    out = invoke("dlq", "requeue", letters[0]["id"], "--force", "--json", *common)
    assert out["requeued"][0]["source_stream"] == busy_run.scored
    assert r.xlen(busy_run.scored) == length + 1
    assert r.xrange(busy_run.scored, "-", "+")[-1][1] == {b"m": b"\xdd\xff\xff\xff\xff"}, "original bytes back"
    assert r.xlen(busy_run.dead) == 1

    assert invoke("dlq", "purge", "--all", "--json", *common) == {"version": 1, "purged": 1}
    assert r.xlen(busy_run.dead) == 0


def test_cli_dlq_requeue_of_a_valid_payload(r, run_name: str) -> None:
    keys = Keys(run_name)
    c = StreamConsumer(r, keys.prompts, "gen", "a", dead_stream=keys.dead)
    c.ensure_group()
    StreamProducer(r, keys.prompts).add(batch(1))
    (delivery,) = c.read(block_ms=0)
    c.dead_letter(delivery, "engine was down")
    out = invoke("dlq", "requeue", "--all", "--json", "--broker", _url(r), "--run", run_name)
    assert len(out["requeued"]) == 1
    (again,) = c.read(block_ms=0)
    assert again.message.batch_id == "b1" and again.payload == encode(delivery.message)


def test_unreachable_broker_gives_one_line_and_exit_2() -> None:
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "rlq", "queues", "--broker", f"redis://127.0.0.1:{port}/0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"cannot reach Redis at 127.0.0.1:{port}: ")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_cli_peek_at_a_non_stream_is_one_line(r, busy_run: Keys) -> None:
    result = CliRunner().invoke(app, ["peek", "workers", "--broker", _url(r), "--run", busy_run.run])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"{busy_run.workers} is a hash, not a stream"


def test_cli_dlq_needs_ids_or_all(r, busy_run: Keys) -> None:
    result = CliRunner().invoke(app, ["dlq", "purge", "--broker", _url(r), "--run", busy_run.run])
    assert result.exit_code == 2 and r.xlen(busy_run.dead) == 2
