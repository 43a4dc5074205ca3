"""Capacity-aware pulls against a real redis-server: two generation workers, one three times slower (its
`injected_delay_per_token_s`), take reads in proportion to their measured throughput from the same stream."""

from __future__ import annotations

import threading
import time

import pytest

from broker.connection import connect
from broker.keys import Keys
from broker.schemas import Array, Prompt, PromptBatch, WeightAnnouncement
from broker.streams import StreamProducer
from workers.generate.config import GenerationConfig
from workers.generate.engines import Completion, Engine, SyncStats
from workers.generate.sinks import StreamSink, rollout_stream
from workers.generate.worker import CONSUMER_GROUP, GenerationWorker

TOKENS = 4  # per completion
TOKEN_S = 0.002  # the engine's own time per token
N_SAMPLES = 2


class SleepyEngine(Engine):
    """Takes TOKEN_S per generated token, like a sampler whose cost grows with the work."""

    def generate(self, prompts: list[list[int]], n: int, seeds: list[int]) -> list[list[Completion]]:
        time.sleep(len(prompts) * n * TOKENS * TOKEN_S)
        return [[Completion([7] * TOKENS, [-0.5] * TOKENS, "length") for _ in range(n)] for _ in prompts]

    def update_weights(self, ann: WeightAnnouncement) -> SyncStats:
        return SyncStats()

    def load_file(self, path: str) -> SyncStats:
        return SyncStats()


def _cfg(delay: float) -> GenerationConfig:
    return GenerationConfig.model_validate(
        {"worker": {"sink": "stream", "read_block_ms": 20, "heartbeat_s": 0.1, "heartbeat_ttl_s": 5,
                    "injected_delay_per_token_s": delay, "pull": {"fleet_refresh_s": 0.1}}}
    )  # fmt: skip


def _batch(i: int) -> PromptBatch:
    prompts = [Prompt(prompt_id=f"p{i}-{j}", token_ids=Array.from_numpy([1, 2, 3], "int32"), ground_truth="1")
               for j in range(4)]  # fmt: skip
    return PromptBatch(batch_id=f"b{i:05d}", prompts=prompts, n_samples=N_SAMPLES)


def _feed(redis_url: str, run: str, rounds: int, stop: threading.Event) -> None:
    """A feeder's rhythm: a round of four messages whenever the workers have taken the last one."""
    r = connect(redis_url)
    producer, keys = StreamProducer(r, Keys(run).prompts), Keys(run)
    for round_ in range(rounds):
        producer.add_many([_batch(round_ * 4 + k) for k in range(4)])
        while not stop.is_set():
            lag = next((g.get("lag") for g in r.xinfo_groups(keys.prompts) if g["name"] == CONSUMER_GROUP.encode()), 1)
            if not lag:
                break
            time.sleep(0.005)


@pytest.mark.slow
def test_reads_follow_the_workers_throughput(redis_url: str, run_name: str) -> None:
    r = connect(redis_url)
    reads: dict[str, list[int]] = {"fast": [], "slow": []}
    workers = {}
    for name, delay in (("fast", 0.0), ("slow", 2 * TOKEN_S)):  # 3x the time per token: a third of the speed
        sink = StreamSink(r, rollout_stream(run_name))
        worker = GenerationWorker(_cfg(delay), run=run_name, broker_url=redis_url, worker_id=name, model_name="x",
                                  sink=sink, engine=SleepyEngine(_cfg(delay), name))  # fmt: skip
        handle_many = worker.handle_many

        def record(deliveries, _name=name, _handle=handle_many):
            reads[_name].append(len(deliveries))
            return _handle(deliveries)

        worker.handle_many = record  # type: ignore[method-assign]
        workers[name] = worker
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers.values()]
    for t in threads:
        t.start()
    stop = threading.Event()
    try:
        _feed(redis_url, run_name, rounds=30, stop=stop)
    finally:
        stop.set()
        for w in workers.values():
            w.request_stop()
        for t in threads:
            t.join(timeout=30)
    taken = {k: sum(v) for k, v in reads.items()}
    assert taken["fast"] + taken["slow"] == 30 * 4
    # Measured throughputs settle within a few reads; after that the fast worker takes ~3 of every 4 messages.
    # The share is counted in messages, not per read: how a worker's share splits into reads depends on when it
    # wakes relative to the feeder (a fast worker may take 2, then 1, of the same round), which the machine's load
    # decides, so a mean read size is not a property of the sizing.
    late = {k: v[len(v) // 2 :] for k, v in reads.items()}
    assert taken["fast"] >= 2 * taken["slow"], reads
    assert max(late["fast"]) >= 2 and sum(late["fast"]) >= 2 * sum(late["slow"]), reads
    assert workers["fast"].throughput > 2 * workers["slow"].throughput
