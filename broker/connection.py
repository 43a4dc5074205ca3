"""One Redis connection from one URL, with an explicit retry policy and a one-line error when unreachable."""

from __future__ import annotations

import logging
import os
from typing import Any
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
"""The password of the process's Redis user; kept out of URLs, so it stays out of logs and saved commands."""
USER_ENV = "RLQ_REDIS_USER"
"""The ACL user the process logs in as (broker/acl.py); unset: Redis's `default` user."""
TLS_CA_ENV = "RLQ_REDIS_TLS_CA"
"""CA certificate that signed a rediss:// broker's certificate (the run's own CA, slurm/common.sh makes one)."""


class BrokerUnreachable(RlqError, ConnectionError):
    """Redis cannot be reached or refuses us; the message is the one line the user sees."""


def describe(url: str) -> str:
    """HOST:PORT of a URL without its credentials."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


def connect(
    url: str, *, client_name: str = "rlq", check: bool = True, login: dict[str, str] | None = None
) -> redis.Redis:
    """A client for `url` (redis:// or rediss://) with retries and a ping; the user and password come from the
    environment (`credentials`) unless the URL names them.

    Raises:
        BrokerUnreachable: "cannot reach Redis at HOST:PORT: reason".
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise BrokerUnreachable(
            f"cannot reach Redis at {describe(url)}: the broker URL must start with redis://, rediss:// or unix://"
        )
    extra: dict = dict(login) if login else credentials(url)  # login: `username`/`password` (broker/acl.py)
    if parts.scheme == "rediss":
        extra.update(tls_options())
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


def credentials(url: str) -> dict[str, str]:
    """`username`/`password` for redis-py from RLQ_REDIS_USER/RLQ_REDIS_PASSWORD, where the URL names none."""
    parts = urlsplit(url)
    extra = {}
    if not parts.password and os.environ.get(PASSWORD_ENV):
        extra["password"] = os.environ[PASSWORD_ENV]
        if not parts.username and os.environ.get(USER_ENV):
            extra["username"] = os.environ[USER_ENV]
    return extra


def tls_options() -> dict[str, str]:
    """redis-py's TLS settings for a rediss:// URL: verify the server against the run's CA when one is named."""
    ca = os.environ.get(TLS_CA_ENV)
    return {"ssl_ca_certs": ca, "ssl_cert_reqs": "required"} if ca else {}


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


def eval_read_only(client: redis.Redis, script: str, numkeys: int, *keys_and_args: str) -> Any:
    """Run a Lua script that only reads: EVAL_RO, which a read-only ACL user may run (EVAL declares its keys
    read-write, so a user with `%R~` key rights is refused it); EVAL on a server older than Redis 7."""
    try:
        return client.eval_ro(script, numkeys, *keys_and_args)
    except ResponseError as exc:
        if "unknown command" not in str(exc).lower():
            raise
        return client.eval(script, numkeys, *keys_and_args)
