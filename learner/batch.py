"""What one training step eats: the prompt feeder, the group filters, and the step's batch cut into rank shares.

Rank 0 owns all Redis traffic. `Feeder` publishes prompts with backpressure: at most
`(max_staleness + 1) * num_prompts_per_step` prompts are in flight, which is all the staleness window can use,
so nothing is generated only to be thrown away. `Collector` reads scored groups, drops duplicates (a group
scored twice trains once), stale groups (`learner_version - group_version > max_staleness`) and, with DAPO
dynamic sampling, groups whose rewards all agree, and returns the step's groups.

Scored entries are acknowledged only when a checkpoint covers them (`Collector.take_acks`): until then they
stay pending in the consumer group, so a learner killed between checkpoints gets them back on restart.
Groups read but not yet trained at checkpoint time are saved in the checkpoint itself (`state`/`restore`).
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import numpy as np
import torch

from broker.schemas import Prompt, PromptBatch, ScoredGroup, decode, encode
from learner.config import GRPOConfig
from learner.loss import group_advantages, overlong_penalty

log = logging.getLogger(__name__)

DROP_REASONS = ("stale", "zero_variance", "duplicate")


@dataclass
class TrainSample:
    """One completion ready for the loss."""

    group_id: str
    input_ids: np.ndarray  # int64 [L]: prompt then completion, cut to policy.max_total_sequence_length
    prompt_len: int
    behaviour_logprobs: np.ndarray  # float32 [L - prompt_len]
    advantage: float
    trainable: bool = True  # False: overlong-filtered, in its group's baseline but out of the loss
    prox_logprobs: np.ndarray | None = None  # float32 [L - prompt_len], learner logprobs before the step

    @property
    def completion_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


@dataclass
class Minibatch:
    """One rank's part of one optimizer update, with the update's global normalisers."""

    samples: list[TrainSample]
    num_tokens: float  # trainable completion tokens of the whole update, every rank
    num_sequences: float  # trainable sequences of the whole update, every rank


# --- pure pieces ---------------------------------------------------------------------------------------------


def admission(
    group_version: int, learner_version: int, rewards: np.ndarray, *, max_staleness: int, dynamic_sampling: bool
) -> str | None:
    """Why a group may not train at `learner_version`, or None when it may.

    A group from a version newer than the learner's (weights of a timeline a crash discarded) counts as fresh.
    """
    if learner_version - group_version > max_staleness:
        return "stale"
    if dynamic_sampling and len(rewards) > 1 and float(np.ptp(rewards)) == 0.0:
        return "zero_variance"
    return None


def shaped_rewards(group: ScoredGroup, cfg: GRPOConfig) -> np.ndarray:
    """The judge's rewards [N] plus the DAPO overlong penalty when enabled."""
    rewards = group.rewards.to_numpy().astype(np.float32)  # [N]
    shaping = cfg.reward_shaping
    if not shaping.enabled:
        return rewards
    lengths = torch.tensor([len(s.token_ids) for s in group.rollout.samples])  # [N]
    penalty = overlong_penalty(
        lengths,
        max_response_length=shaping.max_response_length,
        buffer_length=shaping.overlong_buffer_length,
        penalty=shaping.overlong_buffer_penalty,
    )
    return rewards + penalty.numpy()


def group_to_samples(group: ScoredGroup, cfg: GRPOConfig, max_total_len: int) -> list[TrainSample]:
    """Advantages for one group and its samples as `TrainSample`s (completions cut to the length budget)."""
    rewards = torch.from_numpy(shaped_rewards(group, cfg))  # [N]
    adv = group_advantages(rewards, leave_one_out=cfg.use_leave_one_out_baseline, normalize=cfg.normalize_rewards)
    prompt = group.rollout.prompt.token_ids.to_numpy().astype(np.int64)  # [P]
    if len(prompt) >= max_total_len:
        raise ValueError(f"prompt of {group.group_id} has {len(prompt)} tokens >= max_total_sequence_length")
    budget = max_total_len - len(prompt)
    out = []
    for sample, a in zip(group.rollout.samples, adv.tolist(), strict=True):
        completion = sample.token_ids.to_numpy().astype(np.int64)[:budget]  # [C]
        logprobs = sample.logprobs.to_numpy().astype(np.float32)[:budget]  # [C]
        truncated = sample.finish_reason == "length" or len(sample.token_ids) > budget
        out.append(
            TrainSample(
                group_id=group.group_id,
                input_ids=np.concatenate([prompt, completion]),
                prompt_len=len(prompt),
                behaviour_logprobs=logprobs,
                advantage=float(a),
                trainable=len(completion) > 0 and not (cfg.overlong_filtering and truncated),
            )
        )
    return out


def shard(samples: list[TrainSample], world_size: int) -> list[list[TrainSample]]:
    """Split samples over ranks balancing tokens (longest first onto the lightest rank); order-stable per rank."""
    loads = [0] * world_size
    parts: list[list[tuple[int, TrainSample]]] = [[] for _ in range(world_size)]
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))
    for i in order:
        rank = min(range(world_size), key=lambda r: (loads[r], len(parts[r])))
        loads[rank] += len(samples[i].input_ids)
        parts[rank].append((i, samples[i]))
    return [[s for _, s in sorted(part, key=lambda p: p[0])] for part in parts]


def assemble(
    samples: list[TrainSample], world_size: int, global_batch_size: int | None, *, skip_inert: bool = False
) -> list[list[Minibatch]]:
    """The step's samples as `[rank][update] -> Minibatch`, one optimizer update per `global_batch_size`.

    skip_inert: leave out samples whose gradient is zero (advantage exactly 0: every sample of a group whose
    rewards agree; or not trainable). Only exact when the loss has no advantage-free term (no KL penalty): the
    normalisers still count them, so the update is the same, without their forward and backward.
    """
    size = global_batch_size or len(samples)
    per_rank: list[list[Minibatch]] = [[] for _ in range(world_size)]
    for start in range(0, len(samples), size):
        chunk = samples[start : start + size]
        trainable = [s for s in chunk if s.trainable]
        tokens = float(sum(s.completion_len for s in trainable))
        kept = [s for s in trainable if s.advantage != 0.0] if skip_inert else chunk
        for rank, part in enumerate(shard(kept, world_size)):
            per_rank[rank].append(Minibatch(part, tokens, float(len(trainable))))
    return per_rank


def rollout_metrics(groups: list[ScoredGroup], learner_version: int) -> dict[str, float]:
    """rollout/* figures of the groups a step trains on."""
    rewards = np.concatenate([g.rewards.to_numpy() for g in groups]).astype(np.float64)
    lengths = np.array([len(s.token_ids) for g in groups for s in g.rollout.samples], dtype=np.float64)
    verdicts = Counter(v for g in groups for v in g.verdicts)
    staleness = Counter(max(0, learner_version - g.rollout.policy_version) for g in groups)
    out = {
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/reward_std": float(rewards.std()),
        "rollout/response_length_mean": float(lengths.mean()),
        "rollout/response_length_max": float(lengths.max()),
        "rollout/truncated_fraction": float(
            np.mean([s.finish_reason == "length" for g in groups for s in g.rollout.samples])
        ),
        "rollout/groups": float(len(groups)),
        "rollout/samples": float(len(rewards)),
        "rollout/staleness_mean": float(np.mean([max(0, learner_version - g.rollout.policy_version) for g in groups])),
    }
    out.update({f"rollout/verdict_{k}": float(v) for k, v in sorted(verdicts.items())})
    out.update({f"rollout/staleness_{k}": float(v) for k, v in sorted(staleness.items())})
    return out


# --- rank-0 I/O --------------------------------------------------------------------------------------------


class Feeder:
    """Publishes PromptBatches in dataset order (reshuffled every epoch) with backpressure.

    Batch ids derive from the data cursor and go through `publish_once`, so a resumed learner that replays the
    cursor from its checkpoint never sends a prompt batch twice.
    """

    def __init__(
        self,
        publish_once: Callable[[str, PromptBatch], bool],
        prompt_at: Callable[[int], Prompt],
        num_examples: int,
        cfg: GRPOConfig,
        *,
        run: str,
        shuffle: bool = True,
        max_prompt_tokens: int | None = None,
    ) -> None:
        if num_examples < 1:
            raise ValueError("the training data has no examples")
        self.max_prompt_tokens = max_prompt_tokens  # longer prompts leave no room to answer: never sent
        self.skipped = 0
        self._skipped_in_a_row = 0
        self.publish_once = publish_once
        self.prompt_at = prompt_at
        self.num_examples = num_examples
        self.cfg = cfg
        self.run = run
        self.shuffle = shuffle
        self.cursor = 0  # prompts published so far, over all epochs
        self.in_flight = 0  # prompts published whose scored group has not come back
        self._order: tuple[int, list[int]] | None = None

    @property
    def window(self) -> int:
        """Most prompts in flight: what the staleness window can train on."""
        return (self.cfg.max_staleness + 1) * self.cfg.num_prompts_per_step

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_examples)
        if not self.shuffle:
            return offset
        if self._order is None or self._order[0] != epoch:
            order = list(range(self.num_examples))
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
            self._order = (epoch, order)
        return self._order[1][offset]

    def top_up(self, learner_version: int, held: int = 0) -> int:
        """Publish until the window is full; returns how many prompts went out.

        Args:
            held: groups already back but not trained yet; they occupy the window like prompts in flight.
        """
        sent = 0
        while self.in_flight + held < self.window:
            n = min(self.cfg.prompts_per_message, self.window - self.in_flight - held)
            batch_id = f"{self.run}-b{self.cursor:09d}"
            prompts = self._fitting([self.prompt_at(self._index(self.cursor + i)) for i in range(n)])
            if prompts:
                message = PromptBatch(
                    batch_id=batch_id,
                    prompts=prompts,
                    n_samples=self.cfg.num_generations_per_prompt,
                    min_policy_version=learner_version,
                )
                if not self.publish_once(batch_id, message):
                    log.info("prompt batch %s was published before the restart; not sent again", batch_id)
            self.cursor += n
            self.in_flight += len(prompts)
            sent += len(prompts)
        return sent

    def _fitting(self, prompts: list[Prompt]) -> list[Prompt]:
        """Prompts short enough to train on; the others are skipped (counted, logged once each)."""
        if self.max_prompt_tokens is None:
            return prompts
        keep = [p for p in prompts if len(p.token_ids) < self.max_prompt_tokens]
        for p in prompts:
            if len(p.token_ids) >= self.max_prompt_tokens:
                log.warning("prompt %s has %d tokens, no room below %d: skipped", p.prompt_id, len(p.token_ids),
                            self.max_prompt_tokens)  # fmt: skip
        self.skipped += len(prompts) - len(keep)
        self._skipped_in_a_row = 0 if keep else self._skipped_in_a_row + len(prompts)
        if self._skipped_in_a_row >= self.num_examples:
            raise ValueError(f"no training prompt is shorter than {self.max_prompt_tokens} tokens")
        return keep


@dataclass
class CollectResult:
    groups: list[ScoredGroup]
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> group ids
    wait_s: float = 0.0


class Collector:
    """Reads scored groups and returns the ones a step may train on (see the module docstring)."""

    def __init__(self, consumer, feeder: Feeder, cfg: GRPOConfig, *, read_block_ms: int = 1000) -> None:
        self.consumer = consumer  # broker.streams.StreamConsumer (expected=ScoredGroup)
        self.feeder = feeder
        self.cfg = cfg
        self.read_block_ms = read_block_ms
        self.buffer: list[ScoredGroup] = []  # read, admitted when read, not trained yet
        self.validation: list[ScoredGroup] = []  # purpose "val": for learner/validation.py, never trained
        self.seen: set[str] = set()
        self._unacked: list[str] = []
        self._carried: dict[str, list[str]] = {}  # drops found by `recover`, reported with the next step

    def recover(self, pending: int, learner_version: int) -> int:
        """Take back the `pending` entries a killed predecessor read but never acknowledged; returns how many.

        They were read after its last checkpoint, so the restored model has not trained on them.
        """
        if pending <= 0:
            return 0
        idle = self.consumer.claim_idle_ms
        self.consumer.claim_idle_ms = 0
        try:
            deliveries = self.consumer.read(count=pending, block_ms=0)
        finally:
            self.consumer.claim_idle_ms = idle
        result = CollectResult(groups=[], dropped=self._carried)
        for delivery in deliveries:
            self._unacked.append(delivery.entry_id)
            self._accept(delivery.message, learner_version, result)
        return len(deliveries)

    def collect(
        self, learner_version: int, *, timeout_s: float, should_stop: Callable[[], bool] | None = None
    ) -> CollectResult | None:
        """Block until `num_prompts_per_step` admissible groups are at hand; None when `should_stop()` turns true
        first (what was read stays buffered, drops are reported with the next step).

        Raises:
            TimeoutError: no scored group arrived for `timeout_s`.
        """
        need = self.cfg.num_prompts_per_step
        result = CollectResult(groups=[], dropped=self._carried)
        self._carried = {}
        start = last_progress = time.monotonic()
        self._refilter(learner_version, result)
        while len(self.buffer) < need:
            if should_stop is not None and should_stop():
                self._carried = result.dropped
                return None
            self.feeder.top_up(learner_version, held=len(self.buffer))
            deliveries = self.consumer.read(block_ms=self.read_block_ms)
            if deliveries:
                last_progress = time.monotonic()
            for delivery in deliveries:
                self._unacked.append(delivery.entry_id)
                self._accept(delivery.message, learner_version, result)
            if time.monotonic() - last_progress > timeout_s:
                raise TimeoutError(f"no scored group for {timeout_s:.0f} s ({self.feeder.in_flight} prompts in flight)")
        # No refill here: a prompt published now, while this step's groups train, would be trained at
        # learner_version + max_staleness + 1 at the earliest; the next collect refills after the update.
        result.groups, self.buffer = self.buffer[:need], self.buffer[need:]
        result.wait_s = time.monotonic() - start
        return result

    def poll(self, learner_version: int, block_ms: int) -> list[str]:
        """Read once (after the last step: validation groups still out); returns the validation entries' ids,
        which no checkpoint needs. Training groups are taken in as `collect` would, for a resumed run."""
        result = CollectResult(groups=[], dropped=self._carried)
        val_ids = []
        for delivery in self.consumer.read(block_ms=block_ms):
            if delivery.message.rollout.purpose == "val":
                val_ids.append(delivery.entry_id)
            else:
                self._unacked.append(delivery.entry_id)
            self._accept(delivery.message, learner_version, result)
        self._carried = result.dropped
        return val_ids

    def take_validation(self) -> list[ScoredGroup]:
        groups, self.validation = self.validation, []
        return groups

    def _accept(self, group: ScoredGroup, learner_version: int, result: CollectResult) -> None:
        if group.rollout.purpose == "val":
            self.validation.append(group)
            return
        if group.group_id in self.seen:
            result.dropped.setdefault("duplicate", []).append(group.group_id)
            return
        self.seen.add(group.group_id)
        self.feeder.in_flight = max(0, self.feeder.in_flight - 1)
        reason = self._reason(group, learner_version)
        if reason:
            result.dropped.setdefault(reason, []).append(group.group_id)
        else:
            self.buffer.append(group)

    def _reason(self, group: ScoredGroup, learner_version: int) -> str | None:
        return admission(
            group.rollout.policy_version,
            learner_version,
            shaped_rewards(group, self.cfg),
            max_staleness=self.cfg.max_staleness,
            dynamic_sampling=self.cfg.use_dynamic_sampling,
        )

    def _refilter(self, learner_version: int, result: CollectResult) -> None:
        """Groups buffered at an older version may have gone stale."""
        keep = []
        for group in self.buffer:
            reason = self._reason(group, learner_version)
            if reason:
                result.dropped.setdefault(reason, []).append(group.group_id)
            else:
                keep.append(group)
        self.buffer = keep

    def take_acks(self) -> list[str]:
        """Entry ids read so far, to XACK once a checkpoint covers them (trained, dropped or saved)."""
        ids, self._unacked = self._unacked, []
        return ids

    def state(self) -> dict:
        """What a checkpoint must keep: the data cursor, prompts in flight, ids seen, untrained groups."""
        return {
            "cursor": self.feeder.cursor,
            "in_flight": self.feeder.in_flight,
            "seen": sorted(self.seen),
            "carried": self._carried,
            "buffer": msgspec.msgpack.encode([encode(g) for g in self.buffer]),
        }

    def restore(self, state: dict) -> None:
        self.feeder.cursor = int(state["cursor"])
        self.feeder.in_flight = int(state["in_flight"])
        self.seen = set(state["seen"])
        self._carried = {k: list(v) for k, v in state.get("carried", {}).items()}
        raw = msgspec.msgpack.decode(state["buffer"]) if state.get("buffer") else []
        self.buffer = [decode(b, ScoredGroup) for b in raw]  # type: ignore[misc]
