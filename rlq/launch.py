"""`rlq train` on one machine: a private Redis (unless broker.url is set), judges, generation workers and the
learner, each its own process (rlq/roles.py); progress from metrics.jsonl. Workers that die are restarted
(`cluster.restarts`, rlq/supervisor.py), `rlq scale` adds or removes workers live (rlq/scaler.py); SIGINT/SIGTERM,
the learner's end or a role's final failure stops everything together.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from broker.acl import OPERATOR, SECRET_ENV, login, new_secret, role_env, write_acl_file, write_private
from broker.connection import connect
from broker.keys import Keys
from broker.server import RedisServer
from rlq.config import BROKER_SECRET_FILE, BROKER_URL_ENV, BROKER_URL_FILE, RunConfig, save_resolved
from rlq.errors import UserError
from rlq.placement import plan_gpus, visible_gpu_count
from rlq.roles import RunRoles
from rlq.scaler import Scaler
from rlq.supervisor import RoleFailed, RoleSpec, Stopped, Supervisor
from rlq.tracking import MetricsFollower, WandbSettings

log = logging.getLogger(__name__)

PROGRESS_KEYS = (
    ("rollout/reward_mean", "reward {:.3f}"),
    ("rollout/staleness_mean", "staleness {:.2f}"),
    ("perf/step_s", "step {:.1f}s"),
    ("sync/broadcast_s", "sync {:.2f}s"),
)


READY_TIMEOUT_S = 900.0
"""Longest wait for a worker that shares a GPU to load its engine before the next process on that GPU starts."""


def train(cfg: RunConfig) -> Path:
    """Run the whole job on this machine; returns the run directory. Raises UserError naming a failed role."""
    run_dir = cfg.run_dir.resolve()
    config_path = run_dir / "config.yaml"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, config_path)
    except OSError as exc:
        raise UserError(
            f"cannot write the run directory {run_dir} ({exc.strerror or exc}): set logger.log_dir to a writable place"
        ) from None
    placement = plan_gpus(cfg, visible_gpu_count())  # a GPU that is not there fails here, before anything starts
    roles = RunRoles(cfg, config_path, placement)  # a bad CPU list fails here too
    specs = roles.initial()
    if cfg.cluster.restarts.learner == "resume" and not cfg.checkpointing.enabled:
        raise UserError("cluster.restarts.learner=resume needs checkpointing.enabled=true (it resumes from one)")
    from learner.data_source import training_file, validation_file

    training_file(cfg.data)  # a missing file is one line (UserError) before anything has started
    if cfg.grpo.validates:
        validation_file(cfg.data)
    from rlq.models import resolve_model

    for name in {cfg.policy.model_name, cfg.policy.generation.model_name or cfg.policy.model_name}:
        resolve_model(name)  # a model that is not there is one line here, not a failed role later
    if cfg.checkpointing.enabled:
        from broker.policy import finished_message, finished_version  # torch-free: the launcher stays light

        checkpoints = Path(cfg.checkpointing.checkpoint_dir)
        done = finished_version(checkpoints, cfg.grpo.max_num_steps)
        if done is not None:  # before any process starts: the roles would only wait for a learner that stops
            log.info("%s", finished_message(checkpoints, done))
            return run_dir
    server = None
    env: dict[str, str] = {"RLQ_RUN": cfg.run_name, "PYTHONUNBUFFERED": "1"}
    # The run secret: each role gets only its own user's password from it (broker/acl.py), never the secret.
    secret = os.environ.get(SECRET_ENV) or None
    if cfg.broker.url is None:
        server, secret = _private_server(cfg, run_dir)
        env[BROKER_URL_ENV] = server.url
        log.info("private redis-server on %s (data in %s)", server.url, server.directory)
    base_env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    supervisor = Supervisor(run_dir / "logs", base_env={**base_env, **env}, policy=cfg.cluster.restarts,
                            events_path=run_dir / "events.jsonl",
                            credentials=(lambda user: role_env(secret, user)) if secret else None)  # fmt: skip
    own_login = login(secret, OPERATOR) if secret else None
    follower = MetricsFollower(
        run_dir / "metrics.jsonl",
        wandb=WandbSettings(
            enabled=cfg.logger.wandb_enabled, project=cfg.logger.wandb.project,
            name=cfg.logger.wandb.name or cfg.run_name, entity=cfg.logger.wandb.entity, mode=cfg.logger.wandb.mode,
        ),
        config=cfg.model_dump(mode="json"),
    )  # fmt: skip
    started = time.monotonic()
    if placement is not None:
        log.info("placement: %s", placement.describe())
        colocated = any(placement.colocated(i) for i in range(len(placement.generation)))
        if colocated and cfg.grpo.max_staleness > 0:
            log.info("generation shares the learner's GPU: asynchrony only interleaves their kernels there "
                     "(one H200: max_staleness 1 ran 0.95x the steps/min of 0, docs/gpu.md)")  # fmt: skip
    # From here a signal only asks the supervisor to stop: every role is then stopped in order, never orphaned.
    previous = {sig: signal.signal(sig, supervisor.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        broker_url = env.get(BROKER_URL_ENV) or cfg.broker_url()
        for spec in specs:
            supervisor.start(spec)
            if spec.wait_ready:
                _wait_ready(supervisor, spec, broker_url, cfg.run_name, own_login)
        scaler = Scaler(supervisor, roles, connect(broker_url, client_name="rlq-train", login=own_login),
                        Keys(cfg.run_name))  # fmt: skip
        scaler.announce()  # `rlq scale` from another terminal changes these counts

        def tick() -> None:
            scaler.tick()
            _report(follower, cfg.grpo.max_num_steps, started, supervisor)

        supervisor.wait(on_tick=tick)
        _report(follower, cfg.grpo.max_num_steps, started, supervisor)  # what the learner wrote after the last tick
        log.info("run finished in %.1f min: %s%s", (time.monotonic() - started) / 60, run_dir, _restarts(supervisor))
    except RoleFailed as exc:
        raise UserError(f"{exc} (logs in {run_dir / 'logs'})") from None
    except Stopped as exc:
        log.warning("%s: stopping every role (the learner checkpoints first)", exc)
        raise Stopped(exc.signum, f"{exc}; every role stopped (logs in {run_dir / 'logs'})") from None
    finally:
        supervisor.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.stop()  # before the curves (matplotlib takes seconds): every process gone first
            (run_dir / BROKER_URL_FILE).unlink(missing_ok=True)
            (run_dir / BROKER_SECRET_FILE).unlink(missing_ok=True)
        follower.close()
    return run_dir


def _restarts(supervisor: Supervisor) -> str:
    counts = supervisor.restarts
    return f" ({', '.join(f'{name} restarted {n}x' for name, n in counts.items())})" if counts else ""


def _private_server(cfg: RunConfig, run_dir: Path) -> tuple[RedisServer, str]:
    """A loopback redis-server only this run's users can log in to (a fresh secret, the `default` user off).

    The secret goes to `<run_dir>/broker_secret` (0600) beside the URL in `<run_dir>/broker_url`, so that `rlq
    workers|queues|top|scale --config <run_dir>/config.yaml` from another terminal of the same Unix user log in
    (rlq/config.py adopt_run_credentials); both are removed when the server stops."""
    secret = new_secret()
    write_private(run_dir / BROKER_SECRET_FILE, secret + "\n")
    acl_file = write_acl_file(run_dir / "redis" / "users.acl", cfg.run_name, secret)
    server = RedisServer(directory=run_dir / "redis", appendonly=True, acl_file=acl_file).start()
    (run_dir / BROKER_URL_FILE).write_text(server.url + "\n")  # a URL without credentials
    return server, secret


def _wait_ready(supervisor: Supervisor, spec: RoleSpec, broker_url: str, run: str,
                own_login: dict[str, str] | None) -> None:  # fmt: skip
    """Block until worker `spec.wait_ready` reports its engine loaded (heartbeat past "starting")."""
    from broker.registry import Registry

    registry = Registry(connect(broker_url, client_name="rlq-train", login=own_login), Keys(run))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        supervisor.check()  # a worker that dies while loading fails the run now, not after the timeout
        states = {s.heartbeat.worker_id: s.heartbeat.status for s in registry.workers("generate") if s.alive}
        if states.get(spec.wait_ready, "starting") != "starting":
            log.info("%s is ready (it shares a GPU: the next process on it starts now)", spec.name)
            return
        time.sleep(1.0)
    raise RoleFailed(f"{spec.name} did not load its engine within {READY_TIMEOUT_S:.0f}s")


def _report(follower: MetricsFollower, max_steps: int, started: float, supervisor: Supervisor) -> None:
    for record in follower.poll():
        if "val/accuracy" in record:  # a validation pass (learner/validation.py), not a step
            log.info("validation of version %d: accuracy %.3f on %d prompts", record["val/policy_version"],
                     record["val/accuracy"], record["val/prompts"])  # fmt: skip
            continue
        parts = [fmt.format(record[key]) for key, fmt in PROGRESS_KEYS if isinstance(record.get(key), (int, float))]
        if supervisor.total_restarts:
            parts.append(f"restarts {supervisor.total_restarts}")
        elapsed = (time.monotonic() - started) / 60
        log.info("step %s/%d  %s  (%.1f min)", record.get("step"), max_steps, "  ".join(parts), elapsed)
