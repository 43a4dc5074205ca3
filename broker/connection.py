"""One Redis connection from one URL, with an explicit retry policy and a one-line error when unreachable."""

from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, BusyLoadingError, ConnectionError, ResponseError, TimeoutError
from redis.retry import Retry

from broker.errors import RlqError

log = logging.getLogger(__name__)

RETRY_ATTEMPTS = 14
"""Retries per command after a connection error: with the backoff below a command rides out ~30 s of outage
(a Redis restart that reloads its append-only file) before it fails."""
STARTUP_RETRY_ATTEMPTS = 2
"""The first ping gives up fast: an unreachable broker at start-up is a configuration error, not an outage."""
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 3.0
SOCKET_TIMEOUT_S = 30.0
"""Bounds every reply, so a stopped (SIGSTOP) server raises instead of hanging; blocking reads use less."""
CONNECT_TIMEOUT_S = 5.0
HEALTH_CHECK_INTERVAL_S = 15
PASSWORD_ENV = "RLQ_REDIS_PASSWORD"


class BrokerUnreachable(RlqError, ConnectionError):
    """Redis cannot be reached or refuses us; the message is the one line the user sees."""


def describe(url: str) -> str:
    """HOST:PORT of a URL without its credentials."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


def connect(url: str, *, client_name: str = "rlq", check: bool = True) -> redis.Redis:
    """A client for `url` (redis:// or rediss://, user and password in the URL) with retries and a ping.

    Raises:
        BrokerUnreachable: "cannot reach Redis at HOST:PORT: reason".
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise BrokerUnreachable(
            f"cannot reach Redis at {describe(url)}: the broker URL must start with redis://, rediss:// or unix://"
        )
    # A password kept out of the URL (so it stays out of logs and saved commands) comes from the environment.
    extra = {}
    if not parts.password and os.environ.get(PASSWORD_ENV):
        extra["password"] = os.environ[PASSWORD_ENV]
    client = redis.Redis.from_url(
        url,
        **extra,
        retry=_retry(RETRY_ATTEMPTS),
        # BusyLoadingError: a restarted server answers LOADING while it replays its append-only file.
        retry_on_error=[ConnectionError, TimeoutError, BusyLoadingError, OSError],
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        client_name=client_name,
    )
    if check:
        client.set_retry(_retry(STARTUP_RETRY_ATTEMPTS))
        try:
            ping(client, url)
        finally:
            client.set_retry(_retry(RETRY_ATTEMPTS))
    return client


def _retry(attempts: int) -> Retry:
    # OSError: redis-py retries a socket connect only on the errors listed here, and a server that is down
    # refuses with ConnectionRefusedError (an OSError), which would otherwise fail the command at once.
    errors = (ConnectionError, TimeoutError, BusyLoadingError, OSError)
    return Retry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), attempts, supported_errors=errors)


def ping(client: redis.Redis, url: str) -> None:
    try:
        client.ping()
    except AuthenticationError as exc:
        raise BrokerUnreachable(f"cannot reach Redis at {describe(url)}: authentication failed ({exc})") from None
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise BrokerUnreachable(f"cannot reach Redis at {describe(url)}: {exc}") from None
    except ResponseError as exc:
        raise BrokerUnreachable(f"cannot reach Redis at {describe(url)}: {exc}") from None
