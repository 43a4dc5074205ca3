"""How the learner role runs and talks to the rest of a run: the weight-sync transports, the feeder's admission, the
rollout log, and the role's own tuning (`LearnerTuning`, `learner:` in a run config) with what the run config says
elsewhere (`LearnerRuntime`). The algorithm's settings, named after NeMo RL's, are learner/config.py.

No torch import here: the CLI and the launcher validate configs without loading torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from broker.typed import StrictModel


class CollectiveTransport(StrictModel):
    """Weights travel over a weight group of their own: NCCL between GPUs, gloo on CPU (docs/weight_sync.md).

    Workers on the learner's own device (colocated on one GPU, or on CPU with `share_memory: host`) read shared
    buffers the learner rewrites at each sync instead of joining the group: two ranks cannot share a GPU in
    NCCL. That choice is per worker inside one broadcast, so a run with colocated and remote workers uses both
    at once; it is a setting of this transport, not a transport of its own."""

    kind: Literal["collective"] = "collective"
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Backend of the weight group; auto: NCCL when the weights are on a GPU, else gloo."
    )
    addr: str | None = Field(None, description="Address workers reach the group's TCPStore at; null: this host's name.")
    port: int = Field(0, ge=0, le=65535, description="TCPStore port of the weight group; 0: any free port.")
    bucket_mb: float = Field(64.0, gt=0, le=65536, description="Largest flat bucket of one broadcast (MiB).")
    timeout_s: float = Field(60.0, gt=0, description="Bound of one broadcast: rendezvous and every bucket's wait.")
    share_memory: Literal["auto", "host", "off"] = Field(
        "auto",
        description="Which workers read the learner's shared buffers (CUDA IPC on a GPU, /dev/shm on CPU) instead "
        "of joining the group. auto: those on the learner's own GPU. host: also CPU workers on the learner's "
        "host. off: every worker joins the group.",
    )


class FilesystemTransport(StrictModel):
    """One safetensors file per version in a directory every worker can read (a shared filesystem)."""

    kind: Literal["filesystem"]
    directory: Path | None = Field(None, description="Where the files go; null: <logger.log_dir>/weights.")


class NoTransport(StrictModel):
    """No weight sync: a run without generation workers (the learner reads a stream someone else fills)."""

    kind: Literal["none"]


WeightTransport = Annotated[CollectiveTransport | FilesystemTransport | NoTransport, Field(discriminator="kind")]


class WeightSyncConfig(StrictModel):
    """How and how often new weights reach the generation workers: `weight_sync:` in a run config.

    Switching `transport.kind` with an override resets the transport's settings to that kind's defaults; set
    its fields after the kind (`weight_sync.transport.kind=filesystem weight_sync.transport.directory=/x`)."""

    period: int = Field(1, ge=1, description="Send weights every this many steps (and after the last).")
    transport: WeightTransport = Field(default_factory=CollectiveTransport)

    @property
    def enabled(self) -> bool:
        return self.transport.kind != "none"

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "share_memory" in data:
            raise ValueError("weight_sync.share_memory moved to weight_sync.transport.share_memory")
        return data


class AdmissionConfig(StrictModel):
    """How the feeder cuts and paces what it publishes (learner/admission.py, docs/architecture.md)."""

    pull_unit_prompts: int | None = Field(
        4,
        ge=1,
        le=4096,
        description="Capacity-aware pulls: each grpo.prompts_per_message batch goes out as messages of at most this "
        "many prompts, which the generation workers take several at a time, each its share of the fleet's "
        "throughput (policy.generation.worker.pull), and sample in one engine call. null: one message per batch.",
    )
    judge_aware: bool = Field(
        True,
        description="Judge-aware backpressure: while groups wait for a judge (Celery queue not empty) longer than "
        "judge_wait_steps learner steps, or than the refill time where that is longer (update, weight sync and "
        "generation of what the feeder releases next), the feeder keeps that much of the staleness window "
        "unpublished, so the prompts are generated later, with newer weights, instead of ageing in the judge "
        "queue. false: the staleness window alone (bench/judge_backpressure.py compares the two).",
    )
    judge_wait_steps: float = Field(
        0.5,
        ge=0,
        le=100,
        description="Learner steps a group may wait for its judge before the feeder holds prompts back; the refill "
        "time replaces it where longer, so the judge still has work queued when the released prompts reach it.",
    )
    min_window_steps: float = Field(
        1.0,
        gt=0,
        le=100,
        description="The judge-aware window never drops below this many steps of prompts (nor above the staleness "
        "window), so a step's prompts are always out.",
    )
    judge_poll_s: float = Field(
        0.5, gt=0, le=60, description="Seconds between two reads of the judge queue's depth by the feeder."
    )
    latency_ema: float = Field(
        0.2, gt=0, le=1, description="Weight of the newest sample in the scoring-latency and step-time averages."
    )


class LearnerTuning(StrictModel):
    """The learner role's own settings: `learner:` in a run config (the rest of LearnerRuntime comes from the run)."""

    admission: AdmissionConfig = Field(
        default_factory=AdmissionConfig, description="Feeder message size and judge-aware backpressure."
    )

    dist_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Backend of the learner's own torchrun group; auto: NCCL on GPUs, else gloo."
    )
    read_block_ms: int = Field(1000, ge=1, description="Longest blocking read on the scored stream.")
    data_timeout_s: float = Field(1800.0, gt=0, description="Give up when no scored group arrives for this long.")
    check_replicas_every: int = Field(
        0, ge=0, description="Every this many steps compare a parameter checksum across ranks (0: never)."
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        # The weight-sync keys lived here before they became the run config's `weight_sync:` section: name the
        # new key instead of a bare "extra inputs are not permitted".
        if isinstance(data, dict):
            for old, new in _MOVED_WEIGHT_KEYS.items():
                if old in data and old not in cls.model_fields:  # LearnerRuntime has a `weight_sync` of its own
                    raise ValueError(f"learner.{old} moved to {new}")
        return data


_MOVED_WEIGHT_KEYS = {
    "weight_sync": "weight_sync.transport.kind (collective | filesystem | none)",
    "weight_sync_period": "weight_sync.period",
    "weight_sync_addr": "weight_sync.transport.addr",
    "weight_sync_port": "weight_sync.transport.port",
    "weight_bucket_mb": "weight_sync.transport.bucket_mb",
    "weight_sync_timeout_s": "weight_sync.transport.timeout_s",
}


class RolloutLogConfig(StrictModel):
    """The rollout log (learner/rollout_log.py, docs/rollouts.md): every group the learner trains on or drops, as
    Parquet under `<run_dir>/rollouts/`, written by a background thread of rank 0. `logger.rollout_log` in a run
    config."""

    enabled: bool = Field(True, description="Keep the log; false writes nothing and starts no thread.")
    max_rows_per_file: int = Field(
        50_000, ge=1, le=10_000_000, description="Rows (samples) per Parquet part at most; a full buffer is written."
    )
    flush_steps: int = Field(
        10, ge=1, le=100_000, description="Write a part at least every this many steps (what a crash can lose)."
    )
    keep_text: bool = Field(True, description="Keep the prompt and completion text besides their token ids.")
    max_mb: float = Field(
        4096.0, gt=0, le=1e7, description="Size of the whole log (MiB); past it rows are counted as lost, not written."
    )
    queue_steps: int = Field(
        64,
        ge=1,
        le=100_000,
        description="Steps of groups waiting for the writer; when it falls behind further, rows are dropped and "
        "counted (rollout/log_rows_lost) rather than slowing training.",
    )


class LearnerRuntime(LearnerTuning):
    """How the learner role talks to the rest of the run: its tuning plus what the run config says elsewhere."""

    run: str = Field("rlq", description="Run name: the Redis key namespace.")
    broker_url: str = "redis://127.0.0.1:6379/0"
    run_dir: Path = Field(Path("runs/rlq"), description="metrics.jsonl and ledger.jsonl go here.")
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig, description="The run's weight_sync.")
    trim_acked: bool = Field(
        True, description="Trim the scored stream at each ack (see the run config's broker.trim_acked)."
    )
    rollout_log: RolloutLogConfig = Field(
        default_factory=RolloutLogConfig, description="The run's logger.rollout_log: groups trained and dropped."
    )
