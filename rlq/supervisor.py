"""Runs a set of role processes on one machine, restarts the ones that may be restarted, and stops them together.

`rlq train` uses it: every role is a child process (its own session) with its own log file in the run directory.
A role that dies is started again after a backoff when its spec says so (`RoleSpec.restart`, under the bounds of
`cluster.restarts`: rlq/restarts.py); each restart is logged with its cause and appended to `events.jsonl`. Any
other death, or one restart too many, stops the others and is reported as one line naming the role and the last
meaningful line of its log. SIGINT/SIGTERM to the launcher (`request_stop`) stops everything: SIGTERM first, so
roles finish or release the batch in hand and the learner checkpoints, SIGKILL after the grace period.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from broker.errors import RlqError
from rlq.restarts import RestartBook, RestartPolicy

log = logging.getLogger(__name__)

POLL_S = 0.5
FAMILY_REFRESH_S = 5.0
"""How often the descendants of each role are listed: some leave its process group (torchrun starts each rank in
a session of its own), and they must not outlive the role when it dies or is stopped."""
LEFTOVER_WAIT_S = 5.0
"""After SIGKILL, how long to wait for a role's processes to be reaped."""
FIRST_SHARE = 0.6
"""Share of the stop grace the learner gets alone (SIGTERMed first) before the other roles are SIGTERMed too."""


@dataclass
class RoleSpec:
    """One process to run: `name` is how the user sees it ("learner", "generate-0", "judge")."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    required: bool = True  # when a required role exits (even cleanly), the run is over
    finishes_run: bool = False  # a clean exit of this role ends the run successfully (the learner)
    restart: bool = False  # when it exits (a clean exit of a `finishes_run` role aside), start it again
    cpus: list[int] | None = None  # pin the process (and what it starts) to these CPU ids
    wait_ready: str | None = None  # worker id whose heartbeat must leave "starting" before the next role starts
    kind: str = ""  # what `rlq scale` counts it as ("generate", "judge"); "" for roles that are not scaled
    redis_user: str = ""  # the broker's ACL user it logs in as (broker/acl.py); "": none handed to it


@dataclass
class RoleProcess:
    spec: RoleSpec
    process: subprocess.Popen
    log_path: Path
    restart_at: float | None = None  # monotonic time a scheduled restart is due; None while none is
    family: list[psutil.Process] = field(default_factory=list)  # descendants when last listed
    retiring: bool = False  # asked to leave (scaled down): its exit is expected, it is not restarted


class RoleFailed(RlqError, RuntimeError):
    """One role failed; the message names it and says why in one line."""


class Stopped(RlqError):
    """SIGINT/SIGTERM asked the run to stop; `signum` says which."""

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = signum
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")


class Supervisor:
    def __init__(
        self,
        log_dir: Path,
        base_env: dict[str, str] | None = None,
        policy: RestartPolicy | None = None,
        events_path: Path | None = None,
        credentials: Callable[[str], dict[str, str]] | None = None,
    ) -> None:
        self.log_dir = log_dir
        # RoleSpec.redis_user -> the environment that logs it in: added at spawn, never written to commands.txt.
        self.credentials = credentials
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.policy = policy or RestartPolicy()
        self.events_path = events_path  # one JSON line per restart; None: the log only
        self.roles: list[RoleProcess] = []
        self.books: dict[str, RestartBook] = {}
        self.stop_signal: int | None = None
        self._families_at = 0.0

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts so far, per role name (roles never restarted are absent)."""
        return {name: book.total for name, book in self.books.items() if book.total}

    @property
    def total_restarts(self) -> int:
        return sum(self.restarts.values())

    def start(self, spec: RoleSpec) -> RoleProcess:
        role = RoleProcess(spec, self._spawn(spec), self.log_dir / f"{spec.name}.log")
        self.roles.append(role)
        return role

    def _spawn(self, spec: RoleSpec) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{spec.name}.log"
        secret_env = self.credentials(spec.redis_user) if self.credentials and spec.redis_user else {}
        env = {**self.base_env, **spec.env, **secret_env}
        cpus = spec.cpus
        with open(log_path, "ab") as sink:
            # A new session per role: Ctrl-C reaches only us, and we stop the roles in order.
            process = subprocess.Popen(
                spec.argv, env=env, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )  # fmt: skip
        pinned = f"taskset -c {','.join(map(str, cpus))} " if cpus else ""
        exported = "".join(f"{k}={v} " for k, v in sorted(spec.env.items()))
        with open(self.log_dir / "commands.txt", "a") as commands:
            commands.write(f"{spec.name}: {exported}{pinned}{' '.join(spec.argv)}\n")
        log.info("started %s (pid %d), log %s", spec.name, process.pid, log_path)
        return process

    def request_stop(self, signum: int, frame: object = None) -> None:
        """A signal handler: the next `check` raises Stopped, and the caller's `stop` ends every role."""
        self.stop_signal = signum

    def wait(self, on_tick: Callable[[], None] | None = None) -> None:
        """Block until the run ends. Raises RoleFailed when a role fails, Stopped when a signal asked to stop."""
        while not self.check():
            if on_tick is not None:
                on_tick()
            time.sleep(POLL_S)

    def check(self) -> bool:
        """True when the run has ended well (a `finishes_run` role exited cleanly); raises RoleFailed when a role
        failed for good, Stopped after `request_stop`; False while the run goes on (restarts included)."""
        if self.stop_signal is not None:
            raise Stopped(self.stop_signal)
        now = time.monotonic()
        self._list_families(now)
        for role in list(self.roles):
            if role.restart_at is not None:
                if now >= role.restart_at:
                    self._respawn(role)
                continue
            code = role.process.poll()
            if code is None:
                continue
            if role.retiring:
                _kill_family(role)
                self.roles.remove(role)
                log.info("%s left (scaled down; exit code %d)", role.spec.name, code)
                continue
            if code == 0 and role.spec.finishes_run:
                return True
            if role.spec.restart:
                self._schedule_restart(role, code, now)
            elif code != 0 or role.spec.required:
                raise RoleFailed(f"{role.spec.name} {_exit_text(code)}: {last_error_line(role.log_path)}")
        return False

    def active(self, kind: str) -> list[RoleProcess]:
        """The roles of `kind` that count towards it: running or due a restart, not retiring."""
        return [role for role in self.roles if role.spec.kind == kind and not role.retiring]

    def retire(self, role: RoleProcess) -> None:
        """Ask a role to leave for good (SIGTERM: a worker finishes or releases its batch); it is not restarted."""
        role.retiring = True
        if role.restart_at is not None:  # dead already, waiting for its restart: nothing to stop
            role.restart_at = None
            self.roles.remove(role)
            return
        _terminate([role])
        log.info("asked %s (pid %d) to leave", role.spec.name, role.process.pid)

    def _schedule_restart(self, role: RoleProcess, code: int, now: float) -> None:
        name = role.spec.name
        cause = f"{_exit_text(code)}: {last_error_line(role.log_path)}"
        _kill_family(role)  # what it started may outlive it (vLLM's engine process, torchrun's ranks)
        book = self.books.setdefault(name, RestartBook(self.policy))
        backoff = book.next_backoff(now)
        if backoff is None:
            raise RoleFailed(
                f"{name} {cause} (no restart left: {len(book.recent)} within {self.policy.window_s:.0f} s, "
                f"cluster.restarts.max_restarts={self.policy.max_restarts})"
            )
        role.restart_at = now + backoff
        log.warning("%s %s; restarting it in %.1f s (restart %d; %d of at most %d within %.0f s)", name, cause,
                    backoff, book.total, len(book.recent), self.policy.max_restarts, self.policy.window_s)  # fmt: skip
        self.record({"time": time.time(), "role": name, "cause": cause, "restart": book.total, "backoff_s": backoff})

    def _respawn(self, role: RoleProcess) -> None:
        number = self.books[role.spec.name].total
        with open(role.log_path, "a") as sink:  # "=" lines are scaffolding to last_error_line
            sink.write(f"=== rlq train: restart {number} of {role.spec.name} ===\n")
        role.process, role.restart_at, role.family = self._spawn(role.spec), None, []

    def record(self, record: dict) -> None:
        """Append one event to `events.jsonl` (restarts, scaling)."""
        if self.events_path is None:
            return
        self.events_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.events_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _list_families(self, now: float, force: bool = False) -> None:
        if not force and now - self._families_at < FAMILY_REFRESH_S:
            return
        self._families_at = now
        for role in self.roles:
            if role.restart_at is None and role.process.poll() is None:
                try:
                    role.family = psutil.Process(role.process.pid).children(recursive=True)
                except psutil.Error:
                    pass  # it exited meanwhile: the next check handles that

    def stop(self, grace_s: float | None = None) -> None:
        """Stop every role within `grace_s` (default `cluster.restarts.stop_grace_s`): SIGTERM to the role that
        finishes the run (the learner) first, to the others once it has left or `FIRST_SHARE` of the grace has
        passed, then SIGKILL to whatever is left of them, their descendants included."""
        grace = self.policy.stop_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        self._list_families(time.monotonic(), force=True)
        for role in self.roles:
            role.restart_at = None  # no restart while stopping
        # The learner first: a weight broadcast in flight completes while the workers still serve, and it
        # checkpoints; SIGTERMed together, it waited in that broadcast for workers that were leaving.
        first = [role for role in self.roles if role.spec.finishes_run]
        _terminate(first)
        _wait(first, min(deadline, time.monotonic() + grace * FIRST_SHARE))
        _terminate(list(reversed(self.roles)))
        for role in _wait(self.roles, deadline):
            log.warning("%s did not stop within %.0f s of SIGTERM; killing it", role.spec.name, grace)
        family = [p for role in self.roles for p in role.family]
        _, alive = psutil.wait_procs(family, timeout=max(0.0, deadline - time.monotonic()))
        if alive:
            log.warning("killing %d processes the roles left behind: %s", len(alive), sorted(p.pid for p in alive))
        for role in self.roles:
            _kill_family(role)
        for role in _wait(self.roles, time.monotonic() + LEFTOVER_WAIT_S):
            log.error("%s (pid %d) survived SIGKILL", role.spec.name, role.process.pid)
        _, alive = psutil.wait_procs(alive, timeout=LEFTOVER_WAIT_S)
        if alive:
            log.error("processes survived SIGKILL: %s", sorted(p.pid for p in alive))


def _terminate(roles: list[RoleProcess]) -> None:
    """SIGTERM to each live leader only: it stops what it started in order (torchrun its ranks, a worker its vLLM
    engine, Celery its pool)."""
    for role in roles:
        if role.process.poll() is None:
            role.process.send_signal(signal.SIGTERM)


def _wait(roles: list[RoleProcess], deadline: float) -> list[RoleProcess]:
    """Wait until every leader has exited or `deadline` (monotonic) passed; returns those still running."""
    left = []
    for role in roles:
        try:
            role.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            left.append(role)
    return left


def _kill_family(role: RoleProcess) -> None:
    """SIGKILL the role's process group (its leader may be gone, members left) and its descendants last listed."""
    try:
        os.killpg(role.process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for member in role.family:
        try:
            member.kill()  # psutil refuses a pid that now names another process
        except psutil.Error:
            pass


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return "exited cleanly before the run ended" if code == 0 else f"exited with code {code}"


_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failed)|rlq): ")
_WRAPPERS = ("ChildFailedError", "torch.distributed.elastic")  # torchrun's summary of a child's failure
_NOISE = ("Traceback", "File ", "  ", "During handling", "The above exception", "=", "│", "╭", "╰", "^", "~")


def last_error_line(log_path: Path, max_bytes: int = 64_000) -> str:
    """The most telling line of a log: the last exception line (not torchrun's wrapper of it), else the last
    line that is not traceback scaffolding."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(log_path) - max_bytes))
            lines = [line.rstrip() for line in fh.read().decode(errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    for line in reversed(lines):
        if _EXCEPTION.match(line) and not line.startswith(_WRAPPERS) and "ChildFailedError" not in line:
            return line[:400]
    for line in reversed(lines):
        if line.strip() and not line.startswith(_NOISE):
            return line.strip()[:400]
    return "(empty log)"
