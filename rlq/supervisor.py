"""Runs a set of role processes on one machine and stops them together.

`rlq train` uses it: every role is a child process with its own log file in the run directory. When any
role exits with an error the others are stopped and the failure is reported as one line naming the role and
the last meaningful line of its log. Ctrl-C (SIGINT) or SIGTERM stops everything cleanly: SIGTERM first, so
roles finish or release the batch in hand, SIGKILL after a grace period.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import RlqError

log = logging.getLogger(__name__)

STOP_GRACE_S = 20.0
POLL_S = 0.5


@dataclass
class RoleSpec:
    """One process to run: `name` is how the user sees it ("learner", "generate-0", "judge")."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    required: bool = True  # when a required role exits (even cleanly), the run is over
    finishes_run: bool = False  # a clean exit of this role ends the run successfully (the learner)
    cpus: list[int] | None = None  # pin the process (and what it starts) to these CPU ids
    wait_ready: str | None = None  # worker id whose heartbeat must leave "starting" before the next role starts


@dataclass
class RoleProcess:
    spec: RoleSpec
    process: subprocess.Popen
    log_path: Path


class RoleFailed(RlqError, RuntimeError):
    """One role failed; the message names it and says why in one line."""


class Supervisor:
    def __init__(self, log_dir: Path, base_env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.roles: list[RoleProcess] = []
        self._stopping = False

    def start(self, spec: RoleSpec) -> RoleProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{spec.name}.log"
        env = {**self.base_env, **spec.env}
        cpus = spec.cpus
        with open(log_path, "ab") as sink:
            # A new session per role: Ctrl-C reaches only us, and we stop the roles in order.
            process = subprocess.Popen(
                spec.argv, env=env, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )  # fmt: skip
        pinned = f"taskset -c {','.join(map(str, cpus))} " if cpus else ""
        exported = "".join(f"{k}={v} " for k, v in sorted(spec.env.items()))
        (self.log_dir / "commands.txt").open("a").write(f"{spec.name}: {exported}{pinned}{' '.join(spec.argv)}\n")
        role = RoleProcess(spec, process, log_path)
        self.roles.append(role)
        log.info("started %s (pid %d), log %s", spec.name, process.pid, log_path)
        return role

    def wait(self, on_tick: Callable[[], None] | None = None) -> None:
        """Block until the run ends. Raises RoleFailed when a role fails."""
        while not self.check():
            if on_tick is not None:
                on_tick()
            time.sleep(POLL_S)

    def check(self) -> bool:
        """True when the run has ended well (a `finishes_run` role exited cleanly); raises RoleFailed when a
        role failed; False while everything runs."""
        for role in self.roles:
            code = role.process.poll()
            if code is None:
                continue
            if code == 0 and role.spec.finishes_run:
                return True
            if code != 0 or role.spec.required:
                raise RoleFailed(f"{role.spec.name} {_exit_text(code)}: {last_error_line(role.log_path)}")
        return False

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every live role (reverse start order), then SIGKILL whatever is left after `grace_s`."""
        self._stopping = True
        for role in reversed(self.roles):
            _signal_group(role.process, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for role in reversed(self.roles):
            remaining = max(0.0, deadline - time.monotonic())
            try:
                role.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", role.spec.name, grace_s)
                _signal_group(role.process, signal.SIGKILL)
                role.process.wait(timeout=10)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
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
