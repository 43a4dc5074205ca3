"""The judges' Celery queue as a contract: its task name, its queue, the message settings, and submit by name.

Generation workers (and `rlq doctor`) hand rollout groups to the judges through here without importing the judge
role: a Celery app with no task registered sends `TASK_NAME` to `Keys(run).judge_queue`, and whichever judge
worker consumes that queue runs it (workers/judge/). Both sides build their app from `base_app`, so the
serialisation (msgpack only, never pickle) and the broker credentials are set in one place.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from broker.connection import PASSWORD_ENV, USER_ENV, tls_options
from broker.keys import Keys
from broker.schemas import RolloutGroup, encode

TASK_NAME = "rlq.judge.score_group"
GROUPS_PER_TASK = 8
"""Default groups per task for `submit_groups` (a generation worker's PromptBatch is typically 8 prompts)."""


def base_app(broker_url: str, run: str, name: str = "rlq-judge-client") -> Celery:
    """A Celery app on `broker_url` for run `run`'s judge queue: msgpack only, publishing rides out a broker
    restart (~30 s) instead of failing the caller. Lazy: it connects on first use."""
    app = Celery(name, broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="msgpack",
        result_serializer="msgpack",
        event_serializer="msgpack",
        accept_content=["msgpack"],  # never pickle: anything else is refused before it is deserialised
        result_accept_content=["msgpack"],
        task_default_queue=Keys(run).judge_queue,
        task_ignore_result=True,  # results go to the scored stream, not a result backend
        broker_connection_retry_on_startup=True,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 30, "interval_start": 0, "interval_step": 0.5, "interval_max": 1.0},
    )
    if os.environ.get(PASSWORD_ENV) and "@" not in broker_url:
        app.conf.broker_password = os.environ[PASSWORD_ENV]
        app.conf.broker_user = os.environ.get(USER_ENV) or None  # the role's ACL user (broker/acl.py)
    if broker_url.startswith("rediss://"):
        app.conf.broker_use_ssl = tls_options() or {"ssl_cert_reqs": "required"}
    return app


def submit_group(app: Celery, run: str, group: RolloutGroup) -> AsyncResult:
    """Queue one RolloutGroup for the judges of `run` (task id = group id, so `celery inspect` finds it)."""
    return app.send_task(TASK_NAME, args=(encode(group),), queue=Keys(run).judge_queue, task_id=group.group_id)


def submit_groups(
    app: Celery, run: str, groups: Iterable[RolloutGroup], groups_per_task: int = GROUPS_PER_TASK
) -> list[AsyncResult]:
    """Queue groups `groups_per_task` to a task (one argument each), over one producer connection.

    Several groups per task spread Celery's fixed cost per task (~2 ms of the worker's main process) over
    them; each group is still verified in one child round trip with its own deadlines and published on its
    own. The task id is the first group's id, with "+N" for the N more it carries.
    """
    if groups_per_task < 1:
        raise ValueError(f"groups_per_task must be >= 1, got {groups_per_task}")
    items = list(groups)
    chunks = [items[i : i + groups_per_task] for i in range(0, len(items), groups_per_task)]
    with app.producer_or_acquire() as producer:
        return [send_payloads(app, Keys(run).judge_queue, [encode(g) for g in chunk], chunk[0].group_id, producer)
                for chunk in chunks]  # fmt: skip


def send_payloads(app: Celery, queue: str, payloads: list[bytes], first_id: str, producer: Any = None) -> AsyncResult:
    """One task carrying encoded groups `payloads` (the judge requeues the rest of a task this way too)."""
    task_id = first_id if len(payloads) == 1 else f"{first_id}+{len(payloads) - 1}"
    return app.send_task(TASK_NAME, args=tuple(payloads), queue=queue, task_id=task_id, producer=producer)
