"""Worker lifecycle without vLLM (transformers backend): re-joining after a failed update, SIGTERM mid-batch.

The behaviour under test is the role's (workers/generate/worker.py), which is the same for both backends; using the
transformers backend keeps the vLLM engine count on this machine at one (test_generate.py holds it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from broker.connection import connect
from broker.keys import POLICY_JOIN_PREFIX, Keys
from broker.registry import Registry
from broker.schemas import Array, Prompt, PromptBatch, RolloutGroup, decode
from broker.streams import PAYLOAD_FIELD, StreamProducer
from learner.broadcast import CollectiveBroadcast
from workers.generate.config import GenerationConfig
from workers.generate.engines import HFEngine
from workers.generate.sinks import StreamSink, rollout_stream
from workers.generate.worker import GenerationWorker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir) -> Path:
    """The session's untrained tiny Qwen3 + tokenizer (tests/conftest.py)."""
    return Path(tiny_model_dir)


def _wait(predicate, timeout_s: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_failed_update_keeps_the_weights_and_the_worker_rejoins_at_the_next_epoch(
    tiny_dir: Path, redis_url: str, run_name: str
) -> None:
    r = connect(redis_url)
    keys = Keys(run_name)
    cfg = GenerationConfig.model_validate({"backend": "hf", "max_new_tokens": 4, "worker": {"sink": "stream"}})
    engine = HFEngine(cfg, "hf-0", str(tiny_dir))
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    worker = GenerationWorker(
        cfg, run=run_name, broker_url=redis_url, worker_id="hf-0", model_name=str(tiny_dir),
        sink=StreamSink(r, rollout_stream(run_name)), engine=engine,
    )  # fmt: skip
    worker.sync()
    assert r.hexists(keys.policy, POLICY_JOIN_PREFIX + "hf-0")
    learner = CollectiveBroadcast(r, keys, master_addr="127.0.0.1", timeout_s=3)
    learner._update_membership()  # admits hf-0 ...
    learner._announce(learner._announcement(1, "gloo", []))  # ... announces, then hangs before the rendezvous
    t0 = time.monotonic()
    assert worker.sync() is False  # the rendezvous never completes: a clear error within the timeout
    assert time.monotonic() - t0 < 20
    assert worker.version == 0 and all(torch.equal(before[n], p) for n, p in engine.model.named_parameters())
    assert r.hexists(keys.policy, POLICY_JOIN_PREFIX + "hf-0")  # asked to join again
    # The learner's next broadcast re-forms the group under a new epoch and the worker takes part.
    model = engine.model.__class__.from_pretrained(tiny_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    epoch = learner.epoch
    syncer = threading.Thread(target=lambda: _wait(worker.sync, what="the re-joined sync"))
    syncer.start()
    report = learner.broadcast(model, version=2)
    syncer.join(60)
    assert report.epoch > epoch and report.members == ["hf-0"] and worker.version == 2
    assert all(torch.equal(dict(engine.model.named_parameters())[n], p) for n, p in model.named_parameters())
    worker.close()
    learner.close()


def test_sigterm_finishes_the_batch_in_hand_then_leaves(tiny_dir: Path, redis_url: str, run_name: str, tmp_path):
    r = connect(redis_url)
    keys = Keys(run_name)
    config = {
        "run_name": run_name,
        "broker": {"url": redis_url},
        "policy": {"model_name": str(tiny_dir), "generation": {"backend": "hf", "max_new_tokens": 200,
                   "worker": {"sink": "stream", "read_block_ms": 200, "heartbeat_s": 0.5}}},
        "data": {"path": str(tmp_path / "unused.jsonl")},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "rlq", "worker", "generate", "-c", str(tmp_path / "run.yaml"), "--worker-id", "w"]
    with open(tmp_path / "worker.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": "."})
        try:
            _wait(lambda: any(b.status == "idle" for b in Registry(r, keys).alive("generate")), what="the worker")
            prompts = [Prompt(prompt_id=f"p{j}", token_ids=Array.from_numpy([5, 6, 7 + j], "int32"), ground_truth="1")
                       for j in range(4)]  # fmt: skip
            StreamProducer(r, keys.prompts).add(PromptBatch(batch_id="b0", prompts=prompts, n_samples=16))
            _wait(lambda: r.xpending(keys.prompts, "generate")["pending"] == 1, what="the worker to take the batch")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(120) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    groups = [decode(f[PAYLOAD_FIELD], RolloutGroup) for _, f in r.xrange(rollout_stream(run_name))]
    assert sorted(g.group_id for g in groups) == [f"p{j}@b0" for j in range(4)]  # type: ignore[union-attr]
    assert r.xpending(keys.prompts, "generate")["pending"] == 0  # finished and acknowledged, not abandoned
    assert not Registry(r, keys).workers("generate")  # deregistered on the way out
