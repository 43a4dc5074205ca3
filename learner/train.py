"""The learner role: `run(cfg)` under torchrun (DDP, or FSDP2 with `policy.dtensor_cfg.enabled`; gloo on CPU, NCCL
on GPU; any world size, any node count).

Each step:
1. rank 0 tops up the prompt stream (backpressure), collects `num_prompts_per_step` admissible scored groups
   (staleness window, dynamic sampling, duplicates), computes advantages and cuts the batch into rank shares;
2. every rank receives its share (`scatter_object_list`: an in-cluster collective, not a wire message);
3. every rank runs the updates (`learner.step.Trainer`) and the statistics are all-reduced;
4. rank 0 broadcasts the weights every `weight_sync.period` steps, publishes the version in the policy hash,
   writes metrics and the ledger, and checkpoints every `save_period` steps, after which it acknowledges
   the scored entries the checkpoint covers.

Distributed setup and the step's collectives live in learner/distributed.py; rank 0's side of the step (Redis,
feeder/collector, metrics, validation, weight sync, checkpoints) in learner/coordinator.py. This module keeps
`run`, the loop and the builders of the trainer (model, optimizer, loss and forward settings).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from broker.policy import CHECKPOINT_POLICY_DIR, finished_message, latest_checkpoint
from learner.checkpoint import load_checkpoint
from learner.config import LearnerConfig, PolicyConfig
from learner.coordinator import Coordinator
from learner.distributed import DistInfo, broadcast_plan, init_distributed, replica_spread, scatter_shares
from learner.loss import LossSettings
from learner.lr_schedule import lr_factor
from learner.step import ForwardSettings, Trainer, reduce_stats

log = logging.getLogger(__name__)


def loss_settings(cfg: LearnerConfig) -> LossSettings:
    """The loss's knobs from `loss_fn.*`: every field of the same name, plus the two the config names otherwise."""
    lf = cfg.loss_fn
    same = {f.name: getattr(lf, f.name) for f in dataclasses.fields(LossSettings) if f.name in type(lf).model_fields}
    return LossSettings(**same, aggregation=lf.aggregation, constant_length=lf.constant_length_normalizer)


def forward_settings(cfg: LearnerConfig, device: torch.device) -> ForwardSettings:
    """Packing, logprob chunks and compilation from `policy.*`; "auto" means on CUDA with a half compute dtype
    (the flash varlen kernel's case, and the one measured: bench/gpu_learner.py)."""
    policy = cfg.policy
    fast = device.type == "cuda" and policy.precision != "float32"
    packing = fast if policy.sequence_packing.enabled == "auto" else policy.sequence_packing.enabled
    budget = policy.sequence_packing.train_mb_tokens or policy.max_total_sequence_length * policy.train_micro_batch_size
    return ForwardSettings(
        pack_tokens=budget if packing else None,
        logprob_chunk=policy.logprob_chunk_size,
        compile_layers=fast if policy.torch_compile == "auto" else bool(policy.torch_compile),
    )


def load_model(path: str | Path, precision: str, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, precision)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device)


def build_optimizer(params, policy: PolicyConfig, seed: int = 0) -> torch.optim.Optimizer:
    """AdamW as `policy.optimizer` sets it, for weights of dtype `policy.master_weights`; `seed` (the run's
    grpo.seed) seeds the stochastic rounding of bfloat16 weights."""
    kw = policy.optimizer.kwargs
    params = list(params)
    if policy.master_weights == "bfloat16":  # torch's AdamW would round most updates away (learner/optim.py)
        from learner.optim import StochasticAdamW

        return StochasticAdamW(params, lr=kw.lr, weight_decay=kw.weight_decay, betas=kw.betas, eps=kw.eps, seed=seed)
    # fused on GPUs: one kernel for all tensors and no foreach temporaries (~one more copy of the weights)
    fused = bool(params) and params[0].device.type == "cuda"
    return torch.optim.AdamW(params, lr=kw.lr, weight_decay=kw.weight_decay, betas=kw.betas, eps=kw.eps,
                             fused=fused, foreach=not fused)  # fmt: skip


class _StopFlag:
    """SIGTERM/SIGINT (torchrun forwards them to every rank): rank 0 finishes the step in hand or stops waiting
    for data, checkpoints and tells the other ranks to stop; they wait for that word instead of dying mid-step."""

    def __init__(self) -> None:
        self.set = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.set:  # torchrun and `rlq train` may both deliver it
            log.warning("signal %d: stopping after this step (checkpoint, no weight broadcast)", signum)
        self.set = True


def run(cfg: LearnerConfig) -> int:
    """Train until `grpo.max_num_steps`; returns the final policy version."""
    info = init_distributed(cfg.learner.dist_backend)
    torch.manual_seed(cfg.grpo.seed)
    resume = latest_checkpoint(Path(cfg.checkpointing.checkpoint_dir)) if cfg.checkpointing.enabled else None
    trainer, tokenizer = build_trainer(cfg, info, resume)
    version, state, pending = 0, None, b""
    if resume is not None:
        state, pending, optimizer_state = load_checkpoint(resume)
        trainer.load_optimizer_state(optimizer_state)
        version = int(state["version"])
    # A finished run resumed: no step, no weight sync, no validation (no worker could get the weights to serve it).
    finished = resume is not None and version >= cfg.grpo.max_num_steps
    if finished and info.is_main:
        log.warning("%s", finished_message(Path(cfg.checkpointing.checkpoint_dir), version))
    coordinator = None
    stop = _StopFlag()
    if info.is_main:
        coordinator = Coordinator(cfg, tokenizer)
        if state is not None:
            coordinator.restore(state, pending)
        coordinator.recover(version)
        coordinator.policy.set_version(version)
        if not finished:
            coordinator.start_validation(version)
    gathered = -1  # the version trainer.full_model() last gathered (FSDP2's full copy on rank 0)
    if resume is not None and cfg.learner.weight_sync.enabled and not finished:
        full = trainer.full_model()  # a collective under FSDP2
        gathered = version
        if coordinator is not None and coordinator.weights is not None and full is not None:
            coordinator.sync_weights(version, full)  # workers may hold weights of a discarded timeline
    try:
        version = _loop(cfg, info, trainer, coordinator, stop, version, gathered)
        if coordinator is not None and not stop.set:
            coordinator.finish_validation(version)
    finally:
        if coordinator is not None:
            coordinator.close()
        if info.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return version


def build_trainer(cfg: LearnerConfig, info: DistInfo, resume: Path | None) -> tuple[Trainer, object]:
    """The policy (from the checkpoint when resuming), its optimizer, the reference if any; and the tokenizer."""
    from transformers import AutoTokenizer

    model_path = resume / CHECKPOINT_POLICY_DIR if resume else cfg.policy.model_name
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.policy.tokenizer_name or model_path))
    master = cfg.policy.master_weights  # the trained weights' dtype; the forward's is policy.precision
    model = load_model(model_path, master, info.device)
    fsdp = cfg.policy.dtensor_cfg.enabled and info.world_size > 1
    shadow = load_model(model_path, master, torch.device("cpu")) if fsdp and info.is_main else None
    if cfg.policy.activation_checkpointing:
        model.gradient_checkpointing_enable()
    reference = None
    if cfg.loss_fn.reference_policy_kl_penalty > 0:
        reference = load_model(cfg.policy.model_name, cfg.policy.precision, info.device).requires_grad_(False)
    trainer = Trainer(
        model,
        lambda params: build_optimizer(params, cfg.policy, cfg.grpo.seed),
        loss_settings(cfg),
        world_size=info.world_size,
        micro_batch_size=cfg.policy.train_micro_batch_size,
        max_grad_norm=cfg.policy.max_grad_norm,
        device=info.device,
        reference=reference,
        pad_id=tokenizer.pad_token_id or 0,
        compute_dtype=getattr(torch, cfg.policy.precision),
        fsdp=fsdp,
        shadow=shadow,
        forward=forward_settings(cfg, info.device),
    )
    if info.is_main:
        log.info("parallelism: %s over %d ranks", "fsdp2" if fsdp else "ddp", info.world_size)
    return trainer, tokenizer


def _loop(cfg, info: DistInfo, trainer: Trainer, coordinator, stop, version: int, gathered: int = -1) -> int:
    def current_weights() -> torch.nn.Module | None:
        """The weights at `version` on rank 0 without a collective: the model itself, or FSDP2's full copy when it
        was gathered at this version (for a worker that asks to join while the step waits for data)."""
        if not trainer.fsdp:
            return trainer.full_model()
        return trainer.shadow if gathered == version else None

    if coordinator is not None:  # the closure reads the loop's latest version, also after the loop has ended
        coordinator.current_weights = current_weights
    while True:
        t_step = time.perf_counter()
        payloads, step_info, wait_s = None, None, 0.0
        if info.is_main:
            prepared = None
            if version < cfg.grpo.max_num_steps and not stop.set:
                prepared = coordinator.prepare(version, info.world_size, lambda: stop.set)
            if prepared is None:  # a last checkpoint keeps what was read but not trained
                save = cfg.checkpointing.enabled and version != coordinator.last_saved
                payloads = [{"stop": True, "save": save}] * info.world_size
            else:
                payloads, step_info, wait_s = prepared
        t_scatter = time.perf_counter()
        share = scatter_shares(payloads, info)
        if share["stop"]:
            if share["save"]:
                model, optimizer_state = trainer.full_model(), trainer.optimizer_state()
                if coordinator is not None and model is not None:
                    coordinator.save(version, model, optimizer_state)
            return version
        scatter_s = time.perf_counter() - t_scatter
        lr = cfg.policy.optimizer.kwargs.lr * lr_factor(version, cfg.grpo.max_num_steps, cfg.policy.optimizer.schedule)
        trainer.set_lr(lr)
        stats, timings = trainer.train(share["minibatches"])
        metrics = reduce_stats(stats, timings, info.world_size, info.device)
        metrics["train/lr"] = lr
        version += 1
        clear_every = cfg.policy.dtensor_cfg.clear_cache_every_n_steps
        if clear_every and info.device.type == "cuda" and version % clear_every == 0:
            torch.cuda.empty_cache()
        every = cfg.learner.check_replicas_every
        if every and version % every == 0 and not trainer.fsdp:  # FSDP2 holds one copy: nothing to compare
            metrics["sync/replica_spread"] = replica_spread(trainer.model, info.world_size)
        last = version >= cfg.grpo.max_num_steps
        plan = coordinator.plan(version, last or stop.set) if coordinator is not None else (False, False)
        if stop.set:  # the workers are stopping too: a broadcast now could wait on peers that are leaving
            plan = (False, plan[1])
        plan = broadcast_plan(plan, info)
        model = trainer.full_model() if any(plan) else None  # a collective under FSDP2
        gathered = version if model is not None else gathered
        optimizer_state = trainer.optimizer_state() if plan[1] else None
        if info.is_main:
            metrics.update(
                {
                    "queue/wait_s": wait_s,
                    "perf/scatter_s": scatter_s,
                    "perf/train_s": time.perf_counter() - t_scatter,
                    "perf/tokens_per_s": metrics["perf/tokens"]
                    / max(metrics["perf/fwd_bwd_s"] + metrics["perf/optimizer_s"], 1e-9),
                    "loss/lr": trainer.optimizer.param_groups[0]["lr"],
                }
            )
            coordinator.finish(
                version, step_info, metrics, plan=plan, model=model, optimizer_state=optimizer_state, t_step=t_step,
                last=last,
            )  # fmt: skip
        if info.world_size > 1:
            dist.barrier()  # the broadcast and checkpoint of rank 0 finish before anyone starts the next step
