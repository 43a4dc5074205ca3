"""Where a generation worker hands its finished rollout groups: the judges' Celery queue (production), or a stream
(tests and debugging). `submit` returns once the groups are safely queued; only then is the batch acknowledged."""

from __future__ import annotations

from abc import ABC, abstractmethod

import redis

from broker.keys import Keys
from broker.schemas import RolloutGroup
from broker.streams import publish_once


def rollout_stream(run: str) -> str:
    """Where `StreamSink` puts rollout groups (tests and debugging; production goes through the judges)."""
    return f"{Keys(run).prompts.rsplit(':', 1)[0]}:rollouts"


class RolloutSink(ABC):
    """Where finished groups go; `submit` returns once they are safely queued."""

    @abstractmethod
    def submit(self, groups: list[RolloutGroup]) -> None: ...


class CelerySink(RolloutSink):
    """The judges' Celery queue of the run, by task name (broker/judge_queue.py): the judge role is not imported."""

    def __init__(self, broker_url: str, run: str) -> None:
        from broker.judge_queue import base_app

        self.app = base_app(broker_url, run)
        self.run = run

    def submit(self, groups: list[RolloutGroup]) -> None:
        from broker.judge_queue import submit_groups

        submit_groups(self.app, self.run, groups)


class StreamSink(RolloutSink):
    """XADD each group once (by group id) to a stream."""

    def __init__(self, r: redis.Redis, stream: str) -> None:
        self.r = r
        self.stream = stream

    def submit(self, groups: list[RolloutGroup]) -> None:
        for g in groups:
            publish_once(self.r, self.stream, g.group_id, g)
