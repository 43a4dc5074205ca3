"""The rollout log (learner/rollout_log.py): parts pandas reads, drops with their reason, a writer that never
blocks the step, its size bound, `rlq rollouts`, and replay's rebuilding of the logged groups."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from broker.schemas import Array, Prompt, RolloutGroup, Sample, ScoredGroup
from learner.config import GRPOConfig
from learner.curriculum import SolvedPrompts
from learner.replay import trained_steps
from learner.rollout_io import Collector
from learner.rollout_log import ROLLOUT_DIR, RolloutLog, read_log
from learner.runtime_config import RolloutLogConfig


def make_group(i: int, version: int = 0, n: int = 4, rng_seed: int = 0) -> ScoredGroup:
    rng = np.random.default_rng(rng_seed + i)
    prompt = Prompt(f"p{i}", Array.from_numpy(rng.integers(3, 600, 12), "int32"), str(i), text=f"what is {i}?")
    samples = []
    for j in range(n):
        length = int(rng.integers(1, 20))
        ids, logprobs = rng.integers(3, 600, length), -rng.random(length) * 3
        samples.append(Sample(Array.from_numpy(ids, "int32"), Array.from_numpy(logprobs, "float32"), "stop",
                              text=f"answer {j}"))  # fmt: skip
    rollout = RolloutGroup(group_id=f"p{i}@b{i // 2}", batch_id=f"b{i // 2}", prompt=prompt, samples=samples,
                           policy_version=version, worker_id="gen-0", timings={"generate_s": 0.5})  # fmt: skip
    rewards = Array.from_numpy(rng.integers(0, 2, n).astype(np.float32), "float32")
    verdicts = ["correct" if r else "incorrect" for r in rewards.to_numpy()]
    return ScoredGroup(rollout=rollout, rewards=rewards, verdicts=verdicts, judge_id="judge-0",
                       timings={"verify_s": 0.01, "queue_wait_s": 0.2})  # fmt: skip


def test_trained_groups_land_in_parts_pandas_reads_with_every_field(tmp_path):
    log = RolloutLog(RolloutLogConfig(flush_steps=2), tmp_path / ROLLOUT_DIR, GRPOConfig())
    groups = {step: [make_group(2 * step + k, version=step - 1) for k in range(2)] for step in (1, 2, 3)}
    for step, batch in groups.items():
        assert log.trained(step, batch)["rollout/log_rows_lost"] == 0
    log.close()
    names = sorted(p.name for p in (tmp_path / ROLLOUT_DIR).iterdir())
    assert names == ["part-00000-steps-000001-000002.parquet", "part-00001-steps-000003-000003.parquet"]
    frame = pd.read_parquet(tmp_path / ROLLOUT_DIR)
    assert len(frame) == 3 * 2 * 4 and log.rows_written == 24
    row = frame[(frame.step == 2) & (frame.group_index == 1) & (frame.sample_index == 3)].iloc[0]
    source = groups[2][1]
    assert row.group_id == source.group_id and row.prompt_id == "p5" and row.batch_id == "b2"
    assert row.policy_version == 1 and row.staleness == 0 and row.worker_id == "gen-0" and row.judge_id == "judge-0"
    assert list(row.prompt_ids) == source.rollout.prompt.token_ids.to_numpy().tolist()
    assert list(row.completion_ids) == source.rollout.samples[3].token_ids.to_numpy().tolist()
    assert np.array_equal(np.asarray(row.behaviour_logprobs, np.float32), source.rollout.samples[3].logprobs.to_numpy())
    assert row.reward == source.rewards.to_numpy()[3] and row.verdict == source.verdicts[3]
    assert row.prompt_text == "what is 5?" and row.completion_text == "answer 3" and pd.isna(row.dropped_reason)
    assert row.judge_verify_s == 0.01 and row.judge_queue_wait_s == 0.2 and row.generate_s == 0.5
    assert row.judge_latency_s == pytest.approx(source.created_at - source.rollout.created_at)


def test_dropped_groups_are_logged_with_their_reason_at_the_step_being_collected(tmp_path):
    log = RolloutLog(RolloutLogConfig(), tmp_path / ROLLOUT_DIR, GRPOConfig())
    feeder = SimpleNamespace(in_flight=9, admission=None, solved=SolvedPrompts(0, 1))
    collector = Collector(consumer=None, feeder=feeder, cfg=GRPOConfig(max_staleness=1))
    collector.on_drop = log.dropped
    result = SimpleNamespace(dropped={})
    fresh, old = make_group(0, version=4), make_group(1, version=2)
    for group in (fresh, fresh, old):  # the second copy is a duplicate, `old` is 3 versions behind
        collector._accept(group, 5, result)
    log.close()
    assert result.dropped == {"duplicate": [fresh.group_id], "stale": [old.group_id]}
    frame = read_log(tmp_path).to_pandas()
    by_reason = frame.groupby("dropped_reason").agg(step=("step", "max"), staleness=("staleness", "max"),
                                                    rows=("step", "size"))  # fmt: skip
    assert by_reason.to_dict("index") == {"duplicate": {"step": 6, "staleness": 1, "rows": 4},
                                          "stale": {"step": 6, "staleness": 3, "rows": 4}}  # fmt: skip
    assert (frame.group_index == -1).all()


def test_a_writer_that_falls_behind_costs_rows_not_time(tmp_path, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr("learner.rollout_log.group_columns", lambda *a, **k: release.wait() and {})
    log = RolloutLog(RolloutLogConfig(queue_steps=2), tmp_path / ROLLOUT_DIR, GRPOConfig())
    log.trained(1, [make_group(1)])
    while log._queue.qsize():  # the writer took it, and is stuck on it
        time.sleep(0.01)
    started = time.perf_counter()
    for step in range(2, 6):  # two wait, two do not fit
        log.trained(step, [make_group(step)])
    assert time.perf_counter() - started < 0.5
    assert log.rows_lost == 2 * 4
    release.set()
    log.close()


def test_rows_past_max_mb_are_counted_not_written(tmp_path):
    log = RolloutLog(RolloutLogConfig(flush_steps=1, max_mb=0.001), tmp_path / ROLLOUT_DIR, GRPOConfig())
    for step in (1, 2, 3):
        log.trained(step, [make_group(step)])
    log.close()
    assert len(list((tmp_path / ROLLOUT_DIR).glob("part-*"))) == 1, "the first part passes the 1 KB budget"
    assert log.rows_written == 4 and log.rows_lost == 8


def test_keep_text_false_keeps_ids_only(tmp_path):
    log = RolloutLog(RolloutLogConfig(keep_text=False), tmp_path / ROLLOUT_DIR, GRPOConfig())
    log.trained(1, [make_group(0)])
    log.close()
    frame = read_log(tmp_path).to_pandas()
    assert frame.prompt_text.isna().all() and frame.completion_text.isna().all()
    assert frame.completion_ids.map(len).gt(0).all()


def test_a_resumed_learner_continues_the_part_sequence_and_replay_takes_the_later_step(tmp_path):
    first = [make_group(0), make_group(1)]
    again = [make_group(7), make_group(8)]
    for batch in (first, again):  # a learner that re-trained step 1 after a restart
        log = RolloutLog(RolloutLogConfig(), tmp_path / ROLLOUT_DIR, GRPOConfig())
        log.trained(1, batch)
        log.close()
    assert [p.name[:10] for p in sorted((tmp_path / ROLLOUT_DIR).iterdir())] == ["part-00000", "part-00001"]
    rebuilt = trained_steps(tmp_path)[1]
    assert [g.group_id for g in rebuilt] == [g.group_id for g in again]
    for got, want in zip(rebuilt, again, strict=True):
        assert got.rewards.to_numpy().tobytes() == want.rewards.to_numpy().tobytes()
        for s, t in zip(got.rollout.samples, want.rollout.samples, strict=True):
            assert s.token_ids.to_numpy().tolist() == t.token_ids.to_numpy().tolist()
            assert s.logprobs.to_numpy().tobytes() == t.logprobs.to_numpy().tobytes()
        assert got.rollout.prompt.token_ids.to_numpy().tolist() == want.rollout.prompt.token_ids.to_numpy().tolist()


def test_rlq_rollouts_prints_one_step_as_a_table_and_as_json(tmp_path):
    from rlq.cli import app

    log = RolloutLog(RolloutLogConfig(), tmp_path / ROLLOUT_DIR, GRPOConfig())
    log.trained(1, [make_group(0)])
    log.trained(2, [make_group(1, version=1), make_group(2, version=1)])
    log.dropped(make_group(3), "stale", 1)
    log.close()
    runner = CliRunner()
    table = runner.invoke(app, ["rollouts", "--run-dir", str(tmp_path), "--step", "2", "--samples"])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0] == "step 2: 2 groups trained, 1 dropped"
    assert lines[1].split()[:3] == ["GROUP", "VERSION", "STALE"]
    assert [line.split()[0] for line in lines if line.startswith("p")] == ["p1@b0", "p2@b1", "p3@b1"]
    assert "'answer 3'" in lines[-1]
    raw = runner.invoke(app, ["rollouts", "--run-dir", str(tmp_path), "--step", "2", "--json"])
    assert raw.exit_code == 0, raw.output
    doc = json.loads(raw.output)
    assert [g["dropped_reason"] for g in doc["groups"]] == [None, None, "stale"]
    assert len(doc["groups"][0]["samples"]) == 4 and doc["groups"][0]["samples"][2]["completion_text"] == "answer 2"
