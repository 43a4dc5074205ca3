"""A worker that asks to join while the learner waits for data gets the current weights then, not at the next step's
broadcast (which may need that worker's groups first): the collector's idle hook and Coordinator.offer_to_joiners,
on a real Redis."""

from __future__ import annotations

import time
from types import SimpleNamespace

from broker.connection import connect
from broker.keys import Keys
from broker.policy import PolicyHash
from broker.schemas import JoinRequest, ScoredGroup
from broker.streams import StreamConsumer, StreamProducer
from learner.config import GRPOConfig
from learner.coordinator import Coordinator
from learner.rollout_io import Collector, Feeder
from tests.unit.test_curriculum import ONE_WRONG, prompt_at, scored


def test_the_collector_calls_on_idle_after_each_read_that_found_nothing(redis_url, run_name):
    r = connect(redis_url)
    keys = Keys(run_name)
    cfg = GRPOConfig(num_prompts_per_step=1, prompts_per_message=1, num_generations_per_prompt=4)
    feeder = Feeder(lambda items: [True] * len(items), prompt_at, 4, cfg, run=run_name, shuffle=False)
    consumer = StreamConsumer(r, keys.scored, "learner", "learner-0", expected=ScoredGroup, dead_stream=keys.dead)
    consumer.ensure_group()
    idle: list[float] = []

    def on_idle() -> None:  # the learner offers its weights to a joining worker here; data arrives meanwhile
        idle.append(time.monotonic())
        if len(idle) == 2:
            StreamProducer(r, keys.scored).add_many([scored("p0", ONE_WRONG)])

    result = Collector(consumer, feeder, cfg, read_block_ms=50).collect(0, timeout_s=5, on_idle=on_idle)
    assert result is not None and len(result.groups) == 1 and len(idle) == 2


def test_a_worker_asking_to_join_while_the_learner_waits_gets_the_current_weights(redis_url, run_name) -> None:
    """Coordinator.offer_to_joiners, with the real policy hash: a pending join request and a read that found nothing
    send the weights at the learner's version again; no request, no broadcast, at most one look a second."""
    policy = PolicyHash(connect(redis_url), Keys(run_name))
    sent: list[tuple[int, object]] = []
    model: object | None = object()
    coordinator = SimpleNamespace(weights=object(), policy=policy, _offered_at=-float("inf"),
                                  current_weights=lambda: model,
                                  sync_weights=lambda version, model: sent.append((version, model)))  # fmt: skip
    Coordinator.offer_to_joiners(coordinator, 56)  # type: ignore[arg-type]
    assert sent == [] and not policy.join_requested()
    policy.ask_to_join(JoinRequest(worker_id="gen-0"))
    assert policy.join_requested()
    Coordinator.offer_to_joiners(coordinator, 56)  # type: ignore[arg-type]
    assert sent == []  # looked less than a second ago
    coordinator._offered_at = -float("inf")
    Coordinator.offer_to_joiners(coordinator, 56)  # type: ignore[arg-type]
    assert sent == [(56, model)]
    coordinator._offered_at = -float("inf")
    first = model
    model = None  # FSDP2, rank 0's full copy not gathered at this version: nothing to send
    Coordinator.offer_to_joiners(coordinator, 57)  # type: ignore[arg-type]
    assert sent == [(56, first)]
