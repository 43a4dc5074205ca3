"""The generation role: prompt batches in, rollout groups out, weights updated live between batches.

Loop: take PromptBatches from the prompts stream (consumer group `generate`; entries a dead worker left pending
are reclaimed by the broker layer), as many per read as this worker's share of the fleet's throughput says
(workers/generate/pull.py, `worker.pull`), wait until the weights are at least their `min_policy_version`,
sample `n_samples` completions per prompt with their behaviour logprobs in one engine call, tag every group with
the policy version that produced it, hand the groups to the judges (`RolloutSink`) and only then acknowledge
the batches.

Between batches the worker reads the latest WeightAnnouncement from the policy hash: as a member of its epoch
it takes part in the broadcast; otherwise it writes a join request and is admitted when the learner forms the
group again (docs/weight_sync.md). A heartbeat thread keeps the registry entry (capacity, version, status,
throughput) fresh even while a long batch or a sync runs. SIGTERM finishes the batch in hand, then stops; a
batch still waiting for weights is released to the other workers instead.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import redis

from broker.connection import connect
from broker.errors import EngineStateLost
from broker.keys import Keys
from broker.policy import PolicyHash, checkpoint_model_dir, checkpoint_version
from broker.registry import Registry
from broker.schemas import (
    JoinRequest,
    PromptBatch,
    WeightAnnouncement,
    WorkerHeartbeat,
)
from broker.streams import Delivery, StreamConsumer
from broker.trim import ROLE_KEEP_ACKED
from workers.generate.batches import build_groups, generate_batches
from workers.generate.config import GenerationConfig
from workers.generate.engines import Engine
from workers.generate.factory import make_engine
from workers.generate.pull import PullSizer
from workers.generate.sinks import CelerySink, RolloutSink, StreamSink, rollout_stream

log = logging.getLogger(__name__)

CONSUMER_GROUP = "generate"
THROUGHPUT_EMA = 0.3
SHARED_LOAD_TRIES = 50
"""Loads of shared buffers the learner rewrote meanwhile before giving up (it rewrites them once a step, and a
load takes milliseconds: more than one retry in a row means something else is wrong)."""


def starting_weights(policy: PolicyHash, fallback: str) -> tuple[str, int]:
    """(model directory, version) a new worker starts from: the learner's latest checkpoint, else `fallback`."""
    checkpoint = policy.checkpoint()
    if checkpoint:
        model_dir = checkpoint_model_dir(checkpoint)
        if (Path(model_dir) / "config.json").exists():
            return model_dir, checkpoint_version(model_dir)
    return fallback, 0


class GenerationWorker:
    """One generation worker process: engine, stream consumer, weight sync and heartbeat."""

    def __init__(
        self,
        cfg: GenerationConfig,
        *,
        run: str,
        broker_url: str,
        worker_id: str,
        model_name: str,
        sink: RolloutSink | None = None,
        engine: Engine | None = None,
        trim_acked: bool = True,
    ) -> None:
        self.cfg = cfg
        self.rt = cfg.worker
        self.worker_id = worker_id
        self.keys = Keys(run)
        self.r = connect(broker_url, client_name=f"rlq-generate-{worker_id}")
        self.policy = PolicyHash(self.r, self.keys)
        self.registry = Registry(self.r, self.keys)
        self.status = "starting"
        self.version = 0
        self.throughput = 0.0
        self.capacity = cfg.worker.capacity  # prompts the last read took (the configured figure before the first)
        self.stopping = threading.Event()
        self._beat_stop = threading.Event()
        self._handled: tuple[int, int] | None = None  # (epoch, version) of the last announcement acted on
        self._join_asked: int | None = None  # epoch of the announcement that prompted the last join request
        self._beat()
        self._beater = threading.Thread(target=self._beat_loop, name="heartbeat", daemon=True)
        self._beater.start()
        self._owns_engine = engine is None  # an engine passed in (tests, bench) outlives the worker
        self.process_exits_after_run = False  # the role's entry point sets it: the engine's teardown can be skipped
        self.engine = engine or self._start_engine(model_name)
        self.device = self.engine.device_id()  # told to the learner when asking to join
        self.sink = sink or CelerySink(broker_url, run)
        self.consumer = StreamConsumer(
            self.r, self.keys.prompts, CONSUMER_GROUP, worker_id, expected=PromptBatch, dead_stream=self.keys.dead,
            max_deliveries=self.rt.max_deliveries, claim_idle_ms=self.rt.claim_idle_ms, block_ms=self.rt.read_block_ms,
            trim_keep_acked=ROLE_KEEP_ACKED if trim_acked else None,
        )  # fmt: skip
        self.consumer.ensure_group()
        self.sizer = PullSizer(self.rt.pull, worker_id, self._fleet, self.consumer.waiting)
        self.status = "idle"

    def _start_engine(self, model_name: str, tries: int = 3) -> Engine:
        """Load the learner's latest checkpoint (else `model_name`). The learner prunes old checkpoints, so the
        one we picked can vanish while we load it (seen in tests/faults with a checkpoint every step): then pick
        again."""
        for attempt in range(tries):
            path, self.version = starting_weights(self.policy, model_name)
            log.info("%s starts from %s (policy version %d)", self.worker_id, path, self.version)
            try:
                return make_engine(self.cfg, self.worker_id, path)
            except Exception:  # transformers says OSError, vLLM may say something else: the directory decides
                if path == model_name or Path(path).is_dir() or attempt == tries - 1:
                    raise
                log.warning("checkpoint %s was pruned while loading; taking the latest one", path)
        raise AssertionError("unreachable")

    # --- the loop -------------------------------------------------------------------------------------------

    def run(self, max_batches: int | None = None) -> int:
        """Serve batches until stopped (or `max_batches` done); returns the number of batches handled."""
        done = 0
        try:
            while not self.stopping.is_set() and (max_batches is None or done < max_batches):
                self.sync()
                left = None if max_batches is None else max_batches - done
                done += self.handle_many(self._take(left))
        finally:
            self.close()
        return done

    def _take(self, left: int | None) -> list[Delivery]:
        """One read sized by this worker's share of the fleet (workers/generate/pull.py), at most `left` batches.

        A read that blocked and woke on the feeder's first message tops itself up (without blocking) to its share
        of the messages that arrived with it, so they go through one engine call."""
        count = self.sizer.count(self.throughput)
        deliveries = self.consumer.read(count=count if left is None else min(count, left))
        more = self.sizer.count(self.throughput, taken=len(deliveries)) if deliveries else 0
        if left is not None:
            more = min(more, left - len(deliveries))
        if more > 0:
            deliveries += self.consumer.read(count=more, block_ms=0)
        return deliveries

    def handle(self, delivery: Delivery) -> int:
        """Generate one batch and hand it on; returns 1 if handled, 0 if released or dead-lettered."""
        return self.handle_many([delivery])

    def handle_many(self, deliveries: list[Delivery]) -> int:
        """Generate the batches of one read (one engine call per sample count) and hand them on; returns how many
        were handled (the others were released or dead-lettered)."""
        batches: list[tuple[Delivery, PromptBatch]] = []
        for delivery in deliveries:
            assert isinstance(delivery.message, PromptBatch)
            problem = self._check(delivery.message)
            if problem:
                self.consumer.dead_letter(delivery, problem)
            else:
                batches.append((delivery, delivery.message))
        if not batches:
            return 0
        if not self._wait_for_version(max(b.min_policy_version for _, b in batches)):
            self.consumer.release([d.entry_id for d, _ in batches])  # another worker (or this one later) takes them
            return 0
        self.status = "busy"
        t0 = time.perf_counter()
        version = self.version  # weights never change inside a read: updates happen between reads only
        completions = generate_batches(self.engine, [b for _, b in batches], self.cfg.vllm_cfg.seed)
        tokens = sum(len(c.token_ids) for per_batch in completions for comps in per_batch for c in comps)
        if self.rt.injected_delay_per_token_s:  # bench/test only: a slower accelerator (config.py)
            time.sleep(tokens * self.rt.injected_delay_per_token_s)
        generate_s = time.perf_counter() - t0
        groups = []
        for (_, batch), comps in zip(batches, completions, strict=True):
            timings = {"queue_wait_s": max(0.0, time.time() - batch.created_at - generate_s), "generate_s": generate_s}
            for g in build_groups(batch, comps, version, self.worker_id, self.cfg.temperature):
                g.timings.update(timings)
                groups.append(g)
        self.sink.submit(groups)
        self.consumer.ack([d.entry_id for d, _ in batches])  # after the hand-off: a crash re-delivers them
        self._observe(tokens / max(generate_s, 1e-9))
        self.capacity = len(groups)  # advertised: the prompts this read took
        self.status = "idle"
        # The batch ids name what this worker generated, so a log shows which batches were reclaimed and run twice.
        log.info("read of %d batches (%s) %s: %d groups, %d tokens in %.2fs at v%d (fleet share %.2f)", len(batches),
                 ",".join(sorted({b.purpose for _, b in batches})), " ".join(f"batch {b.batch_id}" for _, b in batches),
                 len(groups), tokens, generate_s, version, self.sizer.share)  # fmt: skip
        return len(batches)

    def _check(self, batch: PromptBatch) -> str:
        limit = self.cfg.vllm_cfg.max_model_len - 1
        long = [p.prompt_id for p in batch.prompts if len(p.token_ids) > limit]
        if long:
            return f"prompts longer than max_model_len - 1 = {limit} tokens: {', '.join(long[:5])}"
        return ""

    def _wait_for_version(self, wanted: int) -> bool:
        deadline = time.monotonic() + self.rt.min_version_wait_s
        while self.version < wanted:
            if self.stopping.is_set() or time.monotonic() > deadline:
                log.warning("holding v%d, batch wants v%d: releasing it", self.version, wanted)
                return False
            self.status = "syncing"
            if not self.sync():
                time.sleep(0.01)  # one HGET: polling often keeps the refit-to-sampling gap short
        return True

    # --- weights --------------------------------------------------------------------------------------------

    def sync(self) -> bool:
        """Act on the latest announcement: take part in its broadcast, or ask to join. True if weights changed."""
        ann = self.policy.announcement()
        if ann is None:
            self._ask_to_join(-1)
            return False
        if (ann.epoch, ann.version) == self._handled:
            return False
        if ann.backend == "filesystem":
            return ann.version > self.version and self._update(ann)
        if self.worker_id in ann.members or self.worker_id in ann.shared_members:
            return self._update(ann)
        self._ask_to_join(ann.epoch)
        return False

    def _update(self, ann: WeightAnnouncement) -> bool:
        self._handled = (ann.epoch, ann.version)
        self.status = "syncing"
        t0 = time.perf_counter()
        try:
            if self.worker_id in ann.shared_members:
                stats, ann = self._load_shared(ann)
                self._handled = (ann.epoch, ann.version)
            else:
                stats = self.engine.update_weights(ann)
        except EngineStateLost:
            raise  # its weights are neither version: stop rather than label rollouts with the wrong one
        except Exception as exc:  # WeightSyncError, or the engine's RPC failing: keep the old weights
            log.error("weight update v%d failed after %.1fs, keeping v%d and re-joining: %s",
                      ann.version, time.perf_counter() - t0, self.version, exc)  # fmt: skip
            self._join_asked = None
            self._ask_to_join(ann.epoch)
            return False
        finally:
            self.status = "idle"
        self.version = ann.version
        self.policy.mark_synced(self.worker_id, ann.version)
        self._beat()
        log.info("weights v%d loaded (receive %.3fs, load %.3fs, epoch %d, %.3fs after the announcement)",
                 ann.version, stats.receive_s, stats.load_s, ann.epoch, time.time() - ann.created_at)  # fmt: skip
        return True

    def _load_shared(self, ann: WeightAnnouncement) -> tuple[Any, WeightAnnouncement]:
        """Load from the learner's shared buffers under its seqlock: a load that overlapped a rewrite (the sequence
        moved) is done again from the newer announcement. Returns the stats and the announcement loaded."""
        loaded = False
        for attempt in range(SHARED_LOAD_TRIES):
            assert ann.shared is not None
            if self.policy.shared_seq() == ann.shared.seq:
                stats = self.engine.update_weights(ann)
                loaded = True
                if self.policy.shared_seq() == ann.shared.seq:
                    return stats, ann
            time.sleep(min(0.001 * 2**attempt, 0.2))  # the learner is writing: its copy takes milliseconds
            newer = self.policy.announcement()
            if newer is not None and newer.shared is not None and self.worker_id in newer.shared_members:
                ann = newer
        if loaded:  # the live weights may mix two versions: sampling from them would mislabel every rollout
            raise EngineStateLost(f"shared weights kept changing during {SHARED_LOAD_TRIES} loads")
        raise RuntimeError(f"the learner's shared weights did not settle within {SHARED_LOAD_TRIES} tries")

    def _ask_to_join(self, epoch: int) -> None:
        if self._join_asked == epoch:
            return
        self._join_asked = epoch
        request = JoinRequest(worker_id=self.worker_id, device=self.device)
        self.policy.ask_to_join(request)
        log.info("asked to join the weight group (latest epoch seen: %d)", epoch)

    # --- liveness -------------------------------------------------------------------------------------------

    def _observe(self, tokens_per_s: float) -> None:
        a = THROUGHPUT_EMA
        self.throughput = tokens_per_s if self.throughput == 0 else a * tokens_per_s + (1 - a) * self.throughput

    def _fleet(self) -> list[tuple[str, float]]:
        """(worker id, tokens/s) of the alive generation workers, from their heartbeats."""
        return [(b.worker_id, b.throughput) for b in self.registry.alive("generate")]

    def _beat(self) -> None:
        beat = WorkerHeartbeat(
            worker_id=self.worker_id, role="generate", accelerator=_accelerator(), capacity=self.capacity,
            policy_version=self.version, status=self.status, throughput=self.throughput,
        )  # fmt: skip
        self.registry.heartbeat(beat, ttl_s=self.rt.heartbeat_ttl_s)

    def _beat_loop(self) -> None:
        while not self._beat_stop.wait(self.rt.heartbeat_s):
            try:
                self._beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def request_stop(self, *_: Any) -> None:
        """SIGTERM/SIGINT: finish the batch in hand, then stop."""
        log.warning("stop requested: finishing the batch in hand")
        self.stopping.set()

    def close(self) -> None:
        self.status = "stopping"
        self._beat_stop.set()
        try:
            self.registry.remove(self.worker_id)
            self.policy.forget(self.worker_id)
        except redis.RedisError as exc:
            log.warning("could not deregister: %s", exc)
        if self._owns_engine:
            self.engine.close(process_exiting=self.process_exits_after_run)


def _accelerator() -> str:
    """ "cuda:<name>" or "cpu", without creating a CUDA context in this process: a vLLM engine started after it sizes
    its memory from what is free (device_count and NVML read no context)."""
    try:
        import torch
    except ImportError:
        return "cpu"
    if torch.cuda.device_count() == 0:
        return "cpu"
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        handle = (pynvml.nvmlDeviceGetHandleByUUID(visible) if visible.startswith(("GPU-", "MIG-"))
                  else pynvml.nvmlDeviceGetHandleByIndex(int(visible)))  # fmt: skip
        name = pynvml.nvmlDeviceGetName(handle)
        return f"cuda:{name.decode() if isinstance(name, bytes) else name}"
    except Exception:  # NVML missing or the id unknown: the kind is still right
        return "cuda"


def run(
    cfg: GenerationConfig,
    *,
    run: str,
    broker_url: str,
    worker_id: str,
    model_name: str,
    max_batches: int | None = None,
    trim_acked: bool = True,
) -> int:
    """The role's entry point: build the worker, stop cleanly on SIGTERM/SIGINT, serve until stopped."""
    sink: RolloutSink | None = None
    if cfg.worker.sink == "stream":
        sink = StreamSink(connect(broker_url), rollout_stream(run))
    worker = GenerationWorker(
        cfg, run=run, broker_url=broker_url, worker_id=worker_id, model_name=model_name, sink=sink,
        trim_acked=trim_acked,
    )  # fmt: skip
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, worker.request_stop)
    worker.process_exits_after_run = True
    return worker.run(max_batches)
