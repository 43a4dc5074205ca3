"""The run config: one YAML file composing every role's typed config, plus the tutorial-style overrides.

Sections follow NeMo RL's names where the meaning is the same (`grpo`, `loss_fn`, `policy`, `checkpointing`,
`logger`, `cluster`), so the tutorial's command-line overrides work unchanged; `policy.generation` holds the
generation workers' settings and `env.math` the judges' (NeMo Gym's `math_with_judge` resources server).
No torch or vLLM import here: every entry point validates its config before loading anything heavy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from broker.keys import check_run_name
from broker.typed import StrictModel
from learner.config import (
    CheckpointConfig,
    DataConfig,
    GRPOConfig,
    LearnerConfig,
    LossConfig,
    PolicyConfig,
    step_batch_problem,
)
from learner.runtime_config import LearnerRuntime, LearnerTuning, RolloutLogConfig, WeightSyncConfig
from rlq.overrides import apply_overrides, load_yaml
from rlq.restarts import RestartPolicy
from workers.generate.config import GenerationConfig
from workers.judge.config import JudgeConfig

BROKER_URL_ENV = "RLQ_BROKER_URL"
M = TypeVar("M", bound=BaseModel)


class BrokerConfig(StrictModel):
    url: str | None = Field(
        None,
        description="Redis URL (redis:// or rediss://, no password: each role's login comes from RLQ_REDIS_USER and "
        "RLQ_REDIS_PASSWORD, which `rlq train` derives per role from RLQ_REDIS_SECRET; docs/security.md). "
        "null: `rlq train` starts a private redis-server; the roles then read RLQ_BROKER_URL.",
    )
    trim_acked: bool = Field(
        True,
        description="Drop stream entries once every consumer group has acknowledged them (the learner trims the "
        "scored stream, generation workers the prompts stream, at each ack): Redis memory stays flat. false keeps "
        "the whole log for audits and replays; memory then grows with the run (the scored stream holds every "
        "rollout trained on).",
    )


class ClusterConfig(StrictModel):
    """How many processes of each role `rlq train` starts on this machine."""

    num_nodes: int = Field(1, ge=1, description="Nodes of the learner (torchrun --nnodes); 1 for `rlq train`.")
    learner_procs_per_node: int = Field(1, ge=1, description="Learner ranks per node (torchrun --nproc-per-node).")
    generation_workers: int = Field(1, ge=1, description="`rlq worker generate` processes.")
    judge_workers: int = Field(1, ge=1, description="Celery worker processes (`--concurrency`) of the judge role.")
    restarts: RestartPolicy = Field(default_factory=RestartPolicy, description="`rlq train`: when a role dies.")
    learner_cpus: str | None = Field(
        None,
        description='`rlq train` only: CPU ids the learner ranks are pinned to (taskset syntax, e.g. "1" or '
        '"4-7"); their torch threads = CPUs / learner_procs_per_node. null: no pinning.',
    )
    generation_cpus: str | None = Field(
        None,
        description="`rlq train` only: CPU ids each generation worker (its vLLM CPU engine's threads included, "
        "VLLM_CPU_OMP_THREADS_BIND) is pinned to; one list per worker separated by '|' (e.g. \"0\" or "
        '"0-1|2-3"). null: no pinning (vLLM binds its own threads).',
    )
    judge_cpus: str | None = Field(
        None, description="`rlq train` only: CPU ids the judge workers are pinned to. null: no pinning."
    )
    learner_gpus: str | None = Field(
        "auto",
        description="`rlq train` and `rlq doctor`: GPU ids (as this machine numbers its visible GPUs, taskset syntax) "
        "of the learner ranks, one per rank (CUDA_VISIBLE_DEVICES of the learner). auto: the first "
        "learner_procs_per_node GPUs. null: leave CUDA_VISIBLE_DEVICES as it is.",
    )
    generation_gpus: str | None = Field(
        "auto",
        description="`rlq train` and `rlq doctor`: GPU ids of each generation worker, one list per worker separated "
        "by '|' (e.g. \"4|5|6|7\"); a list holds vllm_cfg.tensor_parallel_size GPUs. auto: the GPUs the learner "
        "leaves free, one worker each; when there are fewer free GPUs than workers, workers share GPUs with the "
        "learner (colocated: vllm_cfg.colocated_gpu_memory_utilization, weights through shared memory). "
        "null: leave CUDA_VISIBLE_DEVICES as it is.",
    )

    @field_validator("learner_cpus", "generation_cpus", "judge_cpus", "learner_gpus", "generation_gpus", mode="before")
    @classmethod
    def _cpu_id_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # `learner_cpus=1`

    @model_validator(mode="after")
    def _check_cpu_lists(self) -> ClusterConfig:
        for name in ("learner_cpus", "judge_cpus"):
            value = getattr(self, name)
            if value is not None:
                parse_cpu_list(value, f"cluster.{name}")
        if self.learner_gpus not in (None, "auto"):
            parse_cpu_list(self.learner_gpus, "cluster.learner_gpus", "GPU")
        if self.generation_cpus is not None:
            self._check_per_worker("generation_cpus", self.generation_cpus, "CPU")
        if self.generation_gpus not in (None, "auto"):
            self._check_per_worker("generation_gpus", self.generation_gpus, "GPU")
        return self

    def _check_per_worker(self, name: str, text: str, what: str) -> None:
        """One '|'-separated list per generation worker, or one list for all of them."""
        lists = text.split("|")
        if len(lists) not in (1, self.generation_workers):
            raise ValueError(
                f"cluster.{name} has {len(lists)} '|'-separated lists for "
                f"{self.generation_workers} generation workers: give one list, or one per worker"
            )
        for item in lists:
            parse_cpu_list(item, f"cluster.{name}", what)

    def generation_cpu_lists(self) -> list[str]:
        """`generation_cpus` split into its per-worker lists ([] when unset)."""
        return self.generation_cpus.split("|") if self.generation_cpus else []


MAX_CPU_ID = 65536
"""CPU ids in a cpu list stay below this (Linux's own limit is lower): a typo cannot make a list of millions."""


def parse_cpu_list(text: str, name: str, what: str = "CPU") -> list[int]:
    """ "0,2-3" -> [0, 2, 3] (CPU or GPU ids). Only the syntax is checked here: the config is read on every node."""
    ids: set[int] = set()
    try:
        for part in text.replace(" ", "").split(","):
            low, dash, high = part.partition("-")
            first, last = int(low), int(high if dash else low)
            if not 0 <= first <= last < MAX_CPU_ID:
                raise ValueError(part)
            ids.update(range(first, last + 1))
    except ValueError:
        raise ValueError(f'{name}={text!r} is not a {what} list like "0", "0,2" or "4-7"') from None
    return sorted(ids)


def local_cpu_list(text: str, name: str) -> list[int]:
    """`parse_cpu_list`, and every id must be a CPU this process may run on (for the machine that pins)."""
    ids = parse_cpu_list(text, name)
    available = (
        sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    )
    if not set(ids) <= set(available):
        raise ValueError(
            f"{name}={text!r} names CPUs this machine does not offer (available: {_ranges(available)}); "
            f"set it to a subset, or to null for no pinning"
        )
    return ids


def _ranges(ids: list[int]) -> str:
    out, start = [], ids[0] if ids else 0
    for i, cpu in enumerate(ids):
        if i + 1 == len(ids) or ids[i + 1] != cpu + 1:
            out.append(str(start) if start == cpu else f"{start}-{cpu}")
            if i + 1 < len(ids):
                start = ids[i + 1]
    return ",".join(out)


class WandbConfig(StrictModel):
    project: str = "rlq"
    name: str | None = None
    entity: str | None = None
    mode: str | None = Field(None, description="online | offline | disabled; null: online iff WANDB_API_KEY set.")


class LoggerConfig(StrictModel):
    log_dir: Path = Field(Path("runs/default"), description="The run directory: logs, metrics.jsonl, curves.")
    wandb_enabled: bool = Field(True, description="Log to W&B (online with WANDB_API_KEY, else offline).")
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    prometheus_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="`rlq train` also serves the run's Prometheus metrics on this port "
        "(`rlq metrics-server`, docs/operations.md); null: not served.",
    )
    prometheus_addr: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the metrics are served on; anything but loopback needs "
        "RLQ_METRICS_AUTH=user:password in the environment (HTTP basic auth).",
    )
    rollout_log: RolloutLogConfig = Field(
        default_factory=RolloutLogConfig,
        description="Every group the learner trains on or drops, as Parquet in <log_dir>/rollouts (docs/rollouts.md).",
    )


class RunPolicyConfig(PolicyConfig):
    generation: GenerationConfig = Field(default_factory=GenerationConfig)


class EnvConfig(StrictModel):
    math: JudgeConfig = Field(default_factory=JudgeConfig)


class RunConfig(StrictModel):
    run_name: str = Field("default", description="Names the run's Redis keys; letters, digits, '_', '.', '-'.")
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    loss_fn: LossConfig = Field(default_factory=LossConfig)
    policy: RunPolicyConfig
    checkpointing: CheckpointConfig = Field(default_factory=CheckpointConfig)
    data: DataConfig
    env: EnvConfig = Field(default_factory=EnvConfig)
    logger: LoggerConfig = Field(default_factory=LoggerConfig)
    weight_sync: WeightSyncConfig = Field(
        default_factory=WeightSyncConfig, description="How and how often new weights reach the generation workers."
    )
    learner: LearnerTuning = Field(
        default_factory=LearnerTuning,
        description="The learner role's own settings: reads, timeouts, its torchrun backend, replica checks.",
    )

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        check_run_name(self.run_name)
        problem = step_batch_problem(self.grpo, self.policy)  # refused here, before `rlq train` starts a role
        if problem:
            raise ValueError(problem)
        return self

    @property
    def run_dir(self) -> Path:
        return self.logger.log_dir

    def broker_url(self) -> str:
        """The configured URL, else the one the launcher exported for its private server, else the one the run
        directory names while `rlq train` runs (so `rlq worker generate --config <run_dir>/config.yaml` from another
        terminal joins the run)."""
        url = self.broker.url or os.environ.get(BROKER_URL_ENV) or private_broker_url(self.run_dir)
        if not url:
            raise ValueError(f"no broker: set broker.url=redis://HOST:PORT/0 or {BROKER_URL_ENV}")
        return url

    def learner_config(self) -> LearnerConfig:
        policy = PolicyConfig(**self.policy.model_dump(exclude={"generation"}))
        runtime_fields = {
            "run": self.run_name, "broker_url": self.broker_url(), "run_dir": self.run_dir,
            "trim_acked": self.broker.trim_acked, "weight_sync": self.weight_sync,
            "rollout_log": self.logger.rollout_log,
        }  # fmt: skip
        return LearnerConfig(
            grpo=self.grpo, loss_fn=self.loss_fn, policy=policy, checkpointing=self.checkpointing, data=self.data,
            learner=LearnerRuntime(**self.learner.model_dump(), **runtime_fields),
        )  # fmt: skip


BROKER_URL_FILE = "broker_url"
"""The run directory's note of its broker: `rlq train` writes its private server's loopback URL there while it runs
(rlq/launch.py), the Slurm scripts the head node's URL. Never a password: see BROKER_SECRET_FILE."""
BROKER_SECRET_FILE = "broker_secret"
"""The run secret (broker/acl.py), mode 0600, beside BROKER_URL_FILE: every Redis user's password derives from it, so
`rlq queues|workers|top|scale --config <run_dir>/config.yaml` from another terminal of the same Unix user log in."""


def adopt_run_credentials(run_dir: Path, user: str) -> bool:
    """Log this process in as `user` with the password derived from the run's secret file, unless the environment
    already names a password (a role started by the launcher or a script). True when it did."""
    from broker.acl import role_env
    from broker.connection import PASSWORD_ENV

    if os.environ.get(PASSWORD_ENV):
        return False
    try:
        secret = (Path(run_dir) / BROKER_SECRET_FILE).read_text().strip()
    except OSError:
        return False
    if secret:
        os.environ.update(role_env(secret, user))
    return bool(secret)


def private_broker_url(run_dir: Path) -> str | None:
    """The broker URL `run_dir/broker_url` names, if the file is there."""
    try:
        return (Path(run_dir) / BROKER_URL_FILE).read_text().strip() or None
    except OSError:
        return None


def load_run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read `path`, apply overrides, validate. Raises ConfigError / pydantic.ValidationError (one-line in the CLI)."""
    return load_typed(path, overrides, RunConfig)


def load_typed(path: str | Path, overrides: list[str] | tuple[str, ...], model: type[M]) -> M:
    """The one way any command reads its config: the file, completed with every default of `model`, the overrides
    applied, validated as `model` (a run config, or a learner-only one)."""
    tree = load_yaml(path)
    for item in overrides:
        # Overrides address the schema, not only what the file spells out: `key=value` may set any key that
        # has a default. So each applies to the tree completed with every default (when it is valid so far).
        before = _completed(tree, model)
        tree = apply_overrides(before, [item])
        _reset_switched_union(before, tree, item)
    return model.model_validate(tree)


def _completed(tree: dict, model: type[M]) -> dict:
    try:
        return model.model_validate(tree).model_dump(mode="json")
    except ValidationError:
        return tree  # e.g. a required key a later override supplies: apply to the tree as written


def _reset_switched_union(before: dict, after: dict, item: str) -> None:
    """An override that switches a union's `kind` (weight_sync.transport.kind=filesystem) would leave the old
    variant's settings beside it, which the new variant refuses: the section restarts from the new kind's
    defaults instead (later overrides set its fields)."""
    key = item.lstrip("+").partition("=")[0]
    *parents, leaf = key.split(".")
    if leaf != "kind" or not parents or item.startswith("~"):
        return
    old: Any = before
    new: Any = after
    for part in parents:
        old = old.get(part) if isinstance(old, dict) else None
        new = new[part]
    if isinstance(old, dict) and old.get("kind") != new["kind"]:
        kind = new["kind"]
        new.clear()
        new["kind"] = kind


def save_resolved(cfg: RunConfig, path: Path) -> None:
    """Write the fully resolved config (defaults included) so the run can be repeated exactly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
