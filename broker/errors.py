"""The one exception root of rlq, and the error classes that more than one package raises.

Every error rlq raises on purpose derives from `RlqError`. The CLI (`rlq.errors.run_cli`) prints any `RlqError` as
one line on stderr (`rlq: <message>`, exit code 2); every other exception is a bug and keeps its traceback
(RLQ_DEBUG=1 shows the traceback of an `RlqError` too). So a message of an `RlqError` is written for the user: one
line saying what is wrong and, where it can, what to do about it.

Classes keep a builtin base next to `RlqError` (`RuntimeError`, `ValueError`, `ConnectionError`) so that callers
that catch the builtin still catch them. This module is at the bottom of the package graph: standard library only,
no torch, no third-party import, so `broker/`, `weightsync/`, `learner/`, `workers/` and `rlq/` can all import it.
"""

from __future__ import annotations


class RlqError(Exception):
    """Root of every error rlq raises on purpose.

    The CLI prints any RlqError as one line (`rlq: <message>`) and exits with code 2; everything else keeps its
    traceback, because an exception that is not an RlqError is a bug.
    """


class UserError(RlqError, RuntimeError):
    """A problem the user must fix (a missing or unreadable file, a bad argument, a missing model).

    Raised anywhere in rlq, `learner/` and `workers/` included; the message is the one line the user sees.
    """


class WeightSyncError(RlqError, RuntimeError):
    """A weight update that did not complete.

    On the learner (`learner.broadcast`): a broadcast that could not complete within its deadline, with who was
    evicted; the learner may go on and workers keep older weights. On a generation worker
    (`workers.generate.weights`): the worker keeps its weights and re-joins at the next epoch.
    """


class EngineStateLost(RlqError, RuntimeError):
    """A weight update failed after it began changing the live weights: the worker cannot go on sampling."""
