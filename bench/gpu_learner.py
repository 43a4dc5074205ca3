"""Learner throughput on the Qwen3-4B shape (random weights) on one GPU: the project's GRPO step vs plain transformers.

Project: `learner.step.Trainer.train` on a synthetic GRPO step (groups -> `group_to_samples` -> `assemble`), as
the learner runs it: completion-only LM head, one log-softmax pass, global-normaliser loss, grad clipping,
AdamW. Two weight layouts: float32 master weights under bf16 autocast (the learner's default since c01a9cd)
and bf16 weights. Baseline: plain transformers forward+backward (`labels=` loss over full logits) with
gradient checkpointing, the issue's reference configuration, on the same sequences and micro-batches.

MFU = 6 * N * tokens/s / 989 TFLOP/s (N = parameters, tied embedding once; tokens = real, unpadded tokens).
Writes bench/results/gpu_learner.json (and $OUT/gpu_learner.json).
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from typing import Any

import numpy as np
import torch

from bench.gpu_common import H100_BF16_FLOPS, out_dir, param_count, qwen3_config, random_model, write_result
from broker.schemas import Array, Prompt, RolloutGroup, Sample, ScoredGroup
from learner.batch import assemble, group_to_samples
from learner.config import GRPOConfig
from learner.loss import LossSettings
from learner.step import Trainer

log = logging.getLogger("bench.gpu_learner")
TARGET_MFU = 0.40


def make_groups(args, vocab: int) -> list[ScoredGroup]:
    """Prompts of `prompt_len`, completions uniform in [completion_len/4, completion_len], rewards 0/1."""
    rng = np.random.default_rng(0)
    groups = []
    for p in range(args.prompts):
        prompt = Prompt(f"p{p}", Array.from_numpy(rng.integers(0, vocab, args.prompt_len), "int32"), "1")
        samples = []
        for _ in range(args.generations):
            n = int(rng.integers(args.completion_len // 4, args.completion_len + 1))
            ids, logprobs = rng.integers(0, vocab, n), -rng.random(n) * 3
            samples.append(Sample(Array.from_numpy(ids, "int32"), Array.from_numpy(logprobs, "float32"), "stop"))
        rollout = RolloutGroup(group_id=f"p{p}@b", batch_id="b", prompt=prompt, samples=samples, policy_version=0,
                               worker_id="bench")  # fmt: skip
        rewards = Array.from_numpy(rng.integers(0, 2, args.generations), "float32")
        groups.append(ScoredGroup(rollout=rollout, rewards=rewards, verdicts=["correct"] * args.generations))
    return groups


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # fused: foreach's temporaries (~one more copy of the float32 parameters) do not fit next to a 4B model's
    # float32 weights, gradients and AdamW moments on one 80 GB card.
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01, fused=fused, foreach=not fused)


def project_variant(args, groups, master_dtype: torch.dtype, micro: int, device: torch.device) -> dict:
    model = random_model(qwen3_config(**args.shape), master_dtype, device)
    n_params = param_count(model)
    opt = optimizer(model)
    trainer = Trainer(model, opt, LossSettings(), world_size=1, micro_batch_size=micro, max_grad_norm=1.0,
                      device=device, compute_dtype=torch.bfloat16)  # fmt: skip
    cfg = GRPOConfig(num_prompts_per_step=args.prompts, num_generations_per_prompt=args.generations)
    max_len = args.prompt_len + args.completion_len + 1
    times: list[float] = []
    tokens, parts = 0, dict[str, float]()
    try:
        for step in range(args.repeats + 1):  # step 0 warms up (allocator, cuBLAS plans) and is not counted
            samples = [s for g in groups for s in group_to_samples(g, cfg, max_len)]
            tokens = sum(len(s.input_ids) for s in samples)
            _sync(device)
            t0 = time.perf_counter()
            _, parts = trainer.train(assemble(samples, 1, None)[0])
            _sync(device)
            if step:
                times.append(time.perf_counter() - t0)
            log.info("project %s micro %d step %d: %.2fs", master_dtype, micro, step, time.perf_counter() - t0)
    except torch.OutOfMemoryError as exc:
        return {"error": "out of memory: " + str(exc).splitlines()[0][:160]}
    finally:
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        del trainer, opt, model
        _free(device)
    best = min(times)
    return _figures(tokens, best, n_params, peak) | {
        "fwd_bwd_s": round(parts["fwd_bwd_s"], 3),
        "optimizer_s": round(parts["optimizer_s"], 3),
    }


def baseline_variant(args, groups, micro: int, device: torch.device, checkpointing: bool) -> dict:
    model: Any = random_model(qwen3_config(**args.shape), torch.bfloat16, device)
    n_params = param_count(model)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    opt = optimizer(model)
    rows = [
        np.concatenate([g.rollout.prompt.token_ids.to_numpy(), s.token_ids.to_numpy()]).astype(np.int64)
        for g in groups
        for s in g.rollout.samples
    ]
    tokens = sum(len(r) for r in rows)
    times = []
    try:
        for step in range(args.repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            chunks = [rows[i : i + micro] for i in range(0, len(rows), micro)]
            for chunk in chunks:
                width = max(len(r) for r in chunk)
                ids = torch.zeros(len(chunk), width, dtype=torch.long)
                attn = torch.zeros_like(ids)
                for i, r in enumerate(chunk):
                    ids[i, : len(r)] = torch.from_numpy(r)
                    attn[i, : len(r)] = 1
                ids, attn = ids.to(device), attn.to(device)
                labels = ids.masked_fill(attn == 0, -100)
                loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss / len(chunks)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if step:
                times.append(time.perf_counter() - t0)
            log.info("baseline gc=%s step %d: %.2fs", checkpointing, step, time.perf_counter() - t0)
    except torch.OutOfMemoryError as exc:
        return {"error": "out of memory: " + str(exc).splitlines()[0][:160]}
    finally:
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        del opt, model
        _free(device)
    return _figures(tokens, min(times), n_params, peak)


def _figures(tokens: int, seconds: float, n_params: int, peak_gib: float) -> dict:
    tps = tokens / seconds
    return {
        "tokens_per_s": round(tps, 1),
        "mfu": round(6 * n_params * tps / H100_BF16_FLOPS, 4),
        "step_s": round(seconds, 3),
        "tokens_per_step": tokens,
        "params": n_params,
        "peak_gib": round(peak_gib, 1),
    }


def summarize(figures: dict) -> tuple[bool, float]:
    """Adds best_project_mfu / speedup_vs_baseline_gc; returns (target met, best project MFU)."""
    runs = {k: v.get("mfu", 0.0) for k, v in figures.items() if isinstance(v, dict)}
    best = max((v for k, v in runs.items() if k.startswith("project")), default=0.0)
    base = max((v for k, v in runs.items() if k.startswith("baseline_gc")), default=0.0)
    figures["best_project_mfu"] = best
    figures["project_default_mfu"] = max((v for k, v in runs.items() if "fp32_master" in k), default=0.0)
    figures["speedup_vs_baseline_gc"] = round(best / base, 3) if base else None
    return best >= TARGET_MFU, best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--completion-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--variants",
        default="bf16:2,fp32_master:1,baseline_gc:2,bf16:4,fp32_master:2",
        help="name:micro, names fp32_master | bf16 (project) | baseline_gc | baseline (no checkpointing).",
    )
    parser.add_argument("--tiny", action="store_true", help="2 layers, small dims: a CPU check of the script.")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.shape = (
        {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 1000,
        }  # fmt: skip
        if args.tiny
        else {}
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    groups = make_groups(args, qwen3_config(**args.shape).vocab_size)
    figures: dict = {
        "shape": f"Qwen3-4B shape{' (tiny)' if args.tiny else ''}, random weights; {args.prompts}x{args.generations}"
        f" samples, prompt {args.prompt_len}, completion U[{args.completion_len // 4}, {args.completion_len}]",
        "flops_per_token": "6N",
        "peak_flops": H100_BF16_FLOPS,
    }
    for spec in args.variants.split(","):  # name:micro; results are written after each, so a timeout keeps them
        name, _, micro_s = spec.partition(":")
        micro = int(micro_s or 1)
        if name == "fp32_master":
            fig = project_variant(args, groups, torch.float32, micro, device)
        elif name == "bf16":
            fig = project_variant(args, groups, torch.bfloat16, micro, device)
        else:
            fig = baseline_variant(args, groups, micro, device, checkpointing=name == "baseline_gc")
        figures[f"{'project_' if name in ('fp32_master', 'bf16') else ''}{name}_micro{micro}"] = fig | {"micro": micro}
        met, best_project = summarize(figures)
        print(f"{spec:20s} {fig}")
        if not args.no_write:
            write_result("gpu_learner", figures, {"best_project_mfu": f">= {TARGET_MFU}"}, met, out_dir())
    for k, v in figures.items():
        print(f"{k:28s} {v}")
    print(f"gpu_learner: best project MFU {best_project:.3f} (target {TARGET_MFU}): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
