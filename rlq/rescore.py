"""`rlq rescore`: judge a run's logged rollouts again with other judge settings, through Celery judges.

The rollout log (learner/rollout_log.py) keeps every group the learner trained on or dropped, with the judge's
verdict per sample. Re-scoring rebuilds each logged group as the RolloutGroup the judges once received and hands
it to judge workers started exactly as `rlq train` starts them (`rlq worker judge --config`), with the run's
`env.math` plus the overrides given (another answer rule, a longer deadline, the LLM judge on). The judges run
under a run name of their own on a private, password-protected Redis, so nothing of the original run (its keys,
its queue, its idempotency marks) is touched, and it works after the run has ended.

What comes back is compared sample by sample: a matrix of verdict kinds before -> after (the flips by kind), the
mean reward before and after, and one Parquet row per sample (`rescored.parquet`) for pandas.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.errors import UserError
from broker.schemas import VERDICTS, Array, Prompt, RolloutGroup, Sample, ScoredGroup

log = logging.getLogger(__name__)

RESCORE_SUFFIX = "-rescore"
"""The judges' run name is the original's with this suffix: their queue and scored stream are their own."""
LOG_COLUMNS = [
    "step", "dropped_reason", "group_index", "sample_index", "group_id", "prompt_id", "batch_id", "policy_version",
    "worker_id", "temperature", "prompt_ids", "prompt_text", "ground_truth", "completion_ids", "completion_text",
    "finish_reason", "behaviour_logprobs", "reward", "verdict",
]  # fmt: skip


@dataclass
class LoggedGroup:
    """One group of the log as the judges first saw it, with the verdicts and rewards they gave then."""

    rollout: RolloutGroup
    step: int
    dropped_reason: str | None
    verdicts: list[str]
    rewards: list[float]


@dataclass
class Comparison:
    """Verdicts before -> after, sample by sample, over the groups re-scored."""

    flips: Counter[tuple[str, str]] = field(default_factory=Counter)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, logged: LoggedGroup, scored: ScoredGroup) -> None:
        after_rewards = scored.rewards.to_numpy().tolist()
        for index, (before, after) in enumerate(zip(logged.verdicts, scored.verdicts, strict=True)):
            self.flips[(before, after)] += 1
            self.rows.append({
                "group_id": logged.rollout.group_id, "sample_index": index, "step": logged.step,
                "dropped_reason": logged.dropped_reason, "verdict_before": before, "verdict_after": after,
                "reward_before": logged.rewards[index], "reward_after": float(after_rewards[index]),
            })  # fmt: skip

    def summary(self) -> dict[str, Any]:
        samples = sum(self.flips.values())
        before, after = Counter[str](), Counter[str]()
        for (b, a), n in self.flips.items():
            before[b] += n
            after[a] += n
        changed = {f"{b}->{a}": n for (b, a), n in sorted(self.flips.items()) if b != a}
        mean = lambda key: sum(r[key] for r in self.rows) / len(self.rows) if self.rows else None  # noqa: E731
        return {
            "samples": samples, "changed": sum(changed.values()), "flips": changed,
            "verdicts_before": dict(sorted(before.items())), "verdicts_after": dict(sorted(after.items())),
            "mean_reward_before": mean("reward_before"), "mean_reward_after": mean("reward_after"),
        }  # fmt: skip


def logged_groups(table, tokenizer_path: str | None) -> list[LoggedGroup]:
    """The log's rows (a pyarrow Table with LOG_COLUMNS) as groups, each group once (a group both trained and
    logged again as a duplicate drop is re-scored once). Completions logged without text (`keep_text` off) are
    decoded with the policy's tokenizer at `tokenizer_path`."""
    rows = table.to_pylist()
    rows.sort(key=lambda r: (r["step"], r["dropped_reason"] is not None, r["group_index"], r["group_id"],
                             r["sample_index"]))  # fmt: skip
    by_group: dict[str, list[dict[str, Any]]] = {}
    first_key: dict[str, tuple] = {}
    for row in rows:
        key = (row["step"], row["dropped_reason"], row["group_index"])
        if first_key.setdefault(row["group_id"], key) == key:
            by_group.setdefault(row["group_id"], []).append(row)
    decode = _decoder(tokenizer_path, rows)
    return [_group(samples, decode) for samples in by_group.values()]


def _decoder(tokenizer_path: str | None, rows: list[dict[str, Any]]):
    if all(r["completion_text"] is not None for r in rows):
        return None
    if tokenizer_path is None:
        raise UserError("the rollout log has no completion text (logger.rollout_log.keep_text was off) and the run's "
                        "policy.model_name cannot be found to decode it: pass policy.model_name=DIR")  # fmt: skip
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def _group(rows: list[dict[str, Any]], decode) -> LoggedGroup:
    head = rows[0]
    samples = []
    for row in rows:
        text = row["completion_text"] if row["completion_text"] is not None else decode(row["completion_ids"])
        samples.append(Sample(
            token_ids=Array.from_numpy(row["completion_ids"], "int32"),
            logprobs=Array.from_numpy(row["behaviour_logprobs"], "float32"),
            finish_reason=row["finish_reason"], text=text,
        ))  # fmt: skip
    prompt = Prompt(prompt_id=head["prompt_id"], token_ids=Array.from_numpy(head["prompt_ids"], "int32"),
                    ground_truth=head["ground_truth"], text=head["prompt_text"] or "")  # fmt: skip
    rollout = RolloutGroup(group_id=head["group_id"], batch_id=head["batch_id"], prompt=prompt, samples=samples,
                           policy_version=head["policy_version"], worker_id=head["worker_id"],
                           temperature=head["temperature"])  # fmt: skip
    return LoggedGroup(rollout, head["step"], head["dropped_reason"], [r["verdict"] for r in rows],
                       [float(r["reward"]) for r in rows])  # fmt: skip


def unknown_verdicts(groups: list[LoggedGroup]) -> set[str]:
    return {v for g in groups for v in g.verdicts} - set(VERDICTS)


class JudgePool:
    """A private Redis (random password, loopback) and `count` judge processes started as `rlq train` starts them."""

    def __init__(self, config_path: Path, work_dir: Path, count: int, concurrency: int) -> None:
        from broker.server import RedisServer

        self.password = secrets.token_urlsafe(24)
        self.server = RedisServer(directory=work_dir / "redis", password=self.password)
        self.config_path, self.work_dir, self.count, self.concurrency = config_path, work_dir, count, concurrency
        self.processes: list[subprocess.Popen] = []
        self._password_before: list[str | None] = []  # the caller's RLQ_REDIS_PASSWORD, once start() replaced it

    @property
    def url(self) -> str:
        """The server's URL without its password (that travels in RLQ_REDIS_PASSWORD)."""
        return f"redis://{self.server.host}:{self.server.port}/0"

    def start(self) -> JudgePool:
        from broker.connection import PASSWORD_ENV
        from rlq.config import BROKER_URL_ENV

        self.server.start()
        env = {**os.environ, PASSWORD_ENV: self.password, BROKER_URL_ENV: self.url, "PYTHONUNBUFFERED": "1"}
        (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        for index in range(self.count):
            argv = [sys.executable, "-m", "rlq", "worker", "judge", "--config", str(self.config_path),
                    "--concurrency", str(self.concurrency), "--loglevel", "WARNING"]  # fmt: skip
            with open(self.work_dir / "logs" / f"judge-{index}.log", "ab") as sink:
                self.processes.append(subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                                       stdin=subprocess.DEVNULL, start_new_session=True))  # fmt: skip
        # This process's clients (the Celery producer reads it from the environment, as every role does) log in too.
        self._password_before = [os.environ.get(PASSWORD_ENV)]
        os.environ[PASSWORD_ENV] = self.password
        return self

    def check_alive(self) -> None:
        for index, proc in enumerate(self.processes):
            if proc.poll() is not None:
                raise UserError(f"judge {index} exited with {proc.returncode}: see "
                                f"{self.work_dir / 'logs' / f'judge-{index}.log'}")  # fmt: skip

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()  # Celery's warm shutdown
        for proc in self.processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.server.stop()
        if self._password_before:
            from broker.connection import PASSWORD_ENV

            (before,) = self._password_before
            if before is None:
                os.environ.pop(PASSWORD_ENV, None)
            else:
                os.environ[PASSWORD_ENV] = before


def rescore(groups: list[LoggedGroup], run: str, pool: JudgePool, timeout_s: float) -> tuple[Comparison, list[str]]:
    """Queue every group for the pool's judges of run `run`, wait for each ScoredGroup (or its dead letter).

    Returns the comparison and the ids of groups the judges dead-lettered.
    Raises:
        UserError: a judge process died, or the groups did not all come back within `timeout_s`.
    """
    from broker.connection import connect
    from broker.judge_queue import base_app, submit_groups
    from broker.keys import Keys
    from broker.schemas import MessageError, decode
    from broker.streams import payload_of

    keys = Keys(run)
    client = connect(pool.url, client_name="rlq-rescore")
    submit_groups(base_app(pool.url, run), run, [g.rollout for g in groups])
    waiting = {g.rollout.group_id: g for g in groups}
    comparison, dead, cursors = Comparison(), [], {keys.scored: "0-0", keys.dead: "0-0"}
    deadline = time.monotonic() + timeout_s
    while waiting:
        if time.monotonic() > deadline:
            raise UserError(f"{len(waiting)} of {len(groups)} groups not scored within {timeout_s:.0f} s "
                            f"(--timeout; judge logs in {pool.work_dir / 'logs'})")  # fmt: skip
        pool.check_alive()
        for stream, entries in client.xread(cursors, count=256, block=1000) or []:
            name = stream.decode() if isinstance(stream, bytes) else stream
            for entry_id, fields in entries:
                cursors[name] = entry_id
                payload, reason = payload_of(fields)
                if name == keys.dead:
                    dead.extend(_dead_group_ids(payload, waiting))
                    continue
                try:
                    scored = decode(payload, ScoredGroup)
                except MessageError:
                    continue  # not ours to judge; the run's own inspection tools show it
                logged = waiting.pop(scored.group_id, None)  # type: ignore[attr-defined]
                if logged is not None:
                    comparison.add(logged, scored)
    client.close()
    return comparison, dead


def _dead_group_ids(payload: bytes, waiting: dict[str, LoggedGroup]) -> list[str]:
    """The group a judge's dead letter stands for (the judge names it by group id), if it is one we wait for."""
    from broker.schemas import DeadLetter, MessageError, decode

    try:
        letter = decode(payload, DeadLetter)
    except MessageError:
        return []
    group_id = letter.entry_id  # type: ignore[attr-defined]
    return [group_id] if waiting.pop(group_id, None) is not None else []
