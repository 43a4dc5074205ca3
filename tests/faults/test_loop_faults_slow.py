"""The full fault suite: one fault per loop run (real redis-server, Celery judge, generation workers, torchrun
learner), each judged by the ledger. `pytest -m slow tests/faults` (see docs/reliability.md)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from broker.schemas import WorkerHeartbeat, decode
from tests.faults.harness import Ledger, LoopRun, StreamRecorder, record

pytestmark = pytest.mark.slow


def assert_clean(loop: LoopRun, steps: int, row: str, **figures) -> dict:
    loop.drain()
    verdict = Ledger(loop).classify()
    summary = verdict.summary()
    record(row, **summary, **figures, steps=loop.step())
    assert not verdict.lost, f"lost groups: {verdict.lost[:10]} ({summary})"
    assert not verdict.duplicated and not verdict.scored_twice, summary
    trained_or_dropped = len(verdict.trained_once) + sum(len(v) for v in verdict.dropped.values())
    assert trained_or_dropped >= steps * 8, summary
    return summary


def heartbeat_version(loop: LoopRun, worker_id: str) -> int:
    r = loop.client()
    try:
        raw = r.hget(loop.keys.workers, worker_id)
    finally:
        r.close()
    if raw is None:
        return -1
    beat = decode(raw)
    assert isinstance(beat, WorkerHeartbeat)
    return beat.policy_version


def test_learner_sigkill_and_resume(loop: LoopRun):
    loop.overrides += ["grpo.max_num_steps=5"]
    loop.start_all(generation_workers=1)
    loop.wait_step(2)
    loop.kill("learner")
    killed_at = time.monotonic()
    loop.start_learner()
    loop.wait_for(lambda: loop.step() >= 3, 600, "a step after the resume")
    recover_s = time.monotonic() - killed_at
    assert loop.wait_learner_exit(600) == 0, loop.describe()
    ledger = [json.loads(line) for line in (loop.run_dir / "ledger.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in ledger] == [1, 2, 3, 4, 5], "versions monotone, each step once"
    assert_clean(loop, 5, "learner_sigkill_resume", recover_s=round(recover_s, 1))


@pytest.mark.xfail(
    strict=False,
    reason="roles outlive a Redis restart only within their retry window: with the server down ~3 s the learner "
    "exited ('rlq: Error 111 connecting ... Connection refused') and the generation worker's Celery submit raised "
    "OperationalError (run of 2026-11-27 08:51); an earlier run, restart inside the window, passed",
)
def test_redis_sigkill_and_restart_with_aof(loop: LoopRun):
    loop.overrides += ["grpo.max_num_steps=5"]
    loop.start_all(generation_workers=1)
    loop.wait_step(2)
    port = loop.server.port
    loop.server.process.send_signal(signal.SIGKILL)
    loop.server.process.wait(timeout=10)
    time.sleep(3)
    killed_step = loop.step()
    loop.start_redis(port=port)  # same port and directory: the AOF is replayed
    restarted_at = time.monotonic()
    loop.wait_step(killed_step + 1, timeout_s=600)
    recover_s = time.monotonic() - restarted_at
    assert loop.wait_learner_exit(600) == 0, loop.describe()
    assert loop.alive("judge") and loop.alive("generate-0"), loop.describe()
    assert_clean(loop, 5, "redis_sigkill_aof", recover_s=round(recover_s, 1))


def judge_pool_children(loop: LoopRun) -> list[int]:
    """The Celery pool processes: children of the judge's main process (each has its own verifier child)."""
    main = loop.roles["judge"].process.pid
    with open(f"/proc/{main}/task/{main}/children") as fh:
        return [int(p) for p in fh.read().split()]


def test_celery_child_sigkill(loop: LoopRun):
    """The judge's pool processes SIGKILLed while they verify a slow group (answers that run into the per-answer
    deadline): the task comes back, the group is scored exactly once, the run goes on."""
    from tests.faults.test_loop_faults import NESTED_POWER, inject_group, scored_count

    loop.overrides += ["grpo.max_num_steps=4"]
    loop.start_all(generation_workers=1)
    loop.wait_step(2)  # the group below (version 0) is then stale: dropped, never trained
    group_id = inject_group(loop, "slow", [NESTED_POWER, NESTED_POWER, "Answer: 0"], policy_version=0)
    judge_log = loop.roles["judge"].log_path
    loop.wait_for(lambda: f"[{group_id}] received" in judge_log.read_text(errors="replace"), 120, "the slow task")
    time.sleep(1.0)  # inside the first answer's 5 s deadline
    children = judge_pool_children(loop)
    assert children
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    loop.wait_for(lambda: scored_count(loop, group_id) >= 1, 300, "the killed task's group to be scored")
    rescored_s = time.monotonic() - killed_at
    assert loop.wait_learner_exit(600) == 0, loop.describe()
    assert loop.alive("judge"), loop.describe()
    assert scored_count(loop, group_id) == 1, "the redelivered group was scored twice"
    assert_clean(loop, 4, "celery_child_sigkill", rescored_s=round(rescored_s, 1), killed=len(children))


def test_stalled_worker_duplicate_rollouts_and_weight_sync(loop: LoopRun):
    """A worker stopped (SIGSTOP) mid-batch: its batch is reclaimed and regenerated by the other worker, the
    weight group re-forms without it; resumed, it still submits its (now duplicate) groups, which the judges'
    idempotency drops; it then re-joins the weight group."""
    loop.overrides += ["grpo.max_num_steps=6", "++policy.generation.worker.claim_idle_ms=4000"]
    loop.start_all(generation_workers=2)
    loop.wait_step(1)
    victim = f"{loop.run_name}-gen-1"
    from tests.faults.test_loop_faults import pending_of

    loop.wait_for(lambda: pending_of(loop, victim) > 0, 300, f"{victim} to hold a batch")
    loop.signal("generate-1", signal.SIGSTOP)
    stopped_at = time.monotonic()
    step = loop.step()
    loop.wait_step(step + 2, timeout_s=600)  # at least one broadcast while it is stopped
    run_on_s = time.monotonic() - stopped_at
    loop.signal("generate-1", signal.SIGCONT)
    assert loop.wait_learner_exit(600) == 0, loop.describe()
    records = loop.metrics()
    gen1_log = loop.roles["generate-1"].log_path.read_text(errors="replace")
    gen0_log = loop.roles["generate-0"].log_path.read_text(errors="replace")
    dup_batches = {line.split("batch ")[1].split(":")[0] for line in gen1_log.splitlines() if "batch " in line}
    dup_batches &= {line.split("batch ")[1].split(":")[0] for line in gen0_log.splitlines() if "batch " in line}
    summary = assert_clean(loop, 6, "stalled_worker", run_on_s=round(run_on_s, 1),
                           batches_generated_twice=len(dup_batches),
                           sync_failed=sum(r.get("sync/failed", 0) for r in records),
                           sync_members=[r.get("sync/members") for r in records])  # fmt: skip
    assert dup_batches, f"the stalled worker's batch was not generated twice ({summary})"
    assert loop.alive("generate-1") and loop.alive("generate-0"), loop.describe()


def test_worker_joins_and_another_leaves(loop: LoopRun):
    loop.overrides += ["grpo.max_num_steps=6", "++policy.generation.worker.claim_idle_ms=4000"]
    loop.start_all(generation_workers=1)
    loop.wait_step(1)
    loop.start_generate(1)
    joiner = f"{loop.run_name}-gen-1"
    joined_at = time.monotonic()
    loop.wait_for(lambda: heartbeat_version(loop, joiner) >= 2, 600, "the joiner to hold a newer version")
    join_s = time.monotonic() - joined_at
    loop.signal("generate-0", signal.SIGTERM)  # the leaver: finishes or releases its batch, deregisters
    loop.roles["generate-0"].process.wait(timeout=120)
    leave_step = loop.step()
    loop.wait_step(leave_step + 1, timeout_s=600)
    assert loop.wait_learner_exit(600) == 0, loop.describe()
    learner_version = loop.step()
    assert heartbeat_version(loop, joiner) == learner_version, "the joiner holds the final weights"
    assert_clean(loop, 6, "join_leave", join_s=round(join_s, 1))


def test_stream_trimming_while_entries_are_pending(loop: LoopRun):
    """Both streams trimmed as hard as safe_trim allows (keep_acked=0) every half second of the run, while a
    worker is killed holding a batch: no pending entry may go."""
    loop.overrides += ["grpo.max_num_steps=5", "++policy.generation.worker.claim_idle_ms=4000"]
    loop.start_redis()
    recorder = StreamRecorder(loop, trim=True)
    recorder.start()
    loop.write_config()
    loop.start_judge()
    loop.start_generate(0)
    loop.start_generate(1)
    loop.start_learner()
    loop.wait_step(1)
    from tests.faults.test_loop_faults import pending_of

    victim = f"{loop.run_name}-gen-1"
    loop.wait_for(lambda: pending_of(loop, victim) > 0, 300, f"{victim} to hold a batch")
    loop.kill("generate-1")
    assert loop.wait_learner_exit(600) == 0, loop.describe()
    loop.drain()
    recorder.stop()
    verdict = Ledger(loop).classify(recorder)
    summary = verdict.summary()
    record("trimming", **summary, trimmed_entries=recorder.trimmed, steps=loop.step())
    assert recorder.trimmed > 0, "nothing was trimmed: the scenario did not test anything"
    assert not verdict.lost, f"lost groups: {verdict.lost[:10]} ({summary})"
    assert not verdict.duplicated and not verdict.scored_twice, summary


def test_worker_stalled_during_a_weight_broadcast(loop: LoopRun):
    """SIGSTOP a member right after a step's metrics, i.e. just before the next broadcast while its heartbeat
    key still lives: the broadcast must fail within the watchdog timeout, evict it, re-form the group without it
    and go on; the stalled worker's batch is reclaimed."""
    loop.overrides += ["grpo.max_num_steps=5", "++policy.generation.worker.claim_idle_ms=4000"]
    loop.start_all(generation_workers=2)
    loop.wait_for(lambda: (loop.metrics() or [{}])[-1].get("sync/members") == 2, 600, "a broadcast to both")
    loop.signal("generate-1", signal.SIGSTOP)
    stopped_at = time.monotonic()
    step = loop.step()
    loop.wait_step(step + 2, timeout_s=600)
    run_on_s = time.monotonic() - stopped_at
    loop.signal("generate-1", signal.SIGCONT)
    assert loop.wait_learner_exit(600) == 0, loop.describe()
    records = loop.metrics()
    evicted = sum(r.get("sync/evicted", 0) for r in records)
    summary = assert_clean(loop, 5, "stalled_in_broadcast", run_on_s=round(run_on_s, 1), evicted=evicted,
                           broadcast_s_max=round(max(r.get("sync/broadcast_s", 0) for r in records), 1),
                           sync_failed=sum(r.get("sync/failed", 0) for r in records),
                           sync_members=[r.get("sync/members") for r in records])  # fmt: skip
    assert evicted >= 1, f"the stalled member was never evicted ({summary})"
