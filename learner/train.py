"""The learner role: `run(cfg)` under torchrun (DDP, or FSDP2 with `policy.dtensor_cfg.enabled`; gloo on CPU, NCCL
on GPU; any world size, any node count).

Each step:
1. rank 0 tops up the prompt stream (backpressure), collects `num_prompts_per_step` admissible scored groups
   (staleness window, dynamic sampling, duplicates), computes advantages and cuts the batch into rank shares;
2. every rank receives its share (`scatter_object_list`: an in-cluster collective, not a wire message);
3. every rank runs the updates (`learner.step.Trainer`) and the statistics are all-reduced;
4. rank 0 broadcasts the weights every `weight_sync_period` steps, publishes the version in the policy hash,
   writes metrics and the ledger, and checkpoints every `save_period` steps, after which it acknowledges
   the scored entries the checkpoint covers.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from broker.keys import Keys
from broker.schemas import ScoredGroup
from learner.batch import Collector, Feeder, assemble, group_to_samples, rollout_metrics
from learner.checkpoint import Ledger, latest_checkpoint, load_checkpoint, save_checkpoint
from learner.config import LearnerConfig, PolicyConfig
from learner.loss import LossSettings
from learner.metrics import ConsoleSummary, JsonlLogger, MultiLogger
from learner.step import ForwardSettings, Trainer, reduce_stats

log = logging.getLogger(__name__)

SCORED_GROUP = "learner"
"""Consumer group of the learner on the scored stream."""
SCORED_CONSUMER = "learner-0"
"""Stable consumer name: a restarted learner finds its own pending entries under it."""
NEVER_RECLAIM_MS = 7 * 24 * 3600 * 1000
"""Our pending entries wait for the next checkpoint, not for a timeout (we are the only consumer)."""
MAX_DELIVERIES = 100
"""Every restart re-delivers the pending entries once; only a message that keeps failing should die."""


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def die_with_parent() -> None:
    """Under torchrun, die when the launcher dies (Linux): torchrun puts each rank in a session of its own, so a
    killed launcher would otherwise leave ranks training next to the learner that replaces it."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the call above
        os._exit(1)


def init_distributed(backend: str) -> DistInfo:
    """Join torchrun's process group (or run as a single process when not under torchrun)."""
    die_with_parent()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        # The CPUs this process may use (a pinned learner gets fewer than the machine has), shared by local ranks.
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cpus // max(local_world, 1)))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    if rank == 0:
        log.info("learner rank 0 of %d, %s on %s", world, "nccl" if cuda else "gloo", device)
    return DistInfo(rank, world, local_rank, device)


def loss_settings(cfg: LearnerConfig) -> LossSettings:
    lf = cfg.loss_fn
    return LossSettings(
        ratio_clip_min=lf.ratio_clip_min,
        ratio_clip_max=lf.ratio_clip_max,
        ratio_clip_c=lf.ratio_clip_c,
        aggregation=lf.aggregation,  # type: ignore[arg-type]
        constant_length=lf.constant_length_normalizer,
        reference_policy_kl_penalty=lf.reference_policy_kl_penalty,
        use_importance_sampling_correction=lf.use_importance_sampling_correction,
        truncated_importance_sampling_ratio=lf.truncated_importance_sampling_ratio,
        use_decoupled_ppo=lf.use_decoupled_ppo,
        decoupled_ppo_weight_cap=lf.decoupled_ppo_weight_cap,
    )


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


class Coordinator:
    """Rank 0's side of the loop: Redis, the feeder/collector, ledger, metrics, weight sync, checkpoints."""

    def __init__(self, cfg: LearnerConfig, tokenizer) -> None:
        from broker.connection import connect
        from broker.streams import ROLE_KEEP_ACKED, StreamConsumer, publish_once
        from learner.data_source import prompt_source

        self.cfg = cfg
        self.keys = Keys(cfg.learner.run)
        self.redis = connect(cfg.learner.broker_url, client_name="rlq-learner")
        prompt_at, n = prompt_source(cfg, tokenizer)
        feeder = Feeder(
            lambda key, msg: publish_once(self.redis, self.keys.prompts, key, msg),
            prompt_at,
            n,
            cfg.grpo,
            run=cfg.learner.run,
            shuffle=cfg.data.shuffle,
            max_prompt_tokens=cfg.policy.max_total_sequence_length,
        )
        consumer = StreamConsumer(
            self.redis,
            self.keys.scored,
            SCORED_GROUP,
            SCORED_CONSUMER,
            expected=ScoredGroup,
            dead_stream=self.keys.dead,
            max_deliveries=MAX_DELIVERIES,
            claim_idle_ms=NEVER_RECLAIM_MS,
            block_ms=cfg.learner.read_block_ms,
            # Untrimmed, Redis keeps every rollout the run ever trained on.
            trim_keep_acked=ROLE_KEEP_ACKED if cfg.learner.trim_acked else None,
        )
        consumer.ensure_group()
        self.consumer = consumer
        self.collector = Collector(consumer, feeder, cfg.grpo, read_block_ms=cfg.learner.read_block_ms)
        self.ledger = Ledger(cfg.learner.run_dir)
        self.metrics = MultiLogger(JsonlLogger(cfg.learner.run_dir), ConsoleSummary())
        self.tokenizer = tokenizer
        self.weights = _weight_sync(cfg, self.redis)
        self.last_saved = -1
        self.validator = None
        if cfg.grpo.validates:
            from learner.data_source import validation_prompts
            from learner.validation import Validator

            self.validator = Validator(
                lambda key, msg: publish_once(self.redis, self.keys.prompts, key, msg),
                validation_prompts(cfg, tokenizer),
                cfg.grpo,
                run=cfg.learner.run,
            )

    def restore(self, state: dict, pending: bytes) -> None:
        self.collector.restore({**state["collector"], "buffer": pending})
        self.last_saved = int(state["version"])
        moved = self.ledger.rewind(state["version"])
        log.info("resumed at version %d; %d ledger steps after it moved aside", state["version"], moved)

    def recover(self, version: int) -> None:
        """Re-read the scored entries this consumer left pending (read after the last checkpoint)."""
        pending = self.redis.xpending(self.keys.scored, SCORED_GROUP)["pending"]
        taken = self.collector.recover(int(pending), version)
        if taken:
            log.info("took back %d scored groups read but not covered by a checkpoint", taken)

    def prepare(self, version: int, world_size: int, should_stop) -> tuple[list[dict], dict, float] | None:
        """Collect the step's groups and cut them into per-rank payloads (None: asked to stop meanwhile)."""
        result = self.collector.collect(version, timeout_s=self.cfg.learner.data_timeout_s, should_stop=should_stop)
        if result is None:
            return None
        samples = [
            s
            for g in result.groups
            for s in group_to_samples(g, self.cfg.grpo, self.cfg.policy.max_total_sequence_length)
        ]
        skip_inert = self.cfg.policy.skip_zero_advantage and self.cfg.loss_fn.reference_policy_kl_penalty == 0
        shares = assemble(samples, world_size, self.cfg.policy.train_global_batch_size, skip_inert=skip_inert)
        info = {
            "groups": result.groups,
            "dropped": result.dropped,
            "metrics": {
                **rollout_metrics(result.groups, version),
                # samples with no gradient (their group's rewards agree): the learner skips them (skip_inert)
                "rollout/zero_advantage_fraction": sum(s.advantage == 0.0 for s in samples) / max(len(samples), 1),
            },
        }
        return [{"stop": False, "minibatches": s} for s in shares], info, result.wait_s

    def plan(self, version: int, last: bool) -> tuple[bool, bool]:
        """(broadcast the weights, checkpoint) after the update that produced `version`."""
        sync = self.weights is not None and (version % self.cfg.learner.weight_sync_period == 0 or last)
        ckpt = self.cfg.checkpointing
        return sync, ckpt.enabled and (version % ckpt.save_period == 0 or last)

    def finish(
        self,
        version: int,
        info: dict,
        metrics: dict[str, float],
        *,
        plan: tuple[bool, bool],
        model: torch.nn.Module | None,
        optimizer_state: dict | None,
        t_step: float,
        last: bool = False,
    ) -> None:
        """Everything after the update: weight sync, version, ledger, metrics, checkpoint + acks, validation."""
        t0 = time.perf_counter()
        if plan[0] and model is not None:
            metrics.update(self.sync_weights(version, model))
        sync_s = time.perf_counter() - t0
        self.redis.hset(self.keys.policy, mapping={"version": version, "learner_updated_at": time.time()})
        trained = [g.group_id for g in info["groups"]]
        self.ledger.append(version, trained, info["dropped"])
        t1 = time.perf_counter()
        ckpt = self.cfg.checkpointing
        if plan[1] and model is not None and optimizer_state is not None:
            self.save(version, model, optimizer_state)
        elif not ckpt.enabled:
            self.consumer.ack(self.collector.take_acks())
        dropped = {f"queue/dropped_{r}": float(len(ids)) for r, ids in info["dropped"].items()}
        metrics.update(info["metrics"])
        metrics.update(dropped)
        metrics.update(
            {
                "sync/broadcast_s": sync_s,
                "perf/checkpoint_s": time.perf_counter() - t1,
                "perf/step_s": time.perf_counter() - t_step,
                "queue/in_flight": float(self.collector.feeder.in_flight),
                "queue/buffered": float(len(self.collector.buffer)),
                "queue/data_cursor": float(self.collector.feeder.cursor),
                "queue/prompts_skipped_too_long": float(self.collector.feeder.skipped),
                "rollout/staleness_max": max(
                    (float(max(0, version - 1 - g.rollout.policy_version)) for g in info["groups"]), default=0.0
                ),
            }
        )
        self.metrics.log(version, metrics)
        if self.validator is not None:
            if self.validator.due(version, last):
                self.validator.start(version)  # after the sync: workers sample it with this version or newer
            self.log_validation(version)

    def start_validation(self, version: int) -> None:
        """Validate the starting policy (`grpo.val_at_start`), before the first step."""
        if self.validator is not None and self.validator.due(version):
            self.validator.start(version)

    def log_validation(self, version: int) -> None:
        """Hand the validation groups read so far to the validator; log the passes now complete."""
        assert self.validator is not None
        for group in self.collector.take_validation():
            self.validator.accept(group)
        for validated, metrics in self.validator.finished():
            log.info("validation of version %d: accuracy %.3f over %d samples", validated,
                     metrics["val/accuracy"], int(metrics["val/samples"]))  # fmt: skip
            self.metrics.log(version, metrics)

    def finish_validation(self, version: int) -> None:
        """After the last step: wait for the passes still out, as long as their groups keep coming."""
        if self.validator is None:
            return
        from learner.validation import FINAL_WAIT_S

        timeout_s = min(self.cfg.learner.data_timeout_s, FINAL_WAIT_S)
        last_progress = time.monotonic()
        self.log_validation(version)
        while self.validator.outstanding:
            if time.monotonic() - last_progress > timeout_s:
                log.warning("gave up waiting for validation of versions %s after %.0f s without progress",
                            self.validator.outstanding, timeout_s)  # fmt: skip
                return
            val_ids = self.collector.poll(version, self.cfg.learner.read_block_ms)
            if val_ids:
                last_progress = time.monotonic()
                self.consumer.ack(val_ids)  # no checkpoint needs them; training groups stay pending for a resume
            self.log_validation(version)

    def sync_weights(self, version: int, model: torch.nn.Module) -> dict[str, float]:
        """Broadcast; a failed sync is logged and counted, and training goes on (workers keep older weights)."""
        from learner.broadcast import WeightSyncError

        source: torch.nn.Module | list[tuple[str, torch.Tensor]] = model
        policy = self.cfg.policy
        # Workers run in the compute dtype: float32 master weights go as a bfloat16 copy (half the bytes). Weights
        # already in it go as the model itself, which the broadcast lays out once and then sends without a copy.
        if policy.precision != policy.master_weights:
            dtype = getattr(torch, policy.precision)
            source = [(name, p.detach().to(dtype)) for name, p in model.named_parameters()]
        try:
            report = self.weights.broadcast(source, version)
        except WeightSyncError as exc:
            log.warning("%s", exc)
            return {"sync/failed": 1.0}
        return {**report.metrics(), "sync/failed": 0.0}

    def save(self, version: int, model: torch.nn.Module, optimizer_state: dict) -> None:
        if version == self.last_saved:
            return
        state = self.collector.state()
        pending = state.pop("buffer")
        path = save_checkpoint(
            Path(self.cfg.checkpointing.checkpoint_dir),
            version,
            model,
            self.tokenizer,
            optimizer_state,
            {"version": version, "collector": state},
            pending,
            keep_last=self.cfg.checkpointing.keep_last,
        )
        acked = self.consumer.ack(self.collector.take_acks())
        self.last_saved = version
        self.redis.hset(self.keys.policy, "checkpoint_path", str(path.resolve()))
        log.info("checkpoint %s written; %d scored entries acknowledged", path, acked)

    def close(self) -> None:
        self.metrics.close()
        if self.weights is not None and hasattr(self.weights, "close"):
            self.weights.close()


def _weight_sync(cfg: LearnerConfig, redis_client):
    """The weight transport (learner/broadcast.py), or None when the run has no generation workers to feed."""
    if cfg.learner.weight_sync == "none":
        return None
    from learner.broadcast import make_broadcast

    return make_broadcast(cfg, redis_client)


class _StopFlag:
    """SIGTERM/SIGINT (torchrun forwards them to every rank): rank 0 finishes the step in hand or stops waiting
    for data, checkpoints and tells the other ranks to stop; they wait for that word instead of dying mid-step."""

    def __init__(self) -> None:
        self.set = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("signal %d: stopping after this step", signum)
        self.set = True


def _broadcast_plan(plan: tuple[bool, bool], info: DistInfo) -> tuple[bool, bool]:
    """Rank 0's (sync, checkpoint) decision to every rank: under FSDP2 all of them take part in gathering."""
    if info.world_size == 1:
        return plan
    box = [plan]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _scatter(payloads: list[dict] | None, info: DistInfo) -> dict:
    if info.world_size == 1:
        assert payloads is not None
        return payloads[0]
    out: list = [None]
    dist.scatter_object_list(out, payloads if info.is_main else None, src=0)
    return out[0]


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
    coordinator = None
    stop = _StopFlag()
    if info.is_main:
        coordinator = Coordinator(cfg, tokenizer)
        if state is not None:
            coordinator.restore(state, pending)
        coordinator.recover(version)
        coordinator.redis.hset(coordinator.keys.policy, "version", version)
        coordinator.start_validation(version)
    if resume is not None and cfg.learner.weight_sync != "none":
        full = trainer.full_model()  # a collective under FSDP2
        if coordinator is not None and coordinator.weights is not None and full is not None:
            coordinator.sync_weights(version, full)  # workers may hold weights of a discarded timeline
    try:
        version = _loop(cfg, info, trainer, coordinator, stop, version)
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

    model_path = resume / "policy" if resume else cfg.policy.model_name
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


def replica_spread(model: torch.nn.Module, world_size: int) -> float:
    """Largest difference between the ranks' parameter checksums (0.0: every replica holds the same weights)."""
    with torch.no_grad():
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    if world_size == 1:
        return 0.0
    gathered = [torch.zeros_like(checksum) for _ in range(world_size)]
    dist.all_gather(gathered, checksum)
    values = torch.stack(gathered)
    return float(values.max() - values.min())


def _loop(cfg, info: DistInfo, trainer: Trainer, coordinator, stop, version: int) -> int:
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
        share = _scatter(payloads, info)
        if share["stop"]:
            if share["save"]:
                model, optimizer_state = trainer.full_model(), trainer.optimizer_state()
                if coordinator is not None and model is not None:
                    coordinator.save(version, model, optimizer_state)
            return version
        scatter_s = time.perf_counter() - t_scatter
        stats, timings = trainer.train(share["minibatches"])
        metrics = reduce_stats(stats, timings, info.world_size, info.device)
        version += 1
        clear_every = cfg.policy.dtensor_cfg.clear_cache_every_n_steps
        if clear_every and info.device.type == "cuda" and version % clear_every == 0:
            torch.cuda.empty_cache()
        every = cfg.learner.check_replicas_every
        if every and version % every == 0 and not trainer.fsdp:  # FSDP2 holds one copy: nothing to compare
            metrics["sync/replica_spread"] = replica_spread(trainer.model, info.world_size)
        last = version >= cfg.grpo.max_num_steps
        plan = coordinator.plan(version, last or stop.set) if coordinator is not None else (False, False)
        plan = _broadcast_plan(plan, info)
        model = trainer.full_model() if any(plan) else None  # a collective under FSDP2
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
