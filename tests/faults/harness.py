"""The fault-injection harness: the real loop as separate processes (private redis-server with the run's ACL users
of broker/acl.py and AOF, a Celery judge, generation workers, the learner under torchrun, each role logged in as
its own user) that a test can kill, stop and restart,
and the `Ledger` that judges a run afterwards: every group the feeder published is trained exactly once,
dropped with a counted reason, or still accounted for in flight; never lost, never trained twice.

Generation workers use the transformers backend (`policy.generation.backend=hf`): the machine runs at most one
vLLM engine at a time and several scenarios need two workers; the vLLM worker is covered by tests/e2e.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis

from broker.acl import ADMIN, GENERATE, JUDGE, LEARNER, password_for, role_env, write_acl_file
from broker.keys import Keys
from broker.schemas import MessageError, PromptBatch, ScoredGroup, decode
from broker.server import RedisServer
from rlq.data import ArithConfig, prepare_arith

REPO = Path(__file__).resolve().parents[2]
SECRET = "fault-suite-secret"
"""The run secret: each role gets its own user's password derived from it (broker/acl.py)."""
PASSWORD = "fault-suite-admin"
"""The test's own `rlq-admin` user (every right), which injects the faults; no role holds it."""


@dataclass
class Role:
    name: str
    argv: list[str]
    process: subprocess.Popen
    log_path: Path


@dataclass
class LoopRun:
    """One run of the loop; roles are started and signalled one by one."""

    tmp: Path
    model_dir: Path
    overrides: list[str] = field(default_factory=list)
    run_name: str = field(default_factory=lambda: f"f{uuid.uuid4().hex[:8]}")
    server: RedisServer | None = None
    roles: dict[str, Role] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.tmp / "run"

    @property
    def keys(self) -> Keys:
        return Keys(self.run_name)

    def start_redis(self, port: int = 0) -> RedisServer:
        acl = write_acl_file(self.tmp / "users.acl", self.run_name, SECRET, admin_password=PASSWORD)
        self.server = RedisServer(directory=self.tmp / "redis", appendonly=True, acl_file=acl, port=port)
        # appendfsync always: a SIGKILLed server loses nothing it acknowledged (the default loses up to 1 s)
        self.server.extra_args = ["--appendfsync", "always"]
        return self.server.start()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.port}/0"  # no password in the URL: it comes from the env

    def client(self, **kw):
        return redis.Redis.from_url(self.url, username=ADMIN, password=PASSWORD, socket_timeout=10, **kw)

    def url_as(self, user: str) -> str:
        """The broker URL with `user`'s credentials in it (a client that is not a role: Celery apps of a test)."""
        assert self.server is not None
        return f"redis://{user}:{password_for(SECRET, user)}@127.0.0.1:{self.server.port}/0"

    def write_config(self) -> Path:
        from rlq.config import load_run_config, save_resolved

        data_dir = self.tmp / "arith"
        if not data_dir.exists():
            prepare_arith(data_dir, ArithConfig(n_train=200, n_val=20, seed=3))
        overrides = [
            f"run_name={self.run_name}", f"broker.url={self.url}", f"policy.model_name={self.model_dir}",
            f"data.path={data_dir}", f"logger.log_dir={self.run_dir}", "logger.wandb_enabled=false",
            f"checkpointing.checkpoint_dir={self.run_dir / 'ckpt'}", "checkpointing.save_period=1",
            "grpo.num_prompts_per_step=8", "grpo.num_generations_per_prompt=4", "grpo.prompts_per_message=4",
            "policy.generation.backend=hf", "policy.generation.max_new_tokens=16",
            # The ledger audits the whole log afterwards, so the roles keep acknowledged entries; the trimming
            # scenario turns trimming back on and records the streams as they go.
            "broker.trim_acked=false",
            "grpo.val_at_start=false", "grpo.val_period=0",  # the ledger audits training groups
            *self.overrides,
        ]  # fmt: skip
        cfg = load_run_config(REPO / "configs" / "tiny_arith_cpu.yaml", overrides)
        path = self.tmp / "config.yaml"
        save_resolved(cfg, path)
        return path

    def _env(self, user: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RLQ_REDIS_")}
        return {**env, "PYTHONUNBUFFERED": "1", "RLQ_RUN": self.run_name, **role_env(SECRET, user)}

    def start(self, name: str, argv: list[str], user: str) -> Role:
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        with open(log_path, "ab") as sink:
            process = subprocess.Popen(argv, env=self._env(user), stdout=sink, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.tmp)  # fmt: skip
        role = Role(name, argv, process, log_path)
        self.roles[name] = role
        return role

    def start_judge(self, concurrency: int = 1) -> Role:
        cfg = str(self.tmp / "config.yaml")
        argv = [sys.executable, "-m", "rlq", "worker", "judge", "--config", cfg, "--concurrency", str(concurrency)]
        return self.start("judge", argv, JUDGE)

    def start_generate(self, index: int) -> Role:
        cfg = str(self.tmp / "config.yaml")
        worker_id = f"{self.run_name}-gen-{index}"
        argv = [sys.executable, "-m", "rlq", "worker", "generate", "--config", cfg, "--worker-id", worker_id]
        return self.start(f"generate-{index}", argv, GENERATE)

    def start_learner(self) -> Role:
        cfg = str(self.tmp / "config.yaml")
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                "-m", "rlq", "learner", "--config", cfg]  # fmt: skip
        return self.start("learner", argv, LEARNER)

    def start_all(self, generation_workers: int = 1) -> None:
        self.start_redis()
        self.write_config()
        self.start_judge()
        for index in range(generation_workers):
            self.start_generate(index)
        self.start_learner()

    def signal(self, name: str, sig: int) -> None:
        """Signal the role's whole process group (Celery's pool children and torchrun's ranks included)."""
        os.killpg(self.roles[name].process.pid, sig)

    def kill(self, name: str) -> None:
        self.signal(name, signal.SIGKILL)
        self.roles[name].process.wait(timeout=30)

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def step(self) -> int:
        records = self.metrics()
        return int(records[-1]["step"]) if records else 0

    def wait_for(self, predicate, timeout_s: float, what: str) -> float:
        """Poll `predicate` until true; returns the seconds it took. Fails naming `what` and the dead roles."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if predicate():
                return time.monotonic() - started
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; roles: {self.describe()}")

    def wait_step(self, step: int, timeout_s: float = 600) -> float:
        def reached() -> bool:
            if self.step() >= step:
                return True
            learner = self.roles.get("learner")
            if learner is not None and learner.process.poll() is not None:
                raise AssertionError(f"the learner exited before step {step}; {self.describe()}")
            return False

        return self.wait_for(reached, timeout_s, f"step {step}")

    def wait_learner_exit(self, timeout_s: float = 600) -> int:
        process = self.roles["learner"].process
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"learner still running after {timeout_s}s; {self.describe()}") from None

    def describe(self) -> str:
        parts = []
        for name, role in self.roles.items():
            code = role.process.poll()
            tail = role.log_path.read_text(errors="replace").strip().splitlines()[-3:] if code else []
            parts.append(f"{name}={'up' if code is None else code} {' | '.join(tail)[-600:]}")
        return "; ".join(parts)

    def drain(self, timeout_s: float = 180) -> float:
        """After the learner finished: let the workers and judges finish what is in the streams and queues, so
        the ledger sees every group either scored or still unconsumed. Returns seconds taken."""
        ledger = Ledger(self)
        last: list[int] = []

        def settled() -> bool:
            r = self.client()
            try:
                busy = bool(ledger.unconsumed_batches(r)) or r.llen(self.keys.judge_queue) or r.hlen("unacked")
                last.append(r.xlen(self.keys.scored))
            finally:
                r.close()
            return not busy and len(last) >= 6 and len(set(last[-6:])) == 1

        return self.wait_for(settled, timeout_s, "the workers and judges to drain the streams")

    def alive(self, name: str) -> bool:
        return self.roles[name].process.poll() is None

    def stop(self) -> None:
        for role in reversed(list(self.roles.values())):
            if role.process.poll() is None:
                try:
                    os.killpg(role.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        for role in reversed(list(self.roles.values())):
            try:
                role.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(role.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                role.process.wait(timeout=10)
        if self.server is not None:
            self.server.stop()


@dataclass
class Verdict:
    published: int
    trained_once: list[str]
    duplicated: list[str]
    dropped: dict[str, list[str]]
    in_flight: list[str]
    lost: list[str]
    scored_twice: list[str]

    def summary(self) -> dict:
        return {
            "published": self.published, "trained_once": len(self.trained_once), "duplicated": len(self.duplicated),
            "dropped": {k: len(v) for k, v in self.dropped.items()}, "in_flight": len(self.in_flight),
            "lost": len(self.lost), "scored_twice": len(self.scored_twice),
        }  # fmt: skip


class Ledger:
    """Classifies every group the feeder published (prompt stream, whose batch ids follow the data cursor) as
    trained exactly once, trained more than once, dropped (the learner's ledger names the reason), in flight
    (its batch or scored entry is still unconsumed in Redis when the run ended), or lost (none of these)."""

    def __init__(self, run: LoopRun) -> None:
        self.run = run

    def published(self, r) -> dict[str, str]:
        """group id -> batch id, from every PromptBatch in the prompt stream (and its dead letters' originals)."""
        groups: dict[str, str] = {}
        for _, fields in r.xrange(self.run.keys.prompts):
            try:
                message = decode(fields[b"m"])
            except (MessageError, KeyError):
                continue  # the faults we injected ourselves
            if isinstance(message, PromptBatch) and message.purpose == "train":
                for prompt in message.prompts:
                    groups[f"{prompt.prompt_id}@{message.batch_id}"] = message.batch_id
        return groups

    def scored(self, r) -> Counter:
        counts: Counter = Counter()
        for _, fields in r.xrange(self.run.keys.scored):
            try:
                message = decode(fields[b"m"])
            except (MessageError, KeyError):
                continue
            if isinstance(message, ScoredGroup):
                counts[message.rollout.group_id] += 1
        return counts

    def unconsumed_batches(self, r) -> set[str]:
        """Batch ids whose prompt entry no generation worker has acknowledged (pending or never read)."""
        stream = self.run.keys.prompts
        acked_upto = None
        pending: set[bytes] = set()
        for group in r.xinfo_groups(stream):
            acked_upto = group["last-delivered-id"]
            for row in r.xpending_range(stream, group["name"], "-", "+", 10_000):
                pending.add(row["message_id"])
        out = set()
        for entry_id, fields in r.xrange(stream):
            unread = acked_upto is None or _id(entry_id) > _id(acked_upto)
            if unread or entry_id in pending:
                try:
                    message = decode(fields[b"m"])
                except (MessageError, KeyError):
                    continue
                if isinstance(message, PromptBatch):
                    out.add(message.batch_id)
        return out

    def classify(self, recorder: StreamRecorder | None = None) -> Verdict:
        """`recorder`: what a `StreamRecorder` saw, for runs whose streams were trimmed meanwhile."""
        r = self.run.client()
        try:
            published = self.published(r)
            scored = self.scored(r)
            if recorder is not None:
                published.update(recorder.published)
                for group_id in recorder.scored:  # a group id seen in both counts once
                    scored[group_id] = max(scored[group_id], recorder.scored[group_id])
            unconsumed = self.unconsumed_batches(r)
            judge_queue = r.llen(self.run.keys.judge_queue)
        finally:
            r.close()
        records = _ledger_records(self.run.run_dir / "ledger.jsonl")
        trained = Counter(g for rec in records for g in rec["trained"])
        dropped: dict[str, list[str]] = {}
        for rec in records:
            for reason, ids in (rec.get("dropped") or {}).items():
                dropped.setdefault(reason, []).extend(ids)
        dropped_ids = {g for ids in dropped.values() for g in ids}
        once = [g for g in published if trained[g] == 1]
        dup = [g for g in published if trained[g] > 1]
        rest = [g for g in published if trained[g] == 0 and g not in dropped_ids]
        # Not trained yet but safe: scored (the learner holds or will read it), its batch not acknowledged, or
        # groups still queued for the judge (counted as a whole: the queue holds opaque Celery messages).
        in_flight = [g for g in rest if scored[g] or published[g] in unconsumed]
        lost = [g for g in rest if g not in set(in_flight)]
        if judge_queue and lost:
            lost = lost[judge_queue:]  # at most that many may sit in the Celery queue
        return Verdict(
            published=len(published), trained_once=once, duplicated=dup, dropped=dropped, in_flight=in_flight,
            lost=lost, scored_twice=[g for g, n in scored.items() if n > 1],
        )  # fmt: skip


class StreamRecorder(threading.Thread):
    """Reads the prompt and scored streams without a consumer group (so it changes no delivery state) and keeps
    every group id; with `trim=True` it then runs `safe_trim(keep_acked=0)` on both, as hard as trimming gets."""

    def __init__(self, run: LoopRun, trim: bool) -> None:
        super().__init__(daemon=True)
        self.loop, self.trim = run, trim
        self.published: dict[str, str] = {}
        self.scored: Counter = Counter()
        self.trimmed = 0
        self.stopping = threading.Event()

    def run(self) -> None:  # noqa: D102 - Thread.run
        from broker.trim import safe_trim

        keys = self.loop.keys
        last = {keys.prompts: "0-0", keys.scored: "0-0"}
        while not self.stopping.is_set():
            try:
                r = self.loop.client()
                try:
                    for stream, rows in r.xread(last, count=500, block=500) or []:
                        for entry_id, fields in rows:
                            last[stream.decode()] = entry_id.decode()
                            self._note(fields)
                    if self.trim:
                        for stream in (keys.prompts, keys.scored):
                            if r.exists(stream):
                                self.trimmed += safe_trim(r, stream, keep_acked=0)
                finally:
                    r.close()
            except redis.RedisError:
                time.sleep(0.5)

    def _note(self, fields: dict) -> None:
        try:
            message = decode(fields[b"m"])
        except (MessageError, KeyError):
            return
        if isinstance(message, PromptBatch) and message.purpose == "train":
            for prompt in message.prompts:
                self.published[f"{prompt.prompt_id}@{message.batch_id}"] = message.batch_id
        elif isinstance(message, ScoredGroup):
            self.scored[message.rollout.group_id] += 1

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


def _id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _ledger_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


RESULTS_ENV = "RLQ_FAULT_RESULTS"


def record(row: str, **figures) -> None:
    """Append a row's figures to the JSONL file named by $RLQ_FAULT_RESULTS (docs/reliability.md's table comes
    from it); without it, nothing is written."""
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"row": row, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}))
        fh.write("\n")
