"""Rank 0's side of the learner loop (learner/train.py): the `Coordinator`.

It holds everything only rank 0 talks to: Redis (prompt and scored streams, the policy hash), the feeder and
collector (learner/batch.py), the ledger, metrics, validation, the weight transport (learner/broadcast.py) and
checkpoints. It cuts each step's batch into rank shares; the other ranks never build one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from broker.keys import Keys
from broker.policy import PolicyHash
from broker.schemas import ScoredGroup
from learner.admission import JudgeAdmission
from learner.batch import assemble, group_to_samples, rollout_metrics
from learner.checkpoint import Ledger, save_checkpoint
from learner.checkpoint_select import Retention, record_validation, retention
from learner.config import LearnerConfig
from learner.metrics import ConsoleSummary, JsonlLogger, MultiLogger
from learner.rollout_io import Collector, Feeder
from learner.rollout_log import open_rollout_log

log = logging.getLogger(__name__)

SCORED_GROUP = "learner"
"""Consumer group of the learner on the scored stream."""
SCORED_CONSUMER = "learner-0"
"""Stable consumer name: a restarted learner finds its own pending entries under it."""
NEVER_RECLAIM_MS = 7 * 24 * 3600 * 1000
"""Our pending entries wait for the next checkpoint, not for a timeout (we are the only consumer)."""
MAX_DELIVERIES = 100
"""Every restart re-delivers the pending entries once; only a message that keeps failing should die."""
JOIN_OFFER_EVERY_S = 1.0
"""How often a learner waiting for data looks for workers asking to join (one HKEYS on the policy hash)."""


class Coordinator:
    """Rank 0's side of the loop: Redis, the feeder/collector, ledger, metrics, weight sync, checkpoints."""

    def __init__(self, cfg: LearnerConfig, tokenizer) -> None:
        from broker.connection import connect
        from broker.streams import StreamConsumer, publish_all_once, publish_once
        from broker.trim import ROLE_KEEP_ACKED
        from learner.data_source import prompt_source

        self.cfg = cfg
        self.keys = Keys(cfg.learner.run)
        self.redis = connect(cfg.learner.broker_url, client_name="rlq-learner")
        self.policy = PolicyHash(self.redis, self.keys)
        prompt_at, n = prompt_source(cfg, tokenizer)
        tuning = cfg.learner.admission
        self.admission = JudgeAdmission(tuning, cfg.grpo.num_prompts_per_step, self._judge_queue)
        feeder = Feeder(
            lambda items: publish_all_once(self.redis, self.keys.prompts, items),
            prompt_at,
            n,
            cfg.grpo,
            run=cfg.learner.run,
            shuffle=cfg.data.shuffle,
            max_prompt_tokens=cfg.policy.max_total_sequence_length,
            message_prompts=tuning.pull_unit_prompts,
            admission=self.admission,
        )
        consumer = StreamConsumer(
            self.redis,
            self.keys.scored,
            SCORED_GROUP,
            SCORED_CONSUMER,
            expected=ScoredGroup,
            dead_stream=self.keys.dead,
            max_deliveries=MAX_DELIVERIES,
            claim_idle_ms=NEVER_RECLAIM_MS,
            block_ms=cfg.learner.read_block_ms,
            # Untrimmed, Redis keeps every rollout the run ever trained on.
            trim_keep_acked=ROLE_KEEP_ACKED if cfg.learner.trim_acked else None,
        )
        consumer.ensure_group()
        self.consumer = consumer
        self.collector = Collector(consumer, feeder, cfg.grpo, read_block_ms=cfg.learner.read_block_ms)
        # Groups trained and dropped, as Parquet, written by a thread of its own (learner/rollout_log.py)
        self.rollout_log = open_rollout_log(cfg.learner.run_dir, cfg.learner.rollout_log, cfg.grpo)
        if self.rollout_log is not None:
            self.collector.on_drop = self.rollout_log.dropped
        self.ledger = Ledger(cfg.learner.run_dir)
        self.metrics = MultiLogger(JsonlLogger(cfg.learner.run_dir), ConsoleSummary())
        self.tokenizer = tokenizer
        self.weights = _weight_sync(cfg, self.redis)
        self._offered_at = -float("inf")  # the last look for join requests while waiting (offer_to_joiners)
        self.current_weights: Callable[[], Any] | None = None  # set by learner.train._loop
        self.last_saved = -1
        self.validator = None
        if cfg.grpo.validates:
            from learner.data_source import validation_prompts
            from learner.validation import Validator

            self.validator = Validator(
                lambda key, msg: publish_once(self.redis, self.keys.prompts, key, msg),
                validation_prompts(cfg, tokenizer),
                cfg.grpo,
                run=cfg.learner.run,
            )

    def _judge_queue(self) -> tuple[int, int]:
        """(tasks waiting, tasks delivered and unacknowledged) of the judges' Celery queue, read from Redis."""
        from broker.celery_inspect import judge_queue_report

        report = judge_queue_report(self.redis, self.keys)
        return int(report["depth"]), int(report["unacked"])

    def restore(self, state: dict, pending: bytes) -> None:
        self.collector.restore({**state["collector"], "buffer": pending})
        self.last_saved = int(state["version"])
        moved = self.ledger.rewind(state["version"])
        log.info("resumed at version %d; %d ledger steps after it moved aside", state["version"], moved)

    def recover(self, version: int) -> None:
        """Re-read the scored entries this consumer left pending (read after the last checkpoint)."""
        pending = self.redis.xpending(self.keys.scored, SCORED_GROUP)["pending"]
        taken = self.collector.recover(int(pending), version)
        if taken:
            log.info("took back %d scored groups read but not covered by a checkpoint", taken)

    def prepare(self, version: int, world_size: int, should_stop) -> tuple[list[dict], dict, float] | None:
        """Collect the step's groups and cut them into per-rank payloads (None: asked to stop meanwhile)."""
        on_idle = lambda: self.offer_to_joiners(version)  # noqa: E731
        result = self.collector.collect(version, timeout_s=self.cfg.learner.data_timeout_s, should_stop=should_stop,
                                        on_idle=on_idle)  # fmt: skip
        if result is None:
            return None
        samples = [
            s
            for g in result.groups
            for s in group_to_samples(g, self.cfg.grpo, self.cfg.policy.max_total_sequence_length)
        ]
        skip_inert = self.cfg.policy.skip_zero_advantage and self.cfg.loss_fn.reference_policy_kl_penalty == 0
        shares = assemble(samples, world_size, self.cfg.policy.train_global_batch_size, skip_inert=skip_inert)
        info = {
            "groups": result.groups,
            "dropped": result.dropped,
            "metrics": {
                **rollout_metrics(result.groups, version),
                # samples with no gradient (their group's rewards agree): the learner skips them (skip_inert)
                "rollout/zero_advantage_fraction": sum(s.advantage == 0.0 for s in samples) / max(len(samples), 1),
            },
        }
        return [{"stop": False, "minibatches": s} for s in shares], info, result.wait_s

    def plan(self, version: int, last: bool) -> tuple[bool, bool]:
        """(broadcast the weights, checkpoint) after the update that produced `version`."""
        sync = self.weights is not None and (version % self.cfg.learner.weight_sync.period == 0 or last)
        ckpt = self.cfg.checkpointing
        # keep_top_k ranks checkpoints by their own version's validation: every validated version needs one
        ranked = ckpt.keep_top_k is not None and self.validator is not None and self.validator.due(version, last)
        return sync, ckpt.enabled and (version % ckpt.save_period == 0 or last or ranked)

    def finish(
        self,
        version: int,
        info: dict,
        metrics: dict[str, float],
        *,
        plan: tuple[bool, bool],
        model: torch.nn.Module | None,
        optimizer_state: dict | None,
        t_step: float,
        last: bool = False,
    ) -> None:
        """Everything after the update: weight sync, version, ledger, metrics, checkpoint + acks, validation."""
        t0 = time.perf_counter()
        if plan[0] and model is not None:
            metrics.update(self.sync_weights(version, model))
        sync_s = time.perf_counter() - t0
        self.policy.set_version(version, at=time.time())
        trained = [g.group_id for g in info["groups"]]
        self.ledger.append(version, trained, info["dropped"])
        if self.rollout_log is not None:  # enqueues and returns: the writer is a thread of its own
            metrics.update(self.rollout_log.trained(version, info["groups"]))
        t1 = time.perf_counter()
        ckpt = self.cfg.checkpointing
        if plan[1] and model is not None and optimizer_state is not None:
            self.save(version, model, optimizer_state)
        elif not ckpt.enabled:
            self.consumer.ack(self.collector.take_acks())
        dropped = {f"queue/dropped_{r}": float(len(ids)) for r, ids in info["dropped"].items()}
        self.admission.observe_step(metrics.get("queue/wait_s", 0.0))
        metrics.update(self.admission.metrics())
        metrics.update(info["metrics"])
        metrics.update(dropped)
        metrics.update(
            {
                "sync/broadcast_s": sync_s,
                "perf/checkpoint_s": time.perf_counter() - t1,
                "perf/step_s": time.perf_counter() - t_step,
                "queue/in_flight": float(self.collector.feeder.in_flight),
                "queue/buffered": float(len(self.collector.buffer)),
                "queue/data_cursor": float(self.collector.feeder.cursor),
                "queue/prompts_skipped_too_long": float(self.collector.feeder.skipped),
                "data/retired_passed_over": float(self.collector.feeder.retired_skips),
                **self.collector.feeder.solved.metrics(),
                "rollout/staleness_max": max(
                    (float(max(0, version - 1 - g.rollout.policy_version)) for g in info["groups"]), default=0.0
                ),
            }
        )
        self.metrics.log(version, metrics)
        if self.validator is not None:
            if self.validator.due(version, last):
                self.validator.start(version)  # after the sync: workers sample it with this version or newer
            self.log_validation(version)

    def start_validation(self, version: int) -> None:
        """Validate the starting policy (`grpo.val_at_start`), before the first step."""
        if self.validator is not None and self.validator.due(version):
            self.validator.start(version)

    def log_validation(self, version: int) -> None:
        """Hand the validation groups read so far to the validator; log the passes now complete."""
        assert self.validator is not None
        for group in self.collector.take_validation():
            self.validator.accept(group)
        for validated, metrics in self.validator.finished():
            log.info("validation of version %d: accuracy %.3f over %d samples", validated,
                     metrics["val/accuracy"], int(metrics["val/samples"]))  # fmt: skip
            self.metrics.log(version, metrics)
            if self.cfg.checkpointing.enabled and self.cfg.checkpointing.keep_top_k is not None:
                self._rank_checkpoint(validated, metrics)

    def finish_validation(self, version: int) -> None:
        """After the last step: wait for the passes still out, as long as their groups keep coming."""
        if self.validator is None:
            return
        from learner.validation import FINAL_WAIT_S

        timeout_s = min(self.cfg.learner.data_timeout_s, FINAL_WAIT_S)
        last_progress = time.monotonic()
        self.log_validation(version)
        while self.validator.outstanding:
            if time.monotonic() - last_progress > timeout_s:
                log.warning("gave up waiting for validation of versions %s after %.0f s without progress",
                            self.validator.outstanding, timeout_s)  # fmt: skip
                return
            val_ids = self.collector.poll(version, self.cfg.learner.read_block_ms)
            if val_ids:
                last_progress = time.monotonic()
                self.consumer.ack(val_ids)  # no checkpoint needs them; training groups stay pending for a resume
            else:
                self.offer_to_joiners(version)  # the final weights may have gone out before any worker joined
            self.log_validation(version)

    def offer_to_joiners(self, version: int) -> None:
        """While the learner waits for data, a worker that asks to join gets the current weights now, not at the next
        step's broadcast: that step (or the final validation) may need its groups (a sole worker restarted, or every
        worker after a resume, holds older weights than the prompts ask for, and nothing else would send them).
        `current_weights` (set by the train loop) gives the model at `version` without a collective, or None."""
        now = time.monotonic()
        if self.weights is None or self.current_weights is None or now - self._offered_at < JOIN_OFFER_EVERY_S:
            return
        self._offered_at = now
        if not self.policy.join_requested():
            return
        model = self.current_weights()
        if model is None:
            return
        log.info("a worker asked to join while the learner waits for data: weights v%d sent again", version)
        self.sync_weights(version, model)

    def sync_weights(self, version: int, model: torch.nn.Module) -> dict[str, float]:
        """Broadcast; a failed sync is logged and counted, and training goes on (workers keep older weights)."""
        from learner.broadcast import WeightSyncError

        source: torch.nn.Module | list[tuple[str, torch.Tensor]] = model
        policy = self.cfg.policy
        # Workers run in the compute dtype: float32 master weights go as a bfloat16 copy (half the bytes). Weights
        # already in it go as the model itself, which the broadcast lays out once and then sends without a copy.
        if policy.precision != policy.master_weights:
            dtype = getattr(torch, policy.precision)
            source = [(name, p.detach().to(dtype)) for name, p in model.named_parameters()]
        try:
            report = self.weights.broadcast(source, version)
        except WeightSyncError as exc:
            log.warning("%s", exc)
            return {"sync/failed": 1.0}
        return {**report.metrics(), "sync/failed": 0.0}

    def save(self, version: int, model: torch.nn.Module, optimizer_state: dict) -> None:
        if version == self.last_saved:
            return
        state = self.collector.state()
        pending = state.pop("buffer")
        path = save_checkpoint(
            Path(self.cfg.checkpointing.checkpoint_dir),
            version,
            model,
            self.tokenizer,
            optimizer_state,
            {"version": version, "collector": state},
            pending,
            retention=self._retention(),
            save_dtype=self.cfg.checkpointing.save_dtype,
        )
        acked = self.consumer.ack(self.collector.take_acks())
        self.last_saved = version
        self.policy.set_checkpoint(path)
        log.info("checkpoint %s written; %d scored entries acknowledged", path, acked)

    def _retention(self) -> Retention:
        """keep_last / keep_top_k, with the versions whose validation is still out (kept until it is in)."""
        return retention(self.cfg.checkpointing, self.validator.outstanding if self.validator is not None else ())

    def _rank_checkpoint(self, validated: int, metrics: dict[str, float]) -> None:
        record_validation(Path(self.cfg.checkpointing.checkpoint_dir), validated, metrics, self._retention())

    def close(self) -> None:
        self.metrics.close()
        if self.rollout_log is not None:
            self.rollout_log.close()
        if self.weights is not None and hasattr(self.weights, "close"):
            self.weights.close()


def _weight_sync(cfg: LearnerConfig, redis_client):
    """The weight transport (learner/broadcast.py), or None when the run has no generation workers to feed."""
    if not cfg.learner.weight_sync.enabled:
        return None
    from learner.broadcast import make_broadcast

    return make_broadcast(cfg, redis_client)
