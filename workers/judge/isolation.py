"""Hard-kill isolation for math-verify: one pre-forked child per judge process, reused across answers.

A fork per answer (what NeMo Gym does) costs ~8x the verification itself, so the child is forked once, warm
(math-verify imported and exercised in the parent first, so every fork inherits the caches), and fed whole
groups: one pipe write per group and one reply when the group is done. While it works, the child records in
a shared page which answer it is on and since when, and each finished verdict; the parent sleeps until the
reply or the current answer's deadline, whichever is first, so it is not woken once per answer. When a
deadline passes the child is SIGKILLed (no cooperation needed: sympy stuck in C code, a `str()` of a huge
expression, an antlr recursion all stop), the answer is scored "timeout", the verdicts already in the shared
page are kept, and a fresh child is forked for the rest. A child that dies on its own (OOM, crash) scores
its answer "error".

Between parent and child: msgpack via msgspec (never pickle), frames from `Connection.send_bytes`.
  parent -> child: [ground_truth: str, answers: list[str]]
  child -> parent: b"ok" when every verdict is in the shared page; b"empty" | b"bad" if the ground truth
                   could not be parsed (every answer is then "error").
  shared page:     float64 started_at (CLOCK_MONOTONIC, shared by all processes), int64 index (-1: parsing
                   the ground truth), then one byte per answer: 0 = not yet, else 1 + VERDICTS.index(verdict).
Nothing parsed ever crosses: sympy objects stay inside the child and are never stringified.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import multiprocessing
import os
import resource
import signal
import struct
import time
from multiprocessing.connection import Connection

import msgspec

from broker.schemas import VERDICTS, Verdict
from workers.judge.verify import DEFAULT_RULE, AnswerRule, check, parse_gold, quiet_math_verify

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
"""prctl option: the kernel sends the child a signal when the parent thread dies (Linux only)."""
GOLD_OK, GOLD_EMPTY, GOLD_BAD = b"ok", b"empty", b"bad"
PROGRESS = struct.Struct("<dq")  # started_at (monotonic s), index of the answer in progress (-1: ground truth)
MAX_BATCH = 4096
"""Answers per round trip (one byte each in the shared page); longer groups go in several."""

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(tuple[str, list[str]])
_warm = False


def warm_up() -> None:
    """Import math-verify and run it once in this process, so every forked child starts with warm caches."""
    global _warm
    if not _warm:
        quiet_math_verify()
        check(parse_gold("\\frac{1}{2}"), "0.5")  # a constant: cannot hang
        _warm = True


class VerifierChild:
    """The parent's handle on its verifier process. Not thread-safe: one caller at a time.

    Counters (`answers`, `timeouts`, `crashes`, `respawns`) are cumulative for metrics and logs.
    """

    def __init__(self, memory_mb: int = 0, rule: AnswerRule = DEFAULT_RULE) -> None:
        self.memory_mb = memory_mb
        self.rule = rule  # how the child reads answers (workers.judge.verify.check); forks inherit it
        self._pid: int | None = None
        self._exited = False  # reaped already: its pid may belong to someone else now, never signal it
        self._conn: Connection | None = None
        self._page = mmap.mmap(-1, PROGRESS.size + MAX_BATCH)  # anonymous + shared: forks see the same bytes
        self.answers = self.timeouts = self.crashes = self.respawns = 0

    @property
    def pid(self) -> int | None:
        return self._pid

    def start(self) -> None:
        """Fork the child if none is running. A bare os.fork, not multiprocessing.Process: Celery's pool
        processes are daemonic, and multiprocessing refuses to give a daemonic process children."""
        if self._pid is not None:
            return
        warm_up()
        parent_end, child_end = multiprocessing.Pipe(duplex=True)
        pid = os.fork()
        if pid == 0:  # the child never returns into the caller's code (Celery, pytest): it always _exits
            code = 1
            try:
                parent_end.close()
                _child_main(child_end, self._page, self.memory_mb, self.rule)
                code = 0
            finally:
                os._exit(code)
        child_end.close()
        self._pid, self._conn = pid, parent_end

    def close(self) -> None:
        """SIGKILL and reap the child (it holds no state worth a graceful stop)."""
        if self._pid is None:
            return
        if not self._exited:
            os.kill(self._pid, signal.SIGKILL)
            self._reap(block=True)
        if self._conn is not None:
            self._conn.close()
        self._pid, self._conn, self._exited = None, None, False

    def _reap(self, *, block: bool) -> int | None:
        """The child's exit status once it has exited (None while it runs); SIGKILL cannot be ignored, so a
        blocking reap after it returns at once."""
        if self._pid is None or self._exited:
            return None
        pid, status = os.waitpid(self._pid, 0 if block else os.WNOHANG)
        if not pid:
            return None
        self._exited = True
        return os.waitstatus_to_exitcode(status)

    def verify_answers(
        self, ground_truth: str, answers: list[str | None], *, answer_timeout_s: float, group_timeout_s: float
    ) -> list[Verdict]:
        """One verdict per answer (None -> "no_answer"); each answer gets `answer_timeout_s` of child time and the
        whole call at most ~`group_timeout_s` (answers not started by then are "timeout" untried)."""
        verdicts: list[Verdict] = ["no_answer" if a is None else "timeout" for a in answers]
        todo = [i for i, a in enumerate(answers) if a is not None]
        self.start()  # the first call warms math-verify up and forks: not the group's time
        group_deadline = time.monotonic() + group_timeout_s
        while todo and time.monotonic() < group_deadline:
            done = self._run_batch(ground_truth, answers, todo, verdicts, answer_timeout_s, group_deadline)
            todo = todo[done:]
        self.answers += len(answers)
        return verdicts

    def _run_batch(
        self,
        ground_truth: str,
        answers: list[str | None],
        todo: list[int],
        verdicts: list[Verdict],
        answer_timeout_s: float,
        group_deadline: float,
    ) -> int:
        """Send `todo` to the child and fill `verdicts`; returns how many of `todo` are settled. A timeout or a
        crash settles the answer in flight (and those before it) and replaces the child; the caller resends
        the rest."""
        self.start()
        assert self._conn is not None
        todo = todo[:MAX_BATCH]
        PROGRESS.pack_into(self._page, 0, time.monotonic(), -1)
        self._page[PROGRESS.size : PROGRESS.size + len(todo)] = bytes(len(todo))
        self._conn.send_bytes(_encoder.encode((ground_truth, [answers[i] for i in todo])))
        reply = self._wait(answer_timeout_s, group_deadline)
        index = len(todo)  # settled so far
        if reply in (GOLD_EMPTY, GOLD_BAD):
            log.warning("ground truth could not be parsed (%s); its group is scored error", reply.decode())
        elif reply != GOLD_OK:
            index = self._settle_failure(reply, todo)  # the child is dead now: the page no longer changes
        codes = self._page[PROGRESS.size : PROGRESS.size + len(todo)]
        failed: Verdict = "timeout" if reply is None else "error"
        for position, answer in enumerate(todo):
            if codes[position]:
                verdicts[answer] = _CODES[codes[position]]
            elif reply in (GOLD_EMPTY, GOLD_BAD) or index < 0 or position == index:
                verdicts[answer] = "error" if reply in (GOLD_EMPTY, GOLD_BAD) else failed
        if index < 0:  # it never got past the ground truth, which every answer shares
            return len(todo)
        return min(index + 1, len(todo))

    def _wait(self, answer_timeout_s: float, group_deadline: float) -> bytes | None:
        """Sleep until the child's reply (b"" if it died) or until the answer in progress runs out of time
        (None)."""
        assert self._conn is not None
        while True:
            progress = PROGRESS.unpack_from(self._page, 0)
            deadline = min(progress[0] + answer_timeout_s, group_deadline)
            if self._conn.poll(max(0.0, deadline - time.monotonic())):
                try:
                    return self._conn.recv_bytes()
                except (EOFError, OSError):
                    return b""
            if PROGRESS.unpack_from(self._page, 0) == progress or time.monotonic() >= group_deadline:
                return None  # no progress since the deadline was set: stuck

    def _settle_failure(self, reply: bytes | None, todo: list[int]) -> int:
        """Stop the child (SIGKILL unless it already died), fork a fresh one; returns the batch position it was
        on (-1: the ground truth)."""
        exit_code = self._exitcode() if reply == b"" else None
        pid = self.pid
        self.close()
        index = int(PROGRESS.unpack_from(self._page, 0)[1])
        what = "the ground truth" if index < 0 else f"answer {todo[index]}"
        if reply is None:
            self.timeouts += 1
            log.warning("verifier child %s: deadline passed on %s; SIGKILL and respawn", pid, what)
        else:
            self.crashes += 1
            log.warning("verifier child %s died on %s (exit code %s); respawning", pid, what, exit_code)
        self.respawns += 1
        self.start()
        return index

    def _exitcode(self) -> int | None:
        time.sleep(0.05)  # EOF can arrive a moment before the exit status
        return self._reap(block=False)


_CODES: dict[int, Verdict] = {i + 1: v for i, v in enumerate(VERDICTS)}  # type: ignore[misc]


# The child ----------------------------------------------------------------------------------------------------


def _child_main(conn: Connection, page: mmap.mmap, memory_mb: int, rule: AnswerRule) -> None:
    """Serve groups until the parent closes the pipe (or dies: PDEATHSIG)."""
    _die_with_parent()
    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    quiet_math_verify()
    while True:
        try:
            ground_truth, answers = _request_decoder.decode(conn.recv_bytes())
        except EOFError:
            return
        conn.send_bytes(_serve(page, ground_truth, answers, rule))


def _serve(page: mmap.mmap, ground_truth: str, answers: list[str], rule: AnswerRule) -> bytes:
    try:
        gold = parse_gold(ground_truth)
    except BaseException:  # the message could hold a sympy repr: say nothing about it
        return GOLD_BAD
    if not gold:
        return GOLD_EMPTY
    for index, answer in enumerate(answers):
        PROGRESS.pack_into(page, 0, time.monotonic(), index)
        try:
            verdict: str = check(gold, answer, rule)
        except BaseException:  # MemoryError under RLIMIT_AS, RecursionError, sympy bugs
            verdict = "error"
        page[PROGRESS.size + index] = 1 + VERDICTS.index(verdict)
    return GOLD_OK


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this child when its parent dies, so a child busy in sympy never outlives it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        log.debug("prctl unavailable; the child exits on pipe EOF instead")
    if os.getppid() == 1:  # the parent died between fork and prctl
        os._exit(0)
