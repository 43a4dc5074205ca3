"""The judge role: a Celery app on the Redis broker whose one task scores a RolloutGroup.

`rlq worker judge --config run.yaml` runs it as an ordinary Celery worker in its own process
(workers/judge/worker.py: Celery's own worker command on this app), so `celery inspect` and Flower work:

    celery -A workers.judge.celery_app --broker redis://host:6379/0 inspect active

Delivery: msgpack only (a pickled message is refused before it is decoded); late acks, so a task is acknowledged
only after its ScoredGroup is in the scored stream; a pool process killed mid-task is retried at once
(`retry_on_worker_lost`, counted, up to `max_deliveries` runs) and a worker whose main process dies has its
tasks redelivered by the broker after `visibility_timeout_s` (+ `restore_interval_s`). The ScoredGroup is
written with `publish_once` keyed by group id, so a redelivered task never produces a second copy. A group
that cannot be scored (undecodable, hard time limit, crashes on every run) goes to the dead-letter stream with
the reason and its original bytes.

Scoring: every answer runs in the pool process's pre-forked verifier child (`workers.judge.isolation`) under a hard
deadline; the optional LLM judge is asked only about answers the library scored "incorrect".
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, cast

import msgspec
import redis
from celery import Celery, Task, signals

from broker.connection import connect
from broker.judge_queue import TASK_NAME, base_app, send_payloads
from broker.keys import Keys
from broker.registry import Registry
from broker.schemas import Array, MessageError, RolloutGroup, ScoredGroup, Verdict, WorkerHeartbeat, decode
from broker.streams import done_key, publish_once, send_dead_letter
from workers.judge.config import TIME_LIMIT_MARGIN_S, JudgeConfig, LLMJudgeConfig
from workers.judge.isolation import VerifierChild
from workers.judge.verify import extract_answer, prediction, reward_of

log = logging.getLogger(__name__)

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
HEARTBEAT_EVERY_S = 5.0
MAX_REASON_CHARS = 500
LLM_JUDGE_THREADS = 8


class JudgeTask(Task):
    """The task class; `make_app` sets `run_name`, `judge` and `broker_url` on the subclass it registers.
    (Not `run`: that is Celery's name for the task body.)"""

    run_name: str = "default"
    judge: JudgeConfig = JudgeConfig()
    broker_url: str = DEFAULT_BROKER_URL


def make_app(broker_url: str, run: str = "default", cfg: JudgeConfig | None = None) -> Celery:
    """A Celery app for run `run` on `broker_url` with the judge task registered (lazy: connects on first use)."""
    cfg = cfg or JudgeConfig()
    app = base_app(broker_url, run, name="rlq-judge")  # the queue's contract: names, msgpack only, credentials
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a busy process holds no queued tasks another judge could run
        task_time_limit=cfg.task_time_limit_s,
        worker_disable_rate_limits=True,  # none are used; skips a per-task check in the consumer
        broker_transport_options={
            # kombu's default is 1 h; a task held by a dead worker comes back after this (+ the sweep interval).
            "visibility_timeout": cfg.visibility_timeout_s,
            "unacked_restore_interval": cfg.restore_interval_s,
            "unacked_restore_throttle": 1,  # make the interval the only knob: scan on every sweep
        },
    )
    app.task(
        base=JudgeTask,
        bind=True,
        name=TASK_NAME,
        run_name=run,
        judge=cfg,
        broker_url=broker_url,
        acks_late=True,
        reject_on_worker_lost=True,
        retry_on_worker_lost=True,  # a lost pool process re-sends the task with retries + 1: a delivery count
        max_retries=cfg.max_deliveries - 1,
        default_retry_delay=0,
        autoretry_for=(redis.ConnectionError, redis.TimeoutError),
        retry_backoff=True,
    )(score_task)
    return app


# Per pool process state: a Redis client and a verifier child, created on first use.

_clients: dict[str, redis.Redis] = {}
_verifier: VerifierChild | None = None
_stats: Counter[str] = Counter()
_busy = threading.Event()  # set while this pool process runs a task


def _redis(url: str) -> redis.Redis:
    if url not in _clients:
        _clients[url] = connect(url, client_name="rlq-judge")
    return _clients[url]


def _child(cfg: JudgeConfig) -> VerifierChild:
    global _verifier
    if _verifier is None:
        _verifier = VerifierChild(memory_mb=cfg.child_memory_mb, rule=cfg.answer_rule)
    return _verifier


def judge_id() -> str:
    return f"judge-{socket.gethostname()}-{os.getpid()}"


def score_task(task: JudgeTask, *payloads: bytes) -> dict[str, Any]:
    """Celery entry: for each group, decode, skip if already scored, score, publish once.

    A group is started only if its whole `group_timeout_s` still fits before the hard time limit; groups that
    do not are queued again as a new task, so a task never outlives its limit however many it carries.
    """
    _busy.set()
    try:
        return _score_all(task, payloads)
    finally:
        _busy.clear()


def _score_all(task: JudgeTask, payloads: tuple[bytes, ...]) -> dict[str, Any]:
    started = time.monotonic()
    budget = task.judge.task_time_limit_s - TIME_LIMIT_MARGIN_S - task.judge.group_timeout_s
    summary: dict[str, Any] = {"published": 0, "skipped": 0, "dead": 0, "requeued": 0}
    for index, payload in enumerate(payloads):
        if index and time.monotonic() - started > budget:
            rest = list(payloads[index:])
            send_payloads(task.app, Keys(task.run_name).judge_queue, rest, f"{task.request.id or 'requeued'}#{index}")
            summary["requeued"] = len(rest)
            log.info("requeued %d groups that would not fit before the task's hard time limit", len(rest))
            break
        summary[_score_one(task, payload, index)] += 1
    return summary


def _score_one(task: JudgeTask, payload: bytes, index: int) -> str:
    keys = Keys(task.run_name)
    r = _redis(task.broker_url)
    try:
        group = cast(RolloutGroup, decode(payload, RolloutGroup))
    except MessageError as exc:
        _dead_letter(task, payload, f"undecodable rollout group: {exc}", _entry_id(task.request.id, index))
        return "dead"
    if r.sismember(done_key(keys.scored), group.group_id):
        log.info("group %s was already scored; acknowledging the redelivery", group.group_id)
        return "skipped"
    scored = score(group, task.judge, _child(task.judge), judge=judge_id())
    published = publish_once(r, keys.scored, group.group_id, scored)
    _stats.update(scored.verdicts)
    return "published" if published else "skipped"


def _entry_id(task_id: str | None, index: int) -> str:
    return f"{task_id or ''}#{index}" if index else task_id or ""


def score(group: RolloutGroup, cfg: JudgeConfig, child: VerifierChild, *, judge: str = "") -> ScoredGroup:
    """Score every sample of `group`: library verdicts in `child`, then the optional LLM judge."""
    started, started_wall = time.monotonic(), time.time()
    answers = [prediction(s.text, cfg.answer_rule) for s in group.samples]
    verdicts = child.verify_answers(
        group.prompt.ground_truth, answers, answer_timeout_s=cfg.answer_timeout_s, group_timeout_s=cfg.group_timeout_s
    )
    if cfg.injected_delay_per_group_s:  # bench/test only: a judge of known, steady speed (config.py)
        time.sleep(cfg.injected_delay_per_group_s)
    verified = time.monotonic()
    if cfg.llm_judge.enabled:
        remaining = started + cfg.group_timeout_s - verified
        finals = [extract_answer(s.text) for s in group.samples]  # the LLM compares final answers, not completions
        verdicts = second_opinion(cfg.llm_judge, group, finals, verdicts, remaining)
    rewards = Array.from_numpy([reward_of(v) for v in verdicts], "float32")  # float32 [n_samples]
    timings = {"verify_s": verified - started, "queue_wait_s": max(0.0, started_wall - group.created_at)}
    if cfg.llm_judge.enabled:
        timings["llm_judge_s"] = time.monotonic() - verified
    return ScoredGroup(rollout=group, rewards=rewards, verdicts=list(verdicts), judge_id=judge, timings=timings)


def _heartbeat_loop(broker_url: str, run: str) -> None:
    """Every HEARTBEAT_EVERY_S: this pool process's registry entry (idle or busy, answers/s), so an idle judge is
    listed too (`rlq workers`, the judge queue's consumers), and the verdict counts in the log when they moved."""
    registry = Registry(connect(broker_url, client_name="rlq-judge-heartbeat"), Keys(run))
    last_at, last_answers = time.monotonic(), 0
    while True:
        now, answers = time.monotonic(), sum(_stats.values())
        rate = (answers - last_answers) / max(now - last_at, 1e-3)
        if answers != last_answers:
            child = _verifier
            log.info(
                "verdicts so far %s; child timeouts %d, crashes %d, respawns %d",
                dict(_stats), *(0, 0, 0) if child is None else (child.timeouts, child.crashes, child.respawns),
            )  # fmt: skip
        beat = WorkerHeartbeat(worker_id=judge_id(), role="judge", status="busy" if _busy.is_set() else "idle",
                               throughput=rate)  # fmt: skip
        try:
            registry.heartbeat(beat, ttl_s=3 * HEARTBEAT_EVERY_S)
        except redis.RedisError as exc:  # the broker is away: the tasks fail and retry on their own
            log.warning("judge heartbeat failed: %s", exc)
        last_at, last_answers = now, answers
        time.sleep(HEARTBEAT_EVERY_S)


# Dead letters ---------------------------------------------------------------------------------------------------


def _dead_letter(task: Task, payload: Any, reason: str, task_id: str) -> None:
    raw = bytes(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else msgspec.msgpack.encode(payload)
    keys = Keys(getattr(task, "run_name", "default"))
    retries = getattr(task.request, "retries", 0) or 0
    send_dead_letter(
        _redis(getattr(task, "broker_url", DEFAULT_BROKER_URL)), keys.dead, source_stream=keys.judge_queue,
        entry_id=task_id, reason=reason[:MAX_REASON_CHARS], deliveries=retries + 1, payload=raw, consumer=judge_id(),
    )  # fmt: skip


@signals.task_failure.connect
def _on_task_failure(sender: Any = None, task_id: str = "", exception: Any = None, args: Any = None, **_: Any) -> None:
    """Every terminal failure of the judge task (an exception, the hard time limit, a pool process lost more
    than max_deliveries - 1 times) dead-letters its groups not yet scored; Celery then acknowledges it."""
    if getattr(sender, "name", None) != TASK_NAME:
        return
    reason = f"{type(exception).__name__}: {exception}"
    try:
        done = done_key(Keys(sender.run_name).scored)
        r = _redis(sender.broker_url)
        for index, payload in enumerate(args or ()):
            group_id = _group_id(payload)
            if group_id is None or not r.sismember(done, group_id):
                _dead_letter(sender, payload, reason, group_id or _entry_id(task_id, index))
    except redis.RedisError:
        log.exception("could not dead-letter task %s (%s); it is lost", task_id, type(exception).__name__)


def _group_id(payload: Any) -> str | None:
    try:
        return cast(RolloutGroup, decode(payload, RolloutGroup)).group_id
    except MessageError:
        return None


@signals.worker_init.connect
def _warm_before_forking_the_pool(**_: Any) -> None:
    """Import and exercise math-verify once in the worker's main process: every pool process (and each verifier
    child it forks) inherits the warm caches, and no task pays the second or two of the first import."""
    from workers.judge.isolation import warm_up

    warm_up()


@signals.worker_process_init.connect
def _start_heartbeat(**_: Any) -> None:
    from celery import current_app

    task = current_app.tasks.get(TASK_NAME)
    if isinstance(task, JudgeTask):
        threading.Thread(target=_heartbeat_loop, args=(task.broker_url, task.run_name), name="rlq-judge-heartbeat",
                         daemon=True).start()  # fmt: skip


@signals.worker_process_shutdown.connect
def _stop_child(**_: Any) -> None:
    if _verifier is not None:
        _verifier.close()
    from celery import current_app

    task = current_app.tasks.get(TASK_NAME)
    if isinstance(task, JudgeTask):
        try:
            Registry(_redis(task.broker_url), Keys(task.run_name)).remove(judge_id())
        except redis.RedisError:
            pass  # its heartbeat lapses on its own


# The optional LLM judge -----------------------------------------------------------------------------------------

JUDGE_SYSTEM = (
    "Act as an impartial judge of the mathematical equivalence of two answers to the problem shown. Ignore "
    "formatting; consider only whether they are mathematically equivalent. End with exactly one verdict label: "
    "[[A=B]] if they are equivalent, [[A!=B]] if they differ."
)
JUDGE_USER = "<|Problem|>\n{question}\n\n<|Answer A|>\n{first}\n\n<|Answer B|>\n{second}"
EQUAL, NOT_EQUAL = "[[A=B]]", "[[A!=B]]"


def second_opinion(
    cfg: LLMJudgeConfig, group: RolloutGroup, answers: list[str | None], verdicts: list[Verdict], budget_s: float
) -> list[Verdict]:
    """Ask the LLM judge about every "incorrect" answer, concurrently, within `budget_s`; "correct" if it agrees
    the answers are equivalent. An unreachable or slow judge leaves the library's verdict."""
    # "no_answer" too: under NeMo Gym's rule math-verify may find nothing in an answer the model can still read
    asks = [i for i, v in enumerate(verdicts) if v in ("incorrect", "no_answer") and answers[i] is not None]
    if not asks or budget_s <= 0:
        return verdicts
    deadline = time.monotonic() + budget_s
    out = list(verdicts)
    with ThreadPoolExecutor(max_workers=min(LLM_JUDGE_THREADS, len(asks))) as pool:
        futures = {
            pool.submit(
                llm_equivalent, cfg, group.prompt.text, group.prompt.ground_truth, answers[i] or "", deadline
            ): i
            for i in asks
        }
        done, _ = wait_futures(futures, timeout=budget_s)
        for future in done:
            if future.result() is True:
                out[futures[future]] = "correct"
    return out


def llm_equivalent(cfg: LLMJudgeConfig, question: str, expected: str, answer: str, deadline: float) -> bool | None:
    """True/False from the judge model, None if it could not say (error, timeout, no label)."""
    first = _ask(cfg, question, expected, answer, deadline)
    if first is not True or not cfg.both_orders:
        return first
    return _ask(cfg, question, answer, expected, deadline)


def _ask(cfg: LLMJudgeConfig, question: str, first: str, second: str, deadline: float) -> bool | None:
    timeout = min(cfg.timeout_s, deadline - time.monotonic())
    if timeout <= 0:
        return None
    body = {
        "model": cfg.model,
        "messages": [
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_USER.format(question=question, first=first, second=second)},
        ],
        "max_tokens": cfg.max_tokens,
        "temperature": 0.0,
    }
    headers = {"Content-Type": "application/json"}
    if os.environ.get(cfg.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[cfg.api_key_env]}"
    url = cfg.base_url.rstrip("/") + "/chat/completions"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            text = json.loads(reply.read())["choices"][0]["message"]["content"] or ""
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        log.warning("LLM judge at %s gave no verdict: %s", url, exc)
        return None
    if NOT_EQUAL in text:
        return False
    return True if EQUAL in text else None
