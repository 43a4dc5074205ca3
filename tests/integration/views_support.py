"""A run's Redis and run directory populated the way the roles write them, for the live views and metrics tests."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from broker.connection import connect
from broker.judge_queue import base_app, submit_group
from broker.keys import Keys
from broker.policy import PolicyHash
from broker.registry import Registry
from broker.schemas import Array, Prompt, PromptBatch, RolloutGroup, Sample, WorkerHeartbeat
from broker.streams import StreamConsumer, StreamProducer
from learner.metrics import JsonlLogger


@dataclass
class Run:
    url: str
    keys: Keys
    run_dir: Path
    config: Path


def _batch(i: int) -> PromptBatch:
    prompt = Prompt(prompt_id=f"p{i}", token_ids=Array.from_numpy(np.arange(5), "int32"), ground_truth="1")
    return PromptBatch(batch_id=f"b{i}", prompts=[prompt], n_samples=2)


def _group(i: int) -> RolloutGroup:
    sample = Sample(token_ids=Array.from_numpy([5, 9], "int32"), logprobs=Array.from_numpy([-0.5, -1.0], "float32"),
                    finish_reason="stop")  # fmt: skip
    prompt = Prompt(prompt_id=f"p{i}", token_ids=Array.from_numpy([1, 2], "int32"), ground_truth="1")
    return RolloutGroup(group_id=f"p{i}@b0", batch_id="b0", prompt=prompt, samples=[sample], policy_version=3,
                        worker_id="gen-0")  # fmt: skip


def run_config(path: Path, url: str, run: str, run_dir: Path) -> Path:
    tree = {"run_name": run, "broker": {"url": url}, "policy": {"model_name": "unused"}, "data": {"path": "unused"},
            "logger": {"log_dir": str(run_dir), "wandb_enabled": False}}  # fmt: skip
    path.write_text(yaml.safe_dump(tree))
    return path


def write_run_dir(run_dir: Path) -> None:
    """Three steps and a validation pass through the learner's own logger; three restarts as the supervisor logs."""
    metrics = JsonlLogger(run_dir)
    for step in (1, 2, 3):
        metrics.log(step, {"rollout/reward_mean": 0.25 * step, "rollout/staleness_mean": 0.5,
                           "rollout/staleness_max": 1.0, "sync/broadcast_s": 0.125, "perf/step_s": 1.5,
                           "perf/tokens_per_s": 640.0})  # fmt: skip
    metrics.log(3, {"val/accuracy": 0.625, "val/policy_version": 3.0})
    metrics.close()
    with open(run_dir / "events.jsonl", "a") as fh:
        for i, role in enumerate(["generate-0", "generate-0", "judge"]):
            fh.write(json.dumps({"time": time.time(), "role": role, "cause": "killed by SIGKILL: -", "restart": i + 1,
                                 "backoff_s": 1.0}) + "\n")  # fmt: skip


@contextlib.contextmanager
def populated_run(redis_url: str, run_name: str, tmp_path: Path) -> Iterator[Run]:
    """4 prompt batches (2 pending on gen-0, 1 unread, 1 dead-lettered), an alive generation worker at version 3
    and a dead judge, the policy at version 3, 3 judge tasks (1 delivered and unacknowledged), 3 steps, a
    validation pass and 3 restarts in the run directory."""
    r = connect(redis_url)
    keys = Keys(run_name)
    StreamProducer(r, keys.prompts).add_many([_batch(i) for i in range(4)])
    gen = StreamConsumer(r, keys.prompts, "generate", "gen-0", dead_stream=keys.dead)
    gen.ensure_group()
    first, *_ = gen.read(count=3, block_ms=0)
    gen.dead_letter(first, "engine failed")  # 2 stay pending, 1 unread, 1 dead letter
    registry = Registry(r, keys)
    registry.heartbeat(WorkerHeartbeat(worker_id="gen-0", role="generate", accelerator="cpu", capacity=8,
                                       policy_version=3, status="busy", throughput=123.4), ttl_s=60)  # fmt: skip
    registry.heartbeat(WorkerHeartbeat(worker_id="judge-old", role="judge", sent_at=time.time() - 50), ttl_s=0.001)
    PolicyHash(r, keys).set_version(3, at=time.time())
    app = base_app(redis_url, run_name)
    for i in range(3):
        submit_group(app, run_name, _group(i))
    # A consumer takes one task without acknowledging it (what a judge's prefetch does); the connection stays open,
    # since kombu puts unacknowledged messages back when a channel closes.
    with app.connection_for_read() as conn:
        assert conn.default_channel.basic_get(keys.judge_queue, no_ack=False) is not None
        run_dir = tmp_path / "run"
        write_run_dir(run_dir)
        yield Run(redis_url, keys, run_dir, run_config(tmp_path / "run.yaml", redis_url, run_name, run_dir))
    app.close()
    r.close()
