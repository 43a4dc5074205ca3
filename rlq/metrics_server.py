"""`rlq metrics-server`: one Prometheus endpoint for a whole run, read at scrape time.

The roles keep no Prometheus state of their own: everything a dashboard needs is already in Redis (streams,
the judge queue, the worker registry, the policy hash) or in the run directory (metrics.jsonl, events.jsonl).
A custom collector reads both on each scrape (rlq/run_state.py `snapshot`), so the endpoint can run anywhere
that reaches the broker and the run directory, starts and restarts independently of the roles, and needs no
push gateway. Series names and labels are listed in docs/operations.md; every series has a `run` label.

Nothing listens off loopback without credentials: a non-loopback `--addr` needs HTTP basic auth, the pair
`user:password` taken from the environment variable `RLQ_METRICS_AUTH` (never from the command line, which the
launcher saves in the run directory, and never logged).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from rlq.errors import UserError
from rlq.run_state import Target, run_files, snapshot

log = logging.getLogger(__name__)

DEFAULT_PORT = 9400
DEFAULT_ADDR = "127.0.0.1"
AUTH_ENV = "RLQ_METRICS_AUTH"
"""`user:password` for HTTP basic auth; required for a non-loopback address, honoured on loopback too."""

SCRAPE_RETRIES = 2
"""Retries of one Redis command during a scrape (then the scrape goes on without the broker)."""
SCRAPE_BACKOFF_CAP_S = 0.5

# metrics.jsonl key -> (series, help). The last training step's value of each.
STEP_SERIES = {
    "step": ("rlq_learner_step", "Last training step the learner logged (= the policy version it produced)."),
    "rollout/reward_mean": ("rlq_reward_mean", "Mean reward of the last step's samples."),
    "rollout/reward_std": ("rlq_reward_std", "Standard deviation of the last step's rewards."),
    "rollout/staleness_mean": ("rlq_staleness_mean", "Mean policy-version lag of the last step's samples."),
    "rollout/staleness_max": ("rlq_staleness_max", "Largest policy-version lag among the last step's samples."),
    "perf/step_s": ("rlq_step_seconds", "Wall time of the last learner step, seconds."),
    "sync/broadcast_s": ("rlq_refit_seconds", "Seconds the last step spent getting weights to the workers."),
    "perf/tokens_per_s": ("rlq_learner_tokens_per_second", "Learner forward/backward throughput, tokens/s."),
    "queue/wait_s": ("rlq_learner_wait_seconds", "Seconds the last step waited for scored groups."),
}


class RunCollector:
    """A prometheus_client collector over one run; a scrape reads Redis and the run directory once."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._client: Any = None

    def collect(self) -> Iterator[Metric]:
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import RedisError
        from redis.retry import Retry

        from broker.connection import BrokerUnreachable, connect

        try:
            if self._client is None:
                self._client = connect(self.target.url, client_name="rlq-metrics", check=False)
                # A scrape must answer within Prometheus' timeout (10 s by default): a broker that is down makes
                # it report rlq_broker_up 0 at once instead of waiting through the roles' long retry budget.
                self._client.set_retry(Retry(ExponentialBackoff(cap=SCRAPE_BACKOFF_CAP_S), SCRAPE_RETRIES))
            snap, up = snapshot(self._client, self.target), True
        except (RedisError, BrokerUnreachable, OSError) as exc:
            log.warning("scrape without the broker (%s): only the run directory's figures", exc)
            snap, up = {"run": self.target.run, **run_files(self.target.run_dir)}, False
        yield from families(snap, broker_up=up)


def families(snap: dict[str, Any], *, broker_up: bool) -> list[Metric]:
    """The exported series of one snapshot (pure: a snapshot without broker fields gives the file series only)."""
    run = snap["run"]
    out: list[Metric] = [_one("rlq_broker_up", "1 if the last scrape read the broker.", float(broker_up))]
    out += _file_families(snap)
    if broker_up:
        out += _broker_families(snap)
    return [_with_run(m, run) for m in out]


def _file_families(snap: dict[str, Any]) -> list[Metric]:
    metrics = snap["metrics"]
    step = metrics["step"] or {}
    out = [_one(name, text, step[key]) for key, (name, text) in STEP_SERIES.items() if _is_number(step.get(key))]
    numeric = [([key], float(v)) for key, v in sorted(step.items()) if _is_number(v) and key != "step"]
    out.append(_gauge("rlq_step_metric", "Every figure of the last step's metrics.jsonl record.", ["name"], numeric))
    if "time" in step:
        out.append(_one("rlq_step_time_seconds", "Unix time of the last step record.", step["time"]))
    if metrics["steps_per_min"] is not None:
        out.append(_one("rlq_steps_per_minute", "Learner steps per minute, recent.", metrics["steps_per_min"]))
    val = metrics["validation"] or {}
    if _is_number(val.get("val/accuracy")):
        out.append(_one("rlq_val_accuracy", "Accuracy of the last validation pass.", val["val/accuracy"]))
    restarts = CounterMetricFamily(
        "rlq_restarts", "Restarts of each role by `rlq train` (events.jsonl).", labels=["role"]
    )
    for role, n in sorted(snap["restarts"].items()):
        restarts.add_metric([role], n)
    return [*out, restarts]


def _broker_families(snap: dict[str, Any]) -> list[Metric]:
    out = []
    if snap["policy_version"] is not None:
        out.append(
            _one("rlq_policy_version", "The learner's latest policy version (policy hash).", snap["policy_version"])
        )
    out.append(_gauge("rlq_stream_length", "Entries in each stream of the run.", ["stream"],
                      [([s["name"]], s["length"]) for s in snap["streams"]]))  # fmt: skip
    groups = [(s["name"], g) for s in snap["streams"] for g in s["groups"]]
    per_group = {
        "rlq_stream_pending": ("Entries delivered to a group and not acknowledged.", lambda g: g["pending"]),
        "rlq_stream_lag": ("Entries not yet delivered to a group.", lambda g: g["lag"]),
        "rlq_stream_oldest_pending_age_seconds": (
            "Longest any pending entry has waited for its acknowledgement.",
            lambda g: (g["oldest_pending_idle_ms"] or 0) / 1000,
        ),
        "rlq_stream_max_deliveries": ("Highest delivery count among pending entries.", lambda g: g["max_deliveries"]),
    }
    for name, (text, value) in per_group.items():
        out.append(_gauge(name, text, ["stream", "group"], [([s, g["group"]], value(g)) for s, g in groups]))
    out.append(_one("rlq_dead_letters", "Entries in the dead-letter stream.", snap["dead_letters"]))
    out += _judge_queue_families(snap["judge_queue"])
    out += _worker_families(snap["workers"])
    return out


def _judge_queue_families(jq: dict[str, Any]) -> list[Metric]:
    oldest = jq["oldest_unacked_age_s"] or 0.0
    return [
        _one("rlq_judge_queue_depth", "Tasks waiting in the judges' Celery queue.", jq["depth"]),
        _one("rlq_judge_queue_unacked", "Judge tasks delivered and not acknowledged.", jq["unacked"]),
        _one("rlq_judge_queue_oldest_unacked_age_seconds", "Age of the oldest unacknowledged judge task.", oldest),
        _one("rlq_judge_queue_consumers", "Alive judges consuming the queue.", jq["consumers"]),
    ]


def _worker_families(workers: list[dict[str, Any]]) -> list[Metric]:
    labels = ["worker", "role", "node"]

    def rows(value: Callable[[dict[str, Any]], float]) -> list[tuple[list[str], float]]:
        return [([w["worker_id"], w["role"], w["node"]], float(value(w))) for w in workers]

    alive: dict[str, int] = {}
    for w in workers:
        alive[w["role"]] = alive.get(w["role"], 0) + int(w["alive"])
    return [
        _gauge("rlq_worker_up", "1 while the worker's heartbeat is alive.", labels, rows(lambda w: w["alive"])),
        _gauge("rlq_worker_throughput", "Recent tokens/s (generate) or answers/s (judge) from the heartbeat.",
               labels, rows(lambda w: w["throughput"])),
        _gauge("rlq_worker_pull_share", "Generation: share of the fleet's throughput, which is the share of the "
               "waiting prompt messages each read takes (capacity-aware pulls).", labels,
               rows(lambda w: w.get("share", 0.0))),
        _gauge("rlq_worker_capacity", "Generation: prompts the worker's last read took.", labels,
               rows(lambda w: w.get("capacity", 0))),
        _gauge("rlq_worker_policy_version", "Policy version the worker holds.", labels,
               rows(lambda w: w["policy_version"])),
        _gauge("rlq_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat.", labels,
               rows(lambda w: w["heartbeat_age_s"])),
        _gauge("rlq_workers_alive", "Alive workers per role.", ["role"], [([r], n) for r, n in sorted(alive.items())]),
    ]  # fmt: skip


def _gauge(name: str, text: str, labels: list[str], samples: Iterable[tuple[list[str], float]]) -> Metric:
    family = GaugeMetricFamily(name, text, labels=labels)
    for values, value in samples:
        family.add_metric(values, float(value))
    return family


def _one(name: str, text: str, value: float) -> Metric:
    return _gauge(name, text, [], [([], value)])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _with_run(family: Metric, run: str) -> Metric:
    """Every series carries `run`, so one Prometheus can hold several runs (the dashboard's variable)."""
    family.samples = [s._replace(labels={"run": run, **s.labels}) for s in family.samples]
    return family


# Serving ---------------------------------------------------------------------------------------------------------


def is_loopback(addr: str) -> bool:
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False  # a host name other than localhost, or "" (every interface)


def credentials(addr: str, environ: dict[str, str] | os._Environ[str]) -> tuple[str, str] | None:
    """The basic-auth pair from `RLQ_METRICS_AUTH`; UserError if it is malformed, or absent off loopback."""
    raw = environ.get(AUTH_ENV)
    if not raw:
        if not is_loopback(addr):
            raise UserError(
                f"refusing to serve metrics on {addr or 'every interface'} without credentials: set {AUTH_ENV}="
                "user:password (HTTP basic auth), or keep --addr 127.0.0.1"
            )
        return None
    user, sep, password = raw.partition(":")
    if not sep or not user or not password:
        raise UserError(f"{AUTH_ENV} must be user:password, both non-empty")
    return user, password


def wsgi_app(registry: CollectorRegistry, auth: tuple[str, str] | None) -> Callable:
    """Prometheus' WSGI app, behind HTTP basic auth when `auth` is set (constant-time comparison)."""
    metrics = make_wsgi_app(registry)
    if auth is None:
        return metrics
    expected = ("Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()).encode()

    def guarded(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if hmac.compare_digest(environ.get("HTTP_AUTHORIZATION", "").encode(), expected):
            return metrics(environ, start_response)
        start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="rlq"'), ("Content-Type", "text/plain")])
        return [b"unauthorized\n"]

    return guarded


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds the process at shutdown


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s " + format, self.address_string(), *args)


def serve(target: Target, *, addr: str = DEFAULT_ADDR, port: int = DEFAULT_PORT) -> None:
    """Serve the run's metrics until SIGTERM or SIGINT (the supervisor's stop, or Ctrl-C)."""
    auth = credentials(addr, os.environ)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(target))  # type: ignore[arg-type]  # a duck-typed collector
    _Server.address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        httpd = make_server(addr, port, wsgi_app(registry, auth), server_class=_Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise UserError(f"cannot listen on {addr}:{port}: {exc.strerror or exc}") from None
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    log.info("metrics of run %s on http://%s:%d/metrics%s", target.run, addr, httpd.server_port,
             " (basic auth)" if auth else "")  # fmt: skip
    try:
        while not stop.wait(0.5):  # short waits: the signal handler runs between them
            pass
    finally:
        httpd.shutdown()
        httpd.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("metrics server stopped")


def metrics_role_argv(config_path: Path, port: int, addr: str = DEFAULT_ADDR) -> list[str]:
    """The command `rlq train` runs for the metrics role (set `RLQ_METRICS_AUTH` in its env off loopback)."""
    return [sys.executable, "-m", "rlq", "metrics-server", "--config", str(config_path), "--port", str(port),
            "--addr", addr]  # fmt: skip
