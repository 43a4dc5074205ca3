"""Turns the errors a user can cause into one line on stderr and exit code 2, instead of a traceback.

What counts as such: any `broker.errors.RlqError` (the root every error rlq raises on purpose derives from), a
pydantic `ValidationError` (a config that does not validate), and redis-py's connection errors. Anything else is a
bug and keeps its traceback: a builtin FileNotFoundError or PermissionError too, so code that reads a file the
user named checks it and raises `UserError` itself. RLQ_DEBUG=1 shows the traceback for user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from broker.errors import RlqError, UserError

__all__ = ["USAGE_EXIT_CODE", "RlqError", "UserError", "one_line", "run_cli", "user_error_types"]

USAGE_EXIT_CODE = 2


def user_error_types() -> tuple[type[BaseException], ...]:
    import pydantic
    from redis.exceptions import AuthenticationError, ConnectionError, NoPermissionError, TimeoutError

    # redis-py's own errors, raised by a command outside broker.connection.connect (which turns a failed first ping
    # into BrokerUnreachable): the broker the user pointed at is unreachable or refuses the credentials. They are
    # not RlqErrors (redis-py defines them) but are the user's to fix all the same.
    redis_errors = (ConnectionError, TimeoutError, AuthenticationError, NoPermissionError)
    return (RlqError, pydantic.ValidationError, *redis_errors)


def one_line(exc: BaseException) -> str:
    import pydantic

    if isinstance(exc, pydantic.ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "config"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return f"invalid config: {where}: {first['msg']}{more}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text


def run_cli(entry: Callable[[], Any]) -> None:
    """Call `entry`; a user error becomes `rlq: <one line>` on stderr and exit code 2."""
    try:
        entry()
    except KeyboardInterrupt:
        sys.stderr.write("rlq: interrupted\n")
        sys.exit(130)
    except user_error_types() as exc:
        if os.environ.get("RLQ_DEBUG") == "1":
            raise
        sys.stderr.write(f"rlq: {one_line(exc)}\n")
        sys.exit(USAGE_EXIT_CODE)
