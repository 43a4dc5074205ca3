"""Typed configuration of the learner role. Knob names follow NeMo RL's `grpo.*`, `loss_fn.*`, `policy.*` and
`checkpointing.*` wherever the meaning is the same, so the tutorial's overrides carry over.

No torch import here: the CLI and the launcher validate configs without loading torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from broker.typed import StrictModel
from learner.runtime_config import LearnerRuntime


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
    retire_solved_after: int = Field(
        0,
        ge=0,
        description="Stop sending a training prompt once this many of its groups in a row were judged correct in "
        "every sample (their advantage is zero); 0 keeps every prompt. learner/curriculum.py.",
    )
    retire_max_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="At most this share of the training prompts is retired at once; past it the one retired "
        "longest ago returns. The pool keeps easier prompts: a pool of only the hardest pulled the tiny run's "
        "policy away (docs/data.md).",
    )
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


class LRScheduleConfig(StrictModel):
    """`policy.optimizer.schedule`: how the lr moves over `grpo.max_num_steps` (learner/lr_schedule.py)."""

    kind: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="After warmup: keep the lr, or decay it linearly or along a half cosine."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup from lr / warmup_steps up to lr.")
    final_ratio: float = Field(
        0.0, ge=0, le=1, description="Decays end at this fraction of the lr, at grpo.max_num_steps."
    )


class OptimizerConfig(StrictModel):
    name: Literal["adamw"] = "adamw"
    kwargs: OptimizerKwargs = Field(default_factory=OptimizerKwargs)
    schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig)


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
