"""Typed configuration of the learner role. Knob names follow NeMo RL's `grpo.*`, `loss_fn.*`, `policy.*` and
`checkpointing.*` wherever the meaning is the same, so the tutorial's overrides carry over.

No torch import here: the CLI and the launcher validate configs without loading torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from broker.typed import StrictModel


class RewardShapingConfig(StrictModel):
    """DAPO soft overlong punishment (NeMo RL `grpo.reward_shaping`)."""

    enabled: bool = False
    overlong_buffer_length: int = Field(128, ge=1, description="Tokens before the limit where the penalty ramps.")
    overlong_buffer_penalty: float = Field(1.0, ge=0, description="Penalty at (and beyond) the length limit.")
    max_response_length: int = Field(1024, ge=1, description="Completion length at which the full penalty applies.")


class GRPOConfig(StrictModel):
    """What one step consumes and how advantages are formed (NeMo RL `grpo.*`)."""

    num_prompts_per_step: int = Field(32, ge=1, description="Groups (prompts) trained on per step.")
    num_generations_per_prompt: int = Field(16, ge=1, description="Samples per prompt: the GRPO group size.")
    max_num_steps: int = Field(100, ge=1, description="Stop after this policy version.")
    normalize_rewards: bool = Field(True, description="Divide advantages by the group std (off for Dr.GRPO).")
    use_leave_one_out_baseline: bool = Field(True, description="RLOO baseline: mean of the other samples.")
    max_staleness: int = Field(
        0,
        ge=0,
        description="Admit a group only if learner_version - group_version <= this; 0 is synchronous on-policy. "
        "NeMo RL calls it grpo.async_grpo.max_trajectory_age_steps.",
    )
    use_dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose rewards all agree (no signal).")
    overlong_filtering: bool = Field(False, description="Truncated samples count in the baseline, get no gradient.")
    reward_shaping: RewardShapingConfig = Field(default_factory=RewardShapingConfig)
    seed: int = Field(42, description="Seeds data order and torch.")
    prompts_per_message: int = Field(8, ge=1, description="Prompts per PromptBatch the feeder publishes.")
    # In-run validation, under NeMo RL's names (learner/validation.py): the workers sample the validation split
    # with the policy of that version, the judges score it, the learner logs val/* metrics. Training never waits.
    val_at_start: bool = Field(False, description="Validate the starting policy (version 0) too.")
    val_period: int = Field(
        0, ge=0, description="Validate after every this many steps, and after the last one (0: never)."
    )
    max_val_samples: int = Field(
        256, ge=1, description="Validation prompts per pass: the first this many of the validation split."
    )
    num_val_generations_per_prompt: int = Field(
        1, ge=1, description="Samples per validation prompt; val/accuracy averages over all of them."
    )

    @property
    def validates(self) -> bool:
        return bool(self.val_period or self.val_at_start)


class LossConfig(StrictModel):
    """The policy loss (NeMo RL `loss_fn.*`); see learner/loss.py for each variant."""

    reference_policy_kl_penalty: float = Field(0.0, ge=0, description="Weight of k3 KL to the initial policy.")
    ratio_clip_min: float = Field(0.2, ge=0, le=1, description="Ratio clipped below at 1 - this.")
    ratio_clip_max: float = Field(0.2, ge=0, description="Ratio clipped above at 1 + this (DAPO: 0.28).")
    ratio_clip_c: float | None = Field(None, gt=1, description="Dual-clip bound for negative advantages.")
    token_level_loss: bool = Field(True, description="Average over all tokens of the step; false: per sequence.")
    constant_length_normalizer: int | None = Field(
        None, ge=1, description="Dr.GRPO: divide the token sum by sequences x this length instead."
    )
    use_importance_sampling_correction: bool = Field(
        False, description="Weight tokens by pi_learner / pi_behaviour (truncated at the ratio below)."
    )
    truncated_importance_sampling_ratio: float | None = Field(2.0, gt=0, description="TIS cap; null: untruncated.")
    use_decoupled_ppo: bool = Field(False, description="Decoupled PPO: same weight, tokens above the cap masked.")
    decoupled_ppo_weight_cap: float | None = Field(5.0, gt=0, description="Mask threshold of the decoupled weight.")

    reference_policy_kl_type: Literal["k3"] = Field("k3", description="KL estimator (Schulman's k3 only).")
    use_on_policy_kl_approximation: Literal[False] = Field(
        False, description="NeMo RL knob accepted for config compatibility; only false is implemented."
    )
    sequence_level_importance_ratios: Literal[False] = Field(
        False, description="NeMo RL knob accepted for config compatibility; only false (token-level) is implemented."
    )

    @model_validator(mode="after")
    def _one_correction(self) -> LossConfig:
        if self.use_decoupled_ppo and self.use_importance_sampling_correction:
            raise ValueError("choose one of loss_fn.use_decoupled_ppo and loss_fn.use_importance_sampling_correction")
        return self

    @property
    def aggregation(self) -> str:
        if self.constant_length_normalizer:
            return "constant"
        return "token" if self.token_level_loss else "sequence"


class OptimizerKwargs(StrictModel):
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)


class OptimizerConfig(StrictModel):
    name: Literal["adamw"] = "adamw"
    kwargs: OptimizerKwargs = Field(default_factory=OptimizerKwargs)


class DTensorConfig(StrictModel):
    """NeMo RL `policy.dtensor_cfg`: FSDP2 instead of DDP."""

    enabled: bool = Field(False, description="Shard parameters, gradients and optimizer state over the ranks.")
    clear_cache_every_n_steps: int | None = Field(
        None,
        ge=1,
        description="On GPUs, return the allocator's cached blocks (torch.cuda.empty_cache) every this many steps, "
        "against fragmentation when sample lengths vary. null: never.",
    )


class SequencePackingConfig(StrictModel):
    """NeMo RL `policy.sequence_packing`: samples back to back in micro-batches of a token budget, no padding.

    Packs are formed by first-fit decreasing (learner/packing.py); attention stays within each sample through
    flash varlen attention (learner/kernels.py). `train_micro_batch_size` then only sets the default budget.
    """

    enabled: Literal["auto"] | bool = Field(
        "auto",
        description="auto: on when the learner runs on CUDA in bfloat16 (the flash varlen kernel); off on CPU, "
        "where packed samples would take one attention call each.",
    )
    train_mb_tokens: int | None = Field(
        None,
        ge=2,
        description="Tokens per packed micro-batch (a longer sample gets one of its own); null: "
        "max_total_sequence_length x train_micro_batch_size. Activation memory grows with it: Qwen3-4B in "
        "bfloat16 without activation checkpointing keeps ~4 MB a token with compiled layers, ~6 MB eager.",
    )


class PolicyConfig(StrictModel):
    """The trained model (NeMo RL `policy.*`)."""

    model_name: str = Field(..., description="HF model id or local directory.")
    tokenizer_name: str | None = Field(None, description="Defaults to model_name.")
    max_total_sequence_length: int = Field(1024, ge=2, description="Prompt + completion tokens; longer is cut.")
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="Compute dtype of the forward (autocast); the weights' dtype is master_weights."
    )
    master_weights: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="dtype of the trained weights, their gradients and the AdamW moments. float32: torch's AdamW, "
        "bfloat16 compute under autocast (16 bytes a parameter: 64 GB for Qwen3-4B). bfloat16 (needs precision "
        "bfloat16): half the memory, so Qwen3-4B trains on one 80 GB GPU without activation checkpointing; the "
        "update is computed in float32 and stored by stochastic rounding (learner/optim.py), since torch's "
        "AdamW on bfloat16 weights rounds away every update below 2^-9 of the weight (nearly all at lr 1e-6).",
    )
    train_global_batch_size: int | None = Field(
        None, ge=1, description="Samples per optimizer update; null: the whole step (one update per step)."
    )
    train_micro_batch_size: int = Field(4, ge=1, description="Samples per forward/backward on one rank.")
    max_grad_norm: float | None = Field(1.0, gt=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder layer in backward: about a third more compute, far less memory."
    )
    sequence_packing: SequencePackingConfig = Field(default_factory=SequencePackingConfig)
    skip_zero_advantage: bool = Field(
        True,
        description="Leave samples with advantage exactly 0 (all of a group whose rewards agree) out of the forward "
        "and backward. Their gradient is zero, and the loss normalisers still count them, so the update is "
        "unchanged; only with loss_fn.reference_policy_kl_penalty 0 (the KL term would give them a gradient). "
        "On the tiny arithmetic run that is a quarter of a step's samples at the start and 70 % at the end. "
        "loss/entropy, loss/clip_fraction, the ratio figures and perf/tokens then cover the samples that trained.",
    )
    logprob_chunk_size: int | None = Field(
        2048,
        ge=1,
        description="LM-head rows computed at once for the completion logprobs (recomputed in backward), so the "
        "float32 [tokens, vocab] logits never exist whole; null: all at once.",
    )
    torch_compile: Literal["auto"] | bool = Field(
        "auto",
        description="torch.compile each decoder layer: fused norms, RoPE and SiLU, and fewer saved activations "
        "(Qwen3-4B on one H100: 30 -> 46 % MFU, packed micro-batches of 8k tokens then fit without activation "
        "checkpointing). The first step pays the compile (~30 s). auto: on when the learner runs on CUDA in "
        "bfloat16, as sequence_packing.enabled.",
    )
    dtensor_cfg: DTensorConfig = Field(default_factory=DTensorConfig)

    @model_validator(mode="after")
    def _master_not_below_compute(self) -> PolicyConfig:
        if self.master_weights == "bfloat16" and self.precision == "float32":
            raise ValueError("policy.master_weights bfloat16 needs policy.precision bfloat16 (the forward would "
                             "run in bfloat16 anyway)")  # fmt: skip
        return self


class CheckpointConfig(StrictModel):
    """NeMo RL `checkpointing.*`."""

    enabled: bool = True
    checkpoint_dir: Path = Field(Path("results/grpo"), description="Where step_<N>/ directories go.")
    save_period: int = Field(10, ge=1, description="Save every this many steps (and at the end).")
    keep_last: int = Field(
        3, ge=1, description="The newest this many checkpoints are kept (learner/checkpoint_select.py)."
    )
    keep_top_k: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Also keep the best this many checkpoints by `metric_name` (NeMo RL's keep_top_k), measured by "
        "the in-run validation pass of the checkpoint's own version; every validated version is then checkpointed "
        "too. The latest checkpoint is always kept (resume), and so is one whose validation is still out. "
        "null: keep_last alone decides.",
    )
    metric_name: str = Field(
        "val/accuracy",
        min_length=1,
        description="The validation metric keep_top_k ranks by, a val/* key of metrics.jsonl (NeMo RL's spelling "
        "val:accuracy is read as val/accuracy).",
    )
    higher_is_better: bool = Field(True, description="Rank keep_top_k by the largest metric (false: smallest).")
    save_dtype: Literal["float32", "bfloat16"] | None = Field(
        None,
        description="dtype of the saved policy weights (optimizer state keeps its own). null: policy.master_weights. "
        "bfloat16 halves the policy's share of a save (Qwen3-4B: 16 -> 8 GB); resume loads them into the master "
        "dtype, so float32 master weights resume rounded to bfloat16 once.",
    )

    @field_validator("metric_name")
    @classmethod
    def _nemo_spelling(cls, name: str) -> str:
        return name.replace(":", "/", 1) if name.startswith("val:") else name


class DataConfig(StrictModel):
    path: Path = Field(..., description="Prepared examples (rlq/data.py `load_prepared`).")
    shuffle: bool = True
    validation_path: Path | None = Field(
        None,
        description="Validation examples for grpo.val_period / val_at_start; null: validation.jsonl next to the "
        "training split when data.path is a prepared directory.",
    )


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
        False,
        description="Off by default: bench/judge_backpressure.py did not show it saving stale groups yet. "
        "Judge-aware backpressure: while groups wait for a judge (Celery queue not empty) longer than "
        "judge_wait_steps learner steps, the feeder keeps that much of the staleness window unpublished, so "
        "generation waits for the judges instead of producing groups that age in their queue.",
    )
    judge_wait_steps: float = Field(
        0.5,
        ge=0,
        le=100,
        description="Learner steps a group may wait for its judge before the feeder holds prompts back (the judge "
        "then still has that much work queued).",
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


class LearnerConfig(StrictModel):
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    loss_fn: LossConfig = Field(default_factory=LossConfig)
    policy: PolicyConfig
    checkpointing: CheckpointConfig = Field(default_factory=CheckpointConfig)
    data: DataConfig
    learner: LearnerRuntime = Field(default_factory=LearnerRuntime)

    @model_validator(mode="after")
    def _batch_fits(self) -> LearnerConfig:
        problem = step_batch_problem(self.grpo, self.policy)
        if problem:
            raise ValueError(problem)
        return self


def step_batch_problem(grpo: GRPOConfig, policy: PolicyConfig) -> str:
    """Why `policy.train_global_batch_size` does not fit the step, or "" (the run config and the learner's check)."""
    step = grpo.num_prompts_per_step * grpo.num_generations_per_prompt
    batch = policy.train_global_batch_size
    if batch is not None and step % batch:
        return (
            f"policy.train_global_batch_size={batch} does not divide the step's {step} samples "
            f"(grpo.num_prompts_per_step x grpo.num_generations_per_prompt); set it to a divisor, or to null "
            f"for one update per step"
        )
    return ""
