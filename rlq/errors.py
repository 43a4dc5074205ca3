"""Turns the errors a user can cause into one line on stderr and exit code 2, instead of a traceback.

Anything else is a bug and keeps its traceback. RLQ_DEBUG=1 shows the traceback for user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from broker.connection import BrokerUnreachable
from broker.schemas import MessageError
from rlq.overrides import ConfigError

USAGE_EXIT_CODE = 2


class UserError(RuntimeError):
    """Raised anywhere in rlq for a problem the user must fix (bad file, bad argument, missing model)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    import pydantic
    from redis.exceptions import AuthenticationError, ConnectionError, NoPermissionError, TimeoutError

    return (
        UserError, ConfigError, BrokerUnreachable, MessageError, pydantic.ValidationError,
        ConnectionError, TimeoutError, AuthenticationError, NoPermissionError, FileNotFoundError, PermissionError,
    )  # fmt: skip


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
