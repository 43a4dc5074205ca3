"""Judge workers end to end: real `celery worker` processes on the real redis-server fixture.

Each test submits RolloutGroups the way a generation worker does (`submit_group`) and reads the ScoredGroups
the learner would read from the scored stream. The per-answer budget is 2 s so pathological inputs stay cheap.
"""

from __future__ import annotations

import http.server
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from broker.judge_queue import TASK_NAME, submit_group, submit_groups
from broker.keys import Keys
from broker.registry import Registry
from broker.schemas import Array, DeadLetter, Prompt, RolloutGroup, Sample, ScoredGroup, decode, encode
from broker.streams import PAYLOAD_FIELD
from tests.integration.judge_support import judge_argv, judge_config_file
from workers.judge.app import make_app
from workers.judge.config import JudgeConfig, LLMJudgeConfig

REPO = Path(__file__).resolve().parents[2]
BUDGET = JudgeConfig(
    answer_timeout_s=2.0, group_timeout_s=12.0, task_time_limit_s=20.0, visibility_timeout_s=25.0, child_memory_mb=4096
)
WAIT_S = 90.0  # generous bound on waits for the worker: the machine is shared

NESTED_POWER = "\\boxed{\\dfrac{5^{5^{5^{5}}}}{3}}"
# The geometric-series identity, written out term by term so math-verify parses and simplifies all of it.
X800 = "Answer: $\\frac{x^{800}-1}{x-1}-(" + "+".join(["1", "x"] + [f"x^{{{k}}}" for k in range(2, 800)]) + ")$"
DEEP_LEFT = "\\boxed{" + "\\left(" * 10_000 + "1" + "\\right)" * 10_000 + "}"


def make_group(ground_truth: str, texts: list[str], group_id: str | None = None) -> RolloutGroup:
    def sample(text: str) -> Sample:
        return Sample(Array.from_numpy([1, 2], "int32"), Array.from_numpy([-0.5, -0.25], "float32"), "stop", text)

    prompt = Prompt("p-0", Array.from_numpy([5, 6, 7], "int32"), ground_truth, text="What is it?")
    gid = group_id or f"p-0@{uuid.uuid4().hex[:8]}"
    return RolloutGroup(group_id=gid, batch_id="b-0", prompt=prompt, samples=[sample(t) for t in texts],
                        policy_version=3, worker_id="gen-0")  # fmt: skip


class Judge:
    """One `rlq worker judge` subprocess (a Celery worker) and the client side of its run."""

    def __init__(self, url: str, run: str, cfg: JudgeConfig, log_path: Path, concurrency: int = 2) -> None:
        self.run, self.keys, self.log_path = run, Keys(run), log_path
        self.app = make_app(url, run, cfg)
        self.r = redis.Redis.from_url(url)
        config = judge_config_file(log_path.parent / "configs", url, run, cfg)
        self.log = log_path.open("ab")
        # Own session: a test can SIGKILL the whole worker (main, pool and verifier processes) like a lost node.
        self.proc = subprocess.Popen(
            judge_argv(config, concurrency), cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.node = f"judge-{run}-{self.proc.pid}@{socket.gethostname()}"
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            if self.app.control.ping(destination=[self.node], timeout=0.5):
                return
        raise AssertionError(f"worker never answered ping:\n{self.log_path.read_text()[-3000:]}")

    def scored(self, count: int) -> list[ScoredGroup]:
        """Wait until the scored stream holds `count` entries; return them all (decoded)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            entries = self.r.xrange(self.keys.scored)
            if len(entries) >= count:
                return [decode(fields[PAYLOAD_FIELD], ScoredGroup) for _, fields in entries]  # type: ignore[misc]
            time.sleep(0.05)
        raise AssertionError(f"{len(entries)} of {count} scored groups:\n{self.log_path.read_text()[-3000:]}")

    def dead(self) -> list[DeadLetter]:
        return [decode(f[PAYLOAD_FIELD], DeadLetter) for _, f in self.r.xrange(self.keys.dead)]  # type: ignore[misc]

    def kill_everything(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def judge(redis_server, tmp_path_factory) -> Iterator[Judge]:
    """Two pool processes (concurrency=2) shared by the tests that do not kill anything."""
    worker = Judge(redis_server.url, f"j{uuid.uuid4().hex[:8]}", BUDGET, tmp_path_factory.mktemp("judge") / "w.log")
    yield worker
    worker.stop()


def by_id(groups: list[ScoredGroup]) -> dict[str, ScoredGroup]:
    return {g.group_id: g for g in groups}


def test_correct_incorrect_no_answer_and_equivalent_forms(judge):
    before = len(judge.r.xrange(judge.keys.scored))
    groups = [
        # LaTeX between $..$: the default rule (NeMo Gym's) lets math-verify find it only inside delimiters
        make_group("\\frac{3}{4}", ["Thinking...\nAnswer: 3/4", "Answer: 0.75", "Answer: $\\dfrac{3}{4}$",
                                    "so \\boxed{\\frac{6}{8}}", "Answer: 4/3", "I give up."]),
        make_group("1234", ["Answer: 1,234", "Answer: $1{,}234$", "\\boxed{1234}", "Answer: 1,243"]),
        make_group("$\\frac{\\sqrt{2}}{2}$",
                   ["Answer: $\\frac{\\sqrt2}{2}$", "Answer: $\\sqrt{2}/2$", "Answer: $\\sqrt{2}$"]),
    ]  # fmt: skip
    for group in groups:
        submit_group(judge.app, judge.run, group)
    scored = by_id(judge.scored(before + len(groups)))
    expected = [
        ["correct", "correct", "correct", "correct", "incorrect", "no_answer"],
        ["correct", "correct", "correct", "incorrect"],
        ["correct", "correct", "incorrect"],
    ]
    for group, verdicts in zip(groups, expected, strict=True):
        result = scored[group.group_id]
        assert result.verdicts == verdicts
        assert result.rewards.dtype == "float32"
        assert result.rewards.to_numpy().tolist() == [1.0 if v == "correct" else 0.0 for v in verdicts]
        assert result.rollout == group, "the rollout travels unchanged (token ids, logprobs, policy version)"
        assert result.judge_id.startswith("judge-")


def test_pathological_inputs_time_out_and_the_worker_serves_the_next_task(judge):
    before = len(judge.r.xrange(judge.keys.scored))
    hard = make_group("0", [NESTED_POWER, X800, DEEP_LEFT, "Answer: 0"])
    easy = make_group("7", ["Answer: 7", "Answer: 8"])
    submit_group(judge.app, judge.run, hard)
    submit_group(judge.app, judge.run, easy)
    scored = by_id(judge.scored(before + 2))
    assert scored[hard.group_id].verdicts == ["timeout", "timeout", "timeout", "correct"]
    assert scored[hard.group_id].timings["verify_s"] < BUDGET.group_timeout_s, "every answer stopped at its deadline"
    assert scored[easy.group_id].verdicts == ["correct", "incorrect"]
    # The same process keeps serving: another group after the three SIGKILLed children.
    again = make_group("7", ["Answer: 7"])
    submit_group(judge.app, judge.run, again)
    assert by_id(judge.scored(before + 3))[again.group_id].verdicts == ["correct"]


def test_several_groups_per_task_are_scored_and_published_one_by_one(judge):
    before = len(judge.r.xrange(judge.keys.scored))
    # The first group needs 2 x 2 s; the task budget (time limit - margin - group timeout = 3 s) is then spent,
    # so the other groups go back to the queue as a new task instead of risking the hard time limit.
    groups = [make_group("5", [NESTED_POWER, NESTED_POWER, "Answer: 5"])]
    groups += [make_group(str(n), [f"Answer: {n}", "Answer: 0"]) for n in range(1, 6)]
    (result,) = submit_groups(judge.app, judge.run, groups, groups_per_task=len(groups))
    assert result.id == f"{groups[0].group_id}+5"
    scored = by_id(judge.scored(before + len(groups)))
    assert scored[groups[0].group_id].verdicts == ["timeout", "timeout", "correct"]
    for group in groups[1:]:
        assert scored[group.group_id].verdicts == ["correct", "incorrect"]
    assert len(judge.r.xrange(judge.keys.scored)) == before + len(groups), "each group published once"
    assert b"requeued 5 groups" in judge.log_path.read_bytes()


def test_a_pickled_message_is_refused_and_never_unpickled(judge, tmp_path):
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    body = pickle.dumps(((Exploit(),), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}))
    headers = {"lang": "py", "task": TASK_NAME, "id": str(uuid.uuid4()), "root_id": None, "parent_id": None,
               "group": None, "retries": 0, "eta": None, "expires": None, "timelimit": [None, None],
               "argsrepr": "()", "kwargsrepr": "{}", "origin": "test"}  # fmt: skip
    with judge.app.connection_for_write() as conn:  # kombu directly, not through Celery's send_task
        conn.default_channel.basic_publish(
            conn.default_channel.prepare_message(
                body, content_type="application/x-python-serialize", content_encoding="binary", headers=headers
            ),
            exchange="",
            routing_key=judge.keys.judge_queue,
        )
    before = len(judge.r.xrange(judge.keys.scored))
    follow_up = make_group("2", ["Answer: 2"])
    submit_group(judge.app, judge.run, follow_up)
    assert by_id(judge.scored(before + 1))[follow_up.group_id].verdicts == ["correct"]
    assert not marker.exists(), "the pickle was never loaded"
    assert b"Refusing to deserialize untrusted content of type pickle" in judge.log_path.read_bytes()


def test_undecodable_payload_goes_to_the_dead_letter_stream(judge):
    judge.app.send_task(TASK_NAME, args=(b"\x92not a rollout group",), queue=judge.keys.judge_queue, task_id="bad-1")
    deadline = time.monotonic() + WAIT_S
    while not judge.dead() and time.monotonic() < deadline:
        time.sleep(0.05)
    (letter,) = judge.dead()
    assert letter.entry_id == "bad-1" and letter.source_stream == judge.keys.judge_queue
    assert letter.reason.startswith("undecodable rollout group")
    assert letter.payload == b"\x92not a rollout group"


def _pool_pids(worker: Judge) -> list[int]:
    return [child.pid for child in psutil.Process(worker.proc.pid).children()]  # pool processes, not verifiers


def test_sigkill_of_the_pool_process_mid_task_redelivers_and_scores_once(redis_server, run_name, tmp_path):
    worker = Judge(redis_server.url, run_name, BUDGET, tmp_path / "w.log", concurrency=1)
    try:
        # Two answers that each need their whole 2 s: the kill lands mid-task even on a loaded machine.
        group = make_group("5", [NESTED_POWER, NESTED_POWER, "Answer: 5", "Answer: 6"])
        submit_group(worker.app, worker.run, group)
        victim, deadline = None, time.monotonic() + WAIT_S
        while victim is None and time.monotonic() < deadline:  # `celery inspect active` on the live worker
            active = (worker.app.control.inspect(destination=[worker.node], timeout=1.0).active() or {}).get(
                worker.node, []
            )
            victim = next((t["worker_pid"] for t in active if t["id"] == group.group_id), None)
        assert victim is not None, "the task never showed up as active"
        verifier_children = [c.pid for c in psutil.Process(victim).children()]
        os.kill(victim, signal.SIGKILL)  # mid-task

        (scored,) = worker.scored(1)
        assert scored.group_id == group.group_id
        assert scored.verdicts == ["timeout", "timeout", "correct", "incorrect"]
        assert victim not in _pool_pids(worker), "a fresh pool process ran the redelivered task"
        for pid in verifier_children:  # PDEATHSIG: the dead pool process's verifier did not linger
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        # Submitting the same group again (a generation worker retrying) adds nothing.
        submit_group(worker.app, worker.run, group)
        marker = make_group("1", ["Answer: 1"])
        submit_group(worker.app, worker.run, marker)
        groups = worker.scored(2)
        assert [g.group_id for g in groups] == [group.group_id, marker.group_id], "the group is scored exactly once"
        assert worker.dead() == []
    finally:
        worker.stop()


class _FakeJudgeModel(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint stand-in: no LLM server can run here, so this answers by rule.

    It says "equivalent" when the user message contains "half", "different" for anything else, and stalls
    past the client's timeout when it contains "slow"."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)  # type: ignore[attr-defined]
        user = body["messages"][-1]["content"]
        if "slow" in user:
            time.sleep(3.0)
        verdict = "[[A=B]]" if "half" in user else "[[A!=B]]"
        reply = {"choices": [{"message": {"role": "assistant", "content": f"My final verdict: {verdict}"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def judge_model() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudgeModel)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_llm_judge_is_asked_only_about_incorrect_answers(redis_server, run_name, tmp_path, judge_model):
    host, port = judge_model.server_address[:2]
    llm = LLMJudgeConfig(enabled=True, base_url=f"http://{host}:{port}/v1", model="judge", timeout_s=1.0)
    worker = Judge(redis_server.url, run_name, BUDGET.model_copy(update={"llm_judge": llm}), tmp_path / "w.log")
    try:
        group = make_group("\\frac{1}{2}", ["Answer: 1/2", "Answer: one half", "Answer: 3", "Answer: slow", "nothing"])
        submit_group(worker.app, worker.run, group)
        (scored,) = worker.scored(1)
        # library (NeMo Gym's rule): correct, no_answer (math-verify finds no number in "one half"), incorrect,
        # no_answer, no_answer; the judge model is asked about every answer with a readable final answer that the
        # library did not accept, flips only "one half", confirmed in both orders; the slow reply times out and
        # the library's verdict stands.
        assert scored.verdicts == ["correct", "correct", "incorrect", "no_answer", "no_answer"]
        asked = sorted(r["messages"][-1]["content"].rsplit("\n", 1)[-1] for r in judge_model.requests)
        assert asked == ["3", "\\frac{1}{2}", "one half", "slow"], "never asked about correct or empty answers"
        assert "llm_judge_s" in scored.timings
    finally:
        worker.stop()


@pytest.mark.slow
def test_a_task_held_by_a_killed_worker_is_redelivered_after_the_visibility_timeout(redis_server, run_name, tmp_path):
    # Small bounds so the test is short: redelivery within visibility_timeout_s + restore_interval_s = 15 s.
    quick = JudgeConfig(answer_timeout_s=2.0, group_timeout_s=8.0, task_time_limit_s=13.5, visibility_timeout_s=14.0,
                        restore_interval_s=1.0)  # fmt: skip
    first = Judge(redis_server.url, run_name, quick, tmp_path / "a.log", concurrency=1)
    group = make_group("5", [NESTED_POWER, NESTED_POWER, NESTED_POWER, "Answer: 5"])  # ~6 s: killed mid-task
    try:
        submit_group(first.app, first.run, group)
        deadline = time.monotonic() + WAIT_S
        while not first.app.control.inspect(destination=[first.node], timeout=1.0).active():
            assert time.monotonic() < deadline, "the task never started"
        first.kill_everything()  # main process, pool process and verifier child at once: a lost node
    finally:
        first.stop()
    assert first.r.xlen(first.keys.scored) == 0, "nobody finished the task before the kill"
    second = Judge(redis_server.url, run_name, quick, tmp_path / "b.log", concurrency=1)
    try:
        (scored,) = second.scored(1)
        assert scored.group_id == group.group_id and scored.verdicts == ["timeout", "timeout", "timeout", "correct"]
        pool = {str(pid) for pid in _pool_pids(second)}
        assert scored.judge_id.rsplit("-", 1)[-1] in pool, "the second worker scored it"
        assert second.dead() == []
    finally:
        second.stop()


def _active_pid(worker: Judge, task_id: str, not_in: set[int]) -> int:
    """The pool process running `task_id`, as `celery inspect active` reports it (a new one, not in `not_in`)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        replies = worker.app.control.inspect(destination=[worker.node], timeout=1.0).active() or {}
        for task in replies.get(worker.node, []):
            if task["id"] == task_id and task["worker_pid"] not in not_in:
                return int(task["worker_pid"])
    raise AssertionError(f"task {task_id} never became active again:\n{worker.log_path.read_text()[-3000:]}")


@pytest.mark.slow
def test_a_group_that_kills_every_pool_process_is_dead_lettered_after_max_deliveries(redis_server, run_name, tmp_path):
    worker = Judge(redis_server.url, run_name, BUDGET, tmp_path / "w.log", concurrency=1)
    try:
        group = make_group("5", [NESTED_POWER, NESTED_POWER, "Answer: 5"])
        submit_group(worker.app, worker.run, group)
        killed: set[int] = set()
        for _ in range(BUDGET.max_deliveries):  # each run dies mid-task, like an input that crashes the process
            pid = _active_pid(worker, group.group_id, killed)
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        deadline = time.monotonic() + WAIT_S
        while not worker.dead() and time.monotonic() < deadline:
            time.sleep(0.05)
        (letter,) = worker.dead()
        assert letter.entry_id == group.group_id and "WorkerLostError" in letter.reason
        assert letter.deliveries == BUDGET.max_deliveries
        assert letter.payload == encode(group), "the original bytes, ready for `rlq dlq requeue`"
        assert worker.r.xlen(worker.keys.scored) == 0
    finally:
        worker.stop()


def test_rlq_worker_judge_is_a_plain_celery_worker(redis_server, run_name, tmp_path):
    """`rlq worker judge` runs Celery's own worker command in its process: Celery's remote control reaches it by the
    node name it announces, with the pid of the process the user started, and it serves the run's queue."""
    config = judge_config_file(tmp_path, redis_server.url, run_name)
    with (tmp_path / "cli.log").open("wb") as log:
        proc = subprocess.Popen(judge_argv(config, 1), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            app = make_app(redis_server.url, run_name)
            node = f"judge-{run_name}-{proc.pid}@{socket.gethostname()}"  # the same process, no exec or wrapper
            deadline = time.monotonic() + WAIT_S
            while not app.control.ping(destination=[node], timeout=0.5):
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "cli.log").read_text()
            registry = Registry(redis.Redis.from_url(redis_server.url), Keys(run_name))
            while not [s for s in registry.workers("judge") if s.alive]:  # listed while idle, before any task
                assert time.monotonic() < deadline, (tmp_path / "cli.log").read_text()
                time.sleep(0.2)
            assert {s.heartbeat.status for s in registry.workers("judge")} == {"idle"}
            group = make_group("2", ["Answer: 2"])
            submit_group(app, run_name, group)
            r = redis.Redis.from_url(redis_server.url)
            while not r.xlen(Keys(run_name).scored):
                assert time.monotonic() < deadline, (tmp_path / "cli.log").read_text()
                time.sleep(0.05)
            ((_, fields),) = r.xrange(Keys(run_name).scored)
            assert decode(fields[PAYLOAD_FIELD], ScoredGroup).verdicts == ["correct"]  # type: ignore[union-attr]
            # Celery's own tools, as an operator types them, load the app module and reach the worker.
            inspect = subprocess.run([sys.executable, "-m", "celery", "-A", "workers.judge.celery_app", "--broker",
                                      redis_server.url, "inspect", "ping", "-d", node], cwd=REPO, capture_output=True,
                                     text=True, timeout=60)  # fmt: skip
            assert inspect.returncode == 0 and "pong" in inspect.stdout, inspect.stdout + inspect.stderr
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, "a warm shutdown on SIGTERM exits 0"
