"""Lossless resume: SIGKILL the learner (2 gloo ranks under torchrun) between checkpoints, start it again, and
check with the ledger that every scored group is trained exactly once in the surviving timeline.

Generation workers and judges are replaced by `StandInRollouts` (see learner_support.py). Its group budget
makes the kill land at a known point: 4 steps' worth of groups, checkpoint at step 3, killed while step 5
waits for data, so step 4's groups were read (and trained) but not yet covered by a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time

import msgspec
import psutil
import pytest

from broker.connection import connect
from broker.keys import Keys
from broker.schemas import ScoredGroup, decode
from broker.streams import PAYLOAD_FIELD
from tests.integration.learner_support import (
    StandInRollouts,
    read_jsonl,
    start_learner,
    write_config,
    write_prompts,
)

STEPS, SAVE_PERIOD, PROMPTS = 8, 3, 4


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def kill_tree(pid: int) -> None:
    """SIGKILL torchrun and its rank processes (torchrun starts each rank in a session of its own)."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)


def scored_ids_not_consumed(r, keys: Keys) -> set[str]:
    """Group ids still in the scored stream unread or pending (never trained, never dropped)."""
    info = {g["name"].decode(): g for g in r.xinfo_groups(keys.scored)}["learner"]
    last = info["last-delivered-id"].decode()
    pending = {e["message_id"].decode() for e in r.xpending_range(keys.scored, "learner", "-", "+", 10_000)}
    ids = set()
    for entry_id, fields in r.xrange(keys.scored):
        entry = entry_id.decode()
        if entry in pending or tuple(map(int, entry.split("-"))) > tuple(map(int, last.split("-"))):
            ids.add(decode(fields[PAYLOAD_FIELD], ScoredGroup).group_id)
    return ids


@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp2", marks=pytest.mark.slow)])
def test_sigkill_and_restart_loses_nothing_and_trains_nothing_twice(
    tmp_path, tiny_model_dir, redis_url, run_name, parallel
):
    policy = tiny_model_dir
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "learner.yaml", model=policy, data=write_prompts(tmp_path / "prompts.jsonl"), run=run_name,
        redis_url=redis_url, run_dir=run_dir, max_num_steps=STEPS, max_staleness=1, num_prompts_per_step=PROMPTS,
    )  # fmt: skip
    ledger_path, ckpt = run_dir / "ledger.jsonl", run_dir / "ckpt"
    rollouts = StandInRollouts(policy, redis_url, run_name)
    rollouts.allow(4 * PROMPTS)
    rollouts.start()
    overrides = (f"checkpointing.save_period={SAVE_PERIOD}", f"++policy.dtensor_cfg.enabled={parallel == 'fsdp2'}")
    first = start_learner(config, 2, tmp_path / "learner-1.log", *overrides)
    try:
        wait_for(lambda: len(read_jsonl(ledger_path)) == 4, 240, "4 trained steps")
        time.sleep(1.0)  # step 5 is now blocked waiting for groups
        assert (ckpt / "latest").read_text() == "step_3"
        first_timeline = read_jsonl(ledger_path)
        ranks = psutil.Process(first.pid).children(recursive=True)
        first.send_signal(signal.SIGKILL)  # the launcher only: its ranks must not outlive it
        first.wait(timeout=30)
        _, orphans = psutil.wait_procs(ranks, timeout=20)
        assert not orphans, f"ranks {[p.pid for p in orphans]} survived the launcher"

        rollouts.allow(None)
        second = start_learner(config, 2, tmp_path / "learner-2.log", *overrides)
        rc = second.wait(timeout=300)
    finally:
        rollouts.stop.set()
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                kill_tree(proc.pid)
    log2 = (tmp_path / "learner-2.log").read_text()
    assert rc == 0, log2[-3000:]
    assert rollouts.error is None
    assert "resumed at version 3" in log2

    ledger = read_jsonl(ledger_path)
    assert [rec["step"] for rec in ledger] == list(range(1, STEPS + 1))  # versions monotone, none skipped
    assert ledger[:3] == first_timeline[:3]  # the checkpointed past is untouched
    discarded = read_jsonl(run_dir / "ledger.discarded.jsonl")
    assert [rec["step"] for rec in discarded] == [4]  # the step the kill undid

    trained = [g for rec in ledger for g in rec["trained"]]
    assert len(trained) == len(set(trained)) == STEPS * PROMPTS  # nothing trained twice
    assert set(discarded[0]["trained"]) <= set(trained)  # what the killed step trained is trained again
    dropped = {g for rec in ledger for ids in rec["dropped"].values() for g in ids}
    final = json.loads((ckpt / f"step_{STEPS}" / "learner_state.json").read_text())
    assert final["version"] == STEPS
    buffered = {
        decode(b, ScoredGroup).group_id
        for b in msgspec.msgpack.decode((ckpt / f"step_{STEPS}" / "pending_groups.msgpack").read_bytes())
    }
    r = connect(redis_url)
    keys = Keys(run_name)
    unconsumed = scored_ids_not_consumed(r, keys)
    published = set(rollouts.published)
    assert published == set(trained) | dropped | buffered | unconsumed  # nothing lost
    assert not (set(trained) & (buffered | unconsumed))
    assert int(r.hget(keys.policy, "version")) == STEPS
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 4, 5, 6, 7, 8]  # the second run resumes at version 3

    # Started once more on the finished checkpoint, with a validation due at its version that no worker is there to
    # serve: it says the run is done and exits at once (it used to wait data_timeout_s for that validation).
    third = start_learner(config, 1, tmp_path / "learner-3.log", *overrides, "grpo.val_period=2",
                          f"++data.validation_path={tmp_path / 'prompts.jsonl'}")  # fmt: skip
    try:
        rc3 = third.wait(timeout=90)
    finally:
        if third.poll() is None:
            kill_tree(third.pid)
    log3 = (tmp_path / "learner-3.log").read_text()
    assert rc3 == 0 and f"holds a finished run (version {STEPS}, grpo.max_num_steps reached)" in log3, log3[-3000:]
    assert "validation of version" not in log3 and read_jsonl(run_dir / "metrics.jsonl") == metrics


@pytest.mark.slow
def test_sigterm_while_waiting_for_data_checkpoints_and_exits(tmp_path, tiny_model_dir, redis_url, run_name):
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "learner.yaml", model=tiny_model_dir, data=write_prompts(tmp_path / "prompts.jsonl"),
        run=run_name, redis_url=redis_url, run_dir=run_dir, max_num_steps=STEPS, max_staleness=1,
    )  # fmt: skip
    rollouts = StandInRollouts(tiny_model_dir, redis_url, run_name)
    rollouts.allow(2 * PROMPTS + 2)  # two steps and half of a third
    rollouts.start()
    learner = start_learner(config, 2, tmp_path / "learner.log", "checkpointing.save_period=10")
    try:
        wait_for(lambda: len(read_jsonl(run_dir / "ledger.jsonl")) == 2, 240, "2 trained steps")
        wait_for(lambda: len(rollouts.published) == 2 * PROMPTS + 2, 60, "the extra groups")
        time.sleep(1.0)
        learner.send_signal(signal.SIGTERM)  # what `rlq train` sends on Ctrl-C; torchrun forwards it to the ranks
        learner.wait(timeout=120)
    finally:
        rollouts.stop.set()
        if learner.poll() is None:
            kill_tree(learner.pid)
    log = (tmp_path / "learner.log").read_text()
    assert "stopping after this step" in log
    assert (run_dir / "ckpt" / "latest").read_text() == "step_2"  # saved on the way out, not at save_period
    state = json.loads((run_dir / "ckpt" / "step_2" / "learner_state.json").read_text())
    assert state["version"] == 2
    held = msgspec.msgpack.decode((run_dir / "ckpt" / "step_2" / "pending_groups.msgpack").read_bytes())
    assert len(held) == 2  # read, not trained: kept in the checkpoint
    pending = connect(redis_url).xpending(Keys(run_name).scored, "learner")["pending"]
    assert pending == 0  # everything read is covered by the checkpoint and acknowledged
