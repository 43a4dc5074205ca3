"""Rank 0's I/O of a step: the prompt feeder (publishes with backpressure, passes over retired prompts) and the
collector (reads scored groups, drops duplicates, stale groups and, with dynamic sampling, groups with no signal).

`Feeder` publishes prompts with backpressure: at most `(max_staleness + 1) * num_prompts_per_step` prompts are in
flight, which is all the staleness window can use, so nothing is generated only to be thrown away; less while the
judges fall behind (judge-aware admission, learner/admission.py). It cuts each batch into messages of
`learner.admission.pull_unit_prompts`, which the generation workers take by their share of the fleet's speed. Scored
entries are acknowledged only when a checkpoint covers them (`Collector.take_acks`): until then they stay pending
in the consumer group, so a learner killed between checkpoints gets them back on restart. Groups read but not
yet trained at checkpoint time are saved in the checkpoint itself (`state`/`restore`). The pure filters and the
batch cut into rank shares are learner/batch.py.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from broker.schemas import Prompt, PromptBatch, ScoredGroup, decode, encode
from learner.admission import JudgeAdmission
from learner.batch import admission, shaped_rewards
from learner.config import GRPOConfig
from learner.curriculum import SolvedPrompts

log = logging.getLogger(__name__)


class Feeder:
    """Publishes PromptBatches in dataset order (reshuffled every epoch) with backpressure.

    Batch ids derive from the data cursor and `publish` adds each id at most once (broker.streams.publish_all_once),
    so a resumed learner that replays the cursor from its checkpoint never sends a prompt batch twice.
    """

    def __init__(
        self,
        publish: Callable[[list[tuple[str, PromptBatch]]], list[bool]],
        prompt_at: Callable[[int], Prompt],
        num_examples: int,
        cfg: GRPOConfig,
        *,
        run: str,
        shuffle: bool = True,
        max_prompt_tokens: int | None = None,
        message_prompts: int | None = None,
        admission: JudgeAdmission | None = None,
        solved: SolvedPrompts | None = None,
    ) -> None:
        if num_examples < 1:
            raise ValueError("the training data has no examples")
        self.max_prompt_tokens = max_prompt_tokens  # longer prompts leave no room to answer: never sent
        self.skipped = 0
        self._unsent_in_a_row = 0  # positions since the last prompt that could be sent
        self.publish = publish  # (batch id, message) pairs -> added or published before
        self.prompt_at = prompt_at
        self.num_examples = num_examples
        self.cfg = cfg
        self.run = run
        self.shuffle = shuffle
        self.cursor = 0  # prompts published so far, over all epochs
        self.in_flight = 0  # prompts published whose scored group has not come back
        # Capacity-aware pulls: smaller messages, which workers take several at a time (learner.admission).
        self.message_prompts = min(cfg.prompts_per_message, message_prompts or cfg.prompts_per_message)
        self.admission = admission  # judge-aware limit on the window; None: the staleness window alone
        self.solved = (
            solved
            if solved is not None
            else SolvedPrompts(cfg.retire_solved_after, num_examples, cfg.retire_max_fraction)
        )
        self.retired_skips = 0  # positions passed over because their prompt was retired (learner/curriculum.py)
        self.published_at: dict[str, float] = {}  # batch id -> wall time it went out (judge-aware refill time)
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
        window = self.window if self.admission is None else self.admission.window(self.window)
        messages: list[tuple[str, PromptBatch]] = []
        cursor, sent = self.cursor, 0
        while self.in_flight + sent + held < window:
            prompts, used = self._take(cursor, min(self.message_prompts, window - self.in_flight - sent - held))
            batch_id = f"{self.run}-b{cursor:09d}"
            messages.append((batch_id, PromptBatch(batch_id=batch_id, prompts=prompts,
                                                   n_samples=self.cfg.num_generations_per_prompt,
                                                   min_policy_version=learner_version)))  # fmt: skip
            cursor += used
            sent += len(prompts)
        if not messages:
            return 0
        # All in one transaction: a worker blocked on the stream wakes to the whole top-up (one read, one engine
        # call), not to its first message.
        for (batch_id, _), added in zip(messages, self.publish(messages), strict=True):
            if not added:
                log.info("prompt batch %s was published before the restart; not sent again", batch_id)
        self.cursor = cursor
        self.in_flight += sent
        now = time.time()
        for batch_id, _ in messages:
            self.published_at[batch_id] = now
        while len(self.published_at) > 2 * self.window:  # oldest first: long since back, or lost
            del self.published_at[next(iter(self.published_at))]
        return sent

    def _take(self, start: int, n: int) -> tuple[list[Prompt], int]:
        """The next `n` prompts from data position `start` that may be sent, and how many positions that took.

        Too long ones are skipped (counted, logged once each), retired ones passed over.

        Raises:
            ValueError: no training prompt is short enough.
        """
        prompts: list[Prompt] = []
        used = 0
        while len(prompts) < n:
            if self._unsent_in_a_row >= self.num_examples:  # a whole epoch of positions without one to send
                if not self.solved.retired:
                    raise ValueError(f"no training prompt is shorter than {self.max_prompt_tokens} tokens")
                self.solved.reset()  # the retired (and the too long) are all there is: the pool refills
                self._unsent_in_a_row = 0
            prompt = self.prompt_at(self._index(start + used))
            used += 1
            self._unsent_in_a_row += 1
            if self.max_prompt_tokens is not None and len(prompt.token_ids) >= self.max_prompt_tokens:
                log.warning("prompt %s has %d tokens, no room below %d: skipped", prompt.prompt_id,
                            len(prompt.token_ids), self.max_prompt_tokens)  # fmt: skip
                self.skipped += 1
            elif self.solved.is_retired(prompt.prompt_id):
                self.retired_skips += 1
            else:
                self._unsent_in_a_row = 0
                prompts.append(prompt)
        return prompts, used


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
        # (group, reason, learner_version) of each drop: the rollout log (learner/rollout_log.py); None: nobody
        self.on_drop: Callable[[ScoredGroup, str, int], None] | None = None

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
        self,
        learner_version: int,
        *,
        timeout_s: float,
        should_stop: Callable[[], bool] | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> CollectResult | None:
        """Block until `num_prompts_per_step` admissible groups are at hand; None when `should_stop()` turns true
        first (what was read stays buffered, drops are reported with the next step). `on_idle` runs after each
        read that found nothing.

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
            elif on_idle is not None:  # a read that timed out: nothing came back for read_block_ms
                on_idle()
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
            self._drop(result, "duplicate", group, learner_version)
            return
        self.seen.add(group.group_id)
        self.feeder.in_flight = max(0, self.feeder.in_flight - 1)
        self.feeder.solved.observe(group)  # stale or not, it says what a recent policy can already solve
        if self.feeder.admission is not None:  # published -> handed to the judges -> scored (judge-aware)
            self.feeder.admission.observe_latency(group.created_at - group.rollout.created_at)
            published = self.feeder.published_at.get(group.rollout.batch_id)
            if published is not None:
                self.feeder.admission.observe_generation(group.rollout.created_at - published)
        reason = self._reason(group, learner_version)
        if reason:
            self._drop(result, reason, group, learner_version)
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
                self._drop(result, reason, group, learner_version)
            else:
                keep.append(group)
        self.buffer = keep

    def _drop(self, result: CollectResult, reason: str, group: ScoredGroup, learner_version: int) -> None:
        result.dropped.setdefault(reason, []).append(group.group_id)
        if self.on_drop is not None:
            self.on_drop(group, reason, learner_version)

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
            "solved": self.feeder.solved.state(),
        }

    def restore(self, state: dict) -> None:
        self.feeder.cursor = int(state["cursor"])
        self.feeder.in_flight = int(state["in_flight"])
        self.seen = set(state["seen"])
        self._carried = {k: list(v) for k, v in state.get("carried", {}).items()}
        raw = msgspec.msgpack.decode(state["buffer"]) if state.get("buffer") else []
        self.buffer = [decode(b, ScoredGroup) for b in raw]  # type: ignore[misc]
        self.feeder.solved.restore(state.get("solved"))
