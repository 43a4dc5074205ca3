"""`rlq train` on one machine: a private Redis (unless broker.url is set), judges, generation workers and the
learner, each its own process; progress from metrics.jsonl; everything stops together.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from broker.server import RedisServer
from rlq.config import BROKER_URL_ENV, RunConfig, save_resolved
from rlq.errors import UserError
from rlq.supervisor import RoleFailed, RoleSpec, Supervisor
from rlq.tracking import MetricsFollower, WandbSettings

log = logging.getLogger(__name__)

PROGRESS_KEYS = (
    ("rollout/reward_mean", "reward {:.3f}"),
    ("rollout/staleness_mean", "staleness {:.2f}"),
    ("perf/step_s", "step {:.1f}s"),
    ("sync/broadcast_s", "sync {:.2f}s"),
)


def role_specs(cfg: RunConfig, config_path: Path) -> list[RoleSpec]:
    """The processes of a one-machine run, in start order (judges first: nothing waits on an empty queue)."""
    python = sys.executable
    base = ["--config", str(config_path)]
    specs = [
        RoleSpec("judge", [python, "-m", "rlq", "worker", "judge", *base,
                           "--concurrency", str(cfg.cluster.judge_workers)]),
    ]  # fmt: skip
    for index in range(cfg.cluster.generation_workers):
        specs.append(
            RoleSpec(f"generate-{index}", [python, "-m", "rlq", "worker", "generate", *base,
                                           "--worker-id", f"{cfg.run_name}-gen-{index}"])
        )  # fmt: skip
    learner = [python, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={cfg.cluster.learner_procs_per_node}", "-m", "rlq", "learner", *base]  # fmt: skip
    specs.append(RoleSpec("learner", learner, finishes_run=True))
    return specs


def train(cfg: RunConfig) -> Path:
    """Run the whole job on this machine; returns the run directory. Raises UserError naming a failed role."""
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    save_resolved(cfg, config_path)
    server = None
    env: dict[str, str] = {"RLQ_RUN": cfg.run_name, "PYTHONUNBUFFERED": "1"}
    if cfg.broker.url is None:
        server = RedisServer(directory=run_dir / "redis", appendonly=True).start()
        env[BROKER_URL_ENV] = server.url
        log.info("private redis-server on %s (data in %s)", server.url, server.directory)
    supervisor = Supervisor(run_dir / "logs", base_env={**os.environ, **env})
    follower = MetricsFollower(
        run_dir / "metrics.jsonl",
        wandb=WandbSettings(
            enabled=cfg.logger.wandb_enabled, project=cfg.logger.wandb.project,
            name=cfg.logger.wandb.name or cfg.run_name, entity=cfg.logger.wandb.entity, mode=cfg.logger.wandb.mode,
        ),
        config=cfg.model_dump(mode="json"),
    )  # fmt: skip
    started = time.monotonic()
    try:
        for spec in role_specs(cfg, config_path):
            supervisor.start(spec)
        supervisor.wait(on_tick=lambda: _report(follower, cfg.grpo.max_num_steps, started))
        log.info("run finished in %.1f min: %s", (time.monotonic() - started) / 60, run_dir)
    except RoleFailed as exc:
        raise UserError(f"{exc} (logs in {run_dir / 'logs'})") from None
    finally:
        supervisor.stop()
        follower.close()
        if server is not None:
            server.stop()
    return run_dir


def _report(follower: MetricsFollower, max_steps: int, started: float) -> None:
    for record in follower.poll():
        parts = [fmt.format(record[key]) for key, fmt in PROGRESS_KEYS if isinstance(record.get(key), (int, float))]
        elapsed = (time.monotonic() - started) / 60
        log.info("step %s/%d  %s  (%.1f min)", record.get("step"), max_steps, "  ".join(parts), elapsed)
