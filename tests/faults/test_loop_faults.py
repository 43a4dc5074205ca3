"""Faults injected into the real loop (real redis-server with a password, AOF and an ACL user, a real Celery
judge, two real generation workers, the torchrun learner), judged by the ledger (tests/faults/harness.py).

The short test (CI) runs several faults inside one loop run; the slow ones run one fault per loop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import redis

from broker.acl import GENERATE, INSPECT, password_for
from broker.schemas import (
    Array,
    DeadLetter,
    MessageError,
    Prompt,
    PromptBatch,
    RolloutGroup,
    Sample,
    ScoredGroup,
    decode,
    encode,
)
from tests.faults.harness import SECRET, Ledger, LoopRun, record

HUNDRED_MB = 100 * 1024 * 1024
STEPS = 20  # of the short test's run


def malformed_payloads(kind: str, field: str, big: bool) -> dict[str, bytes]:
    """Hostile payloads for a stream of `kind` messages; the hostile part sits in `field` (a list field) of a
    map that names the right kind, so the decoder has to reach it."""
    prompt = Prompt(prompt_id="p", token_ids=Array.from_numpy(np.arange(4), "int32"), ground_truth="1")
    valid = encode(PromptBatch(batch_id="x", prompts=[prompt], n_samples=1))
    head = b"\x82\xa4kind" + _str(kind) + _str(field)
    payloads = {
        "truncated": valid[: len(valid) // 2],
        "byte_0xc1": head + b"\xc1",
        "array_2^32": head + b"\xdd\xff\xff\xff\xff",  # array32 header claiming 2^32-1 items, none follow
        "nested_2000": head + b"\x91" * 2000 + b"\xc0",
        "unknown_ext": head + b"\xd4\x7f\x00",  # fixext1 of type 127
    }
    if big:
        payloads["string_100MB"] = head + b"\xdb" + HUNDRED_MB.to_bytes(4, "big") + b"a" * HUNDRED_MB
    return payloads


def _str(text: str) -> bytes:
    data = text.encode()
    assert len(data) < 32
    return bytes([0xA0 | len(data)]) + data


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def pending_of(loop: LoopRun, consumer: str) -> int:
    r = loop.client()
    try:
        rows = r.xpending_range(loop.keys.prompts, "generate", "-", "+", 100, consumername=consumer)
        return len(rows)
    except redis.ResponseError:
        return 0
    finally:
        r.close()


def send_pickled_task(loop: LoopRun, marker: str) -> None:
    """A Celery message serialised with pickle whose unpickling would create `marker`: it must be refused."""
    from celery import Celery

    from broker.judge_queue import TASK_NAME

    app = Celery(broker=loop.url_as(GENERATE))  # what a compromised generation worker may send
    try:
        app.send_task(TASK_NAME, args=(_Touch(marker),), queue=loop.keys.judge_queue, serializer="pickle")
    finally:
        app.close()


class _Touch:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


NESTED_POWER = "\\boxed{\\dfrac{5^{5^{5^{5}}}}{3}}"
# In $...$: the default rule (nemo_gym) hands math-verify the whole completion, and bare LaTeX after "Answer:" is
# no answer to it; delimited, the identity is parsed and its simplification runs out the deadline.
X800 = "Answer: $\\frac{x^{800}-1}{x-1}-(" + "+".join(["1", "x"] + [f"x^{{{k}}}" for k in range(2, 800)]) + ")$"


def inject_group(loop: LoopRun, name: str, texts: list[str], policy_version: int) -> str:
    """A rollout group sent to the judges as a misbehaving generation worker would: its own group id (never
    published by the feeder), answers of our choosing, and the policy version we say."""
    from broker.judge_queue import base_app, submit_groups

    def sample(text: str) -> Sample:
        return Sample(Array.from_numpy([1, 2], "int32"), Array.from_numpy([-0.5, -0.25], "float32"), "stop", text)

    prompt = Prompt(prompt_id=name, token_ids=Array.from_numpy([1, 2, 3], "int32"), ground_truth="0")
    group = RolloutGroup(
        group_id=f"{name}@injected", batch_id="injected", prompt=prompt, policy_version=policy_version,
        samples=[sample(t) for t in texts], worker_id="injector",
    )  # fmt: skip
    app = base_app(loop.url_as(GENERATE), loop.run_name)
    try:
        submit_groups(app, loop.run_name, [group])
    finally:
        app.close()
    return group.group_id


def scored_count(loop: LoopRun, group_id: str) -> int:
    r = loop.client()
    try:
        count = 0
        for _, fields in r.xrange(loop.keys.scored):
            try:
                message = decode(fields[b"m"])
            except MessageError:
                continue
            count += isinstance(message, ScoredGroup) and message.group_id == group_id
        return count
    finally:
        r.close()


def scored_by_id(loop: LoopRun, group_id: str) -> ScoredGroup | None:
    r = loop.client()
    try:
        for _, fields in r.xrange(loop.keys.scored):
            try:
                message = decode(fields[b"m"])
            except MessageError:
                continue
            if isinstance(message, ScoredGroup) and message.group_id == group_id:
                return message
    finally:
        r.close()
    return None


def check_refused_clients(loop: LoopRun) -> dict[str, str]:
    """A client without the password is refused, and the run's read-only user (broker/acl.py) may read, not write."""
    out = {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLQ_REDIS_")}
    cli = subprocess.run(
        [sys.executable, "-m", "rlq", "queues", "--broker", loop.url, "--run", loop.run_name],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 2, cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1, cli.stderr
    out["no_password"] = cli.stderr.strip()
    narrow = redis.Redis(port=loop.server.port, username=INSPECT, password=password_for(SECRET, INSPECT))
    try:
        narrow.xlen(loop.keys.prompts)  # allowed: reading
        try:
            narrow.xadd(loop.keys.prompts, {"m": b"x"})
        except redis.exceptions.NoPermissionError as exc:
            out["narrow_acl"] = str(exc)
        else:
            raise AssertionError("an ACL user without write rights could XADD to the prompt stream")
    finally:
        narrow.close()
    return out


def test_one_loop_many_faults(loop: LoopRun):
    """CI: malformed entries in both streams, a pickled Celery task, refused clients, a generation worker
    SIGKILLed holding a batch, and Redis stopped for 10 s, all in one 20-step run (enough steps that every fault
    lands before the end, also on a quiet machine: with 10, the run once ended before Redis was stopped, when a
    worker's re-join no longer waited for the next step's broadcast)."""
    loop.overrides += [f"grpo.max_num_steps={STEPS}", "++policy.generation.worker.claim_idle_ms=4000"]
    loop.start_all(generation_workers=2)
    loop.wait_step(1)
    victim = f"{loop.run_name}-gen-1"
    r = loop.client()

    # malformed msgpack into both live streams (the 100 MB string into the prompt stream only)
    gen0 = loop.roles["generate-0"].process.pid
    rss_before = rss_mb(gen0)
    injected = {}
    for name, payload in malformed_payloads("prompt_batch", "prompts", big=True).items():
        injected[r.xadd(loop.keys.prompts, {"m": payload}).decode()] = (loop.keys.prompts, f"prompts/{name}")
    for name, payload in malformed_payloads("scored_group", "verdicts", big=False).items():
        injected[r.xadd(loop.keys.scored, {"m": payload}).decode()] = (loop.keys.scored, f"scored/{name}")

    marker = str(loop.tmp / "pickle-was-executed")
    send_pickled_task(loop, marker)
    refused = check_refused_clients(loop)

    # answers math-verify cannot finish, sampled by version 0 while the learner is at 2 (max_staleness 1):
    # the judge times them out and goes on; the learner drops the group as stale and counts it
    loop.wait_step(2)
    patho_id = inject_group(loop, "pathological", [NESTED_POWER, X800, "Answer: 0"], policy_version=0)
    patho_at = time.monotonic()

    # SIGKILL generation worker 1 while it holds a batch
    loop.wait_for(lambda: pending_of(loop, victim) > 0, 300, f"{victim} to hold a batch")
    loop.kill("generate-1")
    killed_at = time.monotonic()
    step_at_kill = loop.step()
    loop.wait_for(lambda: pending_of(loop, victim) == 0, 300, "the killed worker's batch to be reclaimed")
    reclaim_s = time.monotonic() - killed_at

    # Redis stopped for 10 s
    loop.wait_step(step_at_kill + 1)
    step_at_stop = loop.step()
    loop.server.process.send_signal(signal.SIGSTOP)
    time.sleep(10)
    loop.server.process.send_signal(signal.SIGCONT)
    resumed_at = time.monotonic()
    loop.wait_step(step_at_stop + 1, timeout_s=300)
    redis_stop_recover_s = time.monotonic() - resumed_at

    loop.wait_for(lambda: scored_by_id(loop, patho_id) is not None, 300, "the pathological group's verdicts")
    patho_s = time.monotonic() - patho_at
    patho = scored_by_id(loop, patho_id)
    assert patho is not None and patho.verdicts == ["timeout", "timeout", "correct"], patho

    assert loop.wait_learner_exit(600) == 0, loop.describe()
    rss_after = rss_mb(gen0)
    loop.drain()
    verdict = Ledger(loop).classify()

    letters = {}
    for _, fields in r.xrange(loop.keys.dead):
        letter = decode(fields[b"m"])
        assert isinstance(letter, DeadLetter)
        letters[letter.entry_id] = letter
    r.close()
    for entry_id, (stream, name) in injected.items():
        assert entry_id in letters, f"{name} in {stream} was not dead-lettered"
        assert letters[entry_id].source_stream == stream and letters[entry_id].reason, name
    assert loop.alive("generate-0") and loop.alive("judge"), loop.describe()
    assert rss_after - rss_before < 400, f"generation worker RSS grew {rss_before:.0f} -> {rss_after:.0f} MB"
    assert not os.path.exists(marker), "the judge unpickled a message"
    judge_log = loop.roles["judge"].log_path.read_text(errors="replace")
    assert "pickle" in judge_log and "untrusted" in judge_log.lower(), "the judge did not refuse the pickle"

    assert patho_id in verdict.dropped.get("stale", []), "the stale group was not dropped and counted"
    summary = verdict.summary()
    record("short", **summary, reclaim_s=round(reclaim_s, 1), redis_stop_recover_s=round(redis_stop_recover_s, 1),
           pathological_scored_s=round(patho_s, 1), pathological_verify_s=round(patho.timings.get("verify_s", -1), 1),
           dead_letters={n: letters[i].reason[:120] for i, (_, n) in injected.items()}, refused=refused,
           rss_mb=[round(rss_before), round(rss_after)], steps=loop.step())  # fmt: skip
    assert not verdict.lost, f"lost groups: {verdict.lost[:10]}"
    assert not verdict.duplicated and not verdict.scored_twice, summary
    assert len(verdict.trained_once) == STEPS * 8, summary
