"""Hard-kill isolation for math-verify: one pre-forked child per judge process, reused across answers.

A fork per answer (what NeMo Gym does) costs ~8x the verification itself, so the child is forked once, warm
(math-verify imported and exercised in the parent first, so every fork inherits the caches), and fed whole
groups: one pipe write per group, then one small reply per answer. The parent waits for each reply with a
deadline; when it expires the child is SIGKILLed (no signal handler, no cooperation needed: sympy stuck in C
code, a `str()` of a huge expression, an antlr recursion all stop), the answer is scored "timeout", and a
fresh child is forked for the rest. A child that dies on its own (OOM, crash) scores its answer "error".

Wire between parent and child: msgpack via msgspec (never pickle), frames from `Connection.send_bytes`.
  parent -> child: [ground_truth: str, answers: list[str]]
  child -> parent: b"ok" | b"empty" | b"bad" once (the ground truth parsed?), then, only after b"ok", one
                   verdict per answer, in order.
Nothing parsed ever crosses the pipe: sympy objects stay inside the child and are never stringified.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import resource
import signal
import time
from multiprocessing.connection import Connection

import msgspec

from broker.schemas import VERDICTS, Verdict
from workers.verify import check, parse_gold, quiet_math_verify

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
"""prctl option: the kernel sends the child a signal when the parent thread dies (Linux only)."""
GOLD_OK, GOLD_EMPTY, GOLD_BAD = b"ok", b"empty", b"bad"

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

    def __init__(self, memory_mb: int = 0) -> None:
        self.memory_mb = memory_mb
        self._pid: int | None = None
        self._exited = False  # reaped already: its pid may belong to someone else now, never signal it
        self._conn: Connection | None = None
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
                _child_main(child_end, self.memory_mb)
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

    def _replace(self) -> None:
        self.close()
        self.respawns += 1
        self.start()

    def verify_answers(
        self, ground_truth: str, answers: list[str | None], *, answer_timeout_s: float, group_timeout_s: float
    ) -> list[Verdict]:
        """One verdict per answer (None -> "no_answer"); each answer gets `answer_timeout_s` of child time and the
        whole call at most ~`group_timeout_s` (answers not started by then are "timeout" untried)."""
        verdicts: list[Verdict] = ["no_answer" if a is None else "timeout" for a in answers]
        todo = [i for i, a in enumerate(answers) if a is not None]
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
        crash settles the answer in flight and replaces the child; the caller resends the rest."""
        self.start()
        assert self._conn is not None
        self._conn.send_bytes(_encoder.encode((ground_truth, [answers[i] for i in todo])))
        gold = self._receive(min(time.monotonic() + answer_timeout_s, group_deadline))
        if gold != GOLD_OK:
            # The ground truth is the same for every answer: one timeout/failure settles them all.
            verdict: Verdict = "timeout" if gold is None else "error"
            self._settle_failure(gold, "ground truth")
            for i in todo:
                verdicts[i] = verdict
            return len(todo)
        for done, index in enumerate(todo):
            reply = self._receive(min(time.monotonic() + answer_timeout_s, group_deadline))
            if reply is None or reply not in _VERDICT_BYTES:
                verdicts[index] = "timeout" if reply is None else "error"
                self._settle_failure(reply, f"answer {index}")
                return done + 1
            verdicts[index] = _VERDICT_BYTES[reply]
        return len(todo)

    def _receive(self, deadline: float) -> bytes | None:
        """The child's next reply; None on the deadline; b"" if the child died (EOF)."""
        assert self._conn is not None
        if not self._conn.poll(max(0.0, deadline - time.monotonic())):
            return None
        try:
            return self._conn.recv_bytes()
        except (EOFError, OSError):
            return b""

    def _settle_failure(self, reply: bytes | None, what: str) -> None:
        if reply is None:
            self.timeouts += 1
            log.warning("verifier child %s: deadline passed on %s; SIGKILL and respawn", self.pid, what)
        elif reply in (GOLD_EMPTY, GOLD_BAD):
            log.warning("ground truth could not be parsed (%s); its group is scored error", reply.decode())
            return  # the child is healthy
        else:
            self.crashes += 1
            log.warning("verifier child %s died on %s (exit code %s); respawning", self.pid, what, self._exitcode())
        self._replace()

    def _exitcode(self) -> int | None:
        time.sleep(0.05)  # EOF can arrive a moment before the exit status
        return self._reap(block=False)


_VERDICT_BYTES: dict[bytes, Verdict] = {v.encode(): v for v in VERDICTS}  # type: ignore[misc]


# The child ----------------------------------------------------------------------------------------------------


def _child_main(conn: Connection, memory_mb: int) -> None:
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
        _serve(conn, ground_truth, answers)


def _serve(conn: Connection, ground_truth: str, answers: list[str]) -> None:
    try:
        gold = parse_gold(ground_truth)
    except BaseException:  # the message could hold a sympy repr: say nothing about it
        conn.send_bytes(GOLD_BAD)
        return
    if not gold:
        conn.send_bytes(GOLD_EMPTY)
        return
    conn.send_bytes(GOLD_OK)
    for answer in answers:
        try:
            verdict: str = check(gold, answer)
        except BaseException:  # MemoryError under RLIMIT_AS, RecursionError, sympy bugs
            verdict = "error"
        conn.send_bytes(verdict.encode())


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this child when its parent dies, so a child busy in sympy never outlives it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        log.debug("prctl unavailable; the child exits on pipe EOF instead")
    if os.getppid() == 1:  # the parent died between fork and prctl
        os._exit(0)
