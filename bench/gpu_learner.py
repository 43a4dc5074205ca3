"""Learner throughput on the Qwen3-4B shape (random weights) on one GPU: the project's GRPO step vs plain transformers.

Project: `learner.step.Trainer.train` on a synthetic GRPO step (groups -> `group_to_samples` -> `assemble`), as
the learner runs it: completion-only LM head, global-normaliser loss, grad clipping, and the optimizer the
learner builds (`learner.train.build_optimizer`). Each project variant sets the learner's forward knobs
(`policy.*`, see `learner.step.ForwardSettings`): sequence packing to a token budget with flash varlen attention
(`pack`, 0: `micro` padded samples per micro-batch), activation checkpointing (`ckpt`), compiled decoder layers
(`compile`), LM-head logprob chunk (`chunk`, 0: one pass), and `policy.master_weights` (`dtype`): bf16 weights
with the learner's stochastic-rounding AdamW (learner/optim.py; bf16 moments), or fp32 master weights with
torch's fused AdamW under bf16 autocast. Until this optimizer existed the bf16 variants ran torch's fused AdamW on
bf16 weights, which rounds lr-1e-6 updates away; such figures are kept under `previous_run` with their date.
Baseline: plain transformers forward+backward (`labels=` loss over full logits) with gradient checkpointing, the
issue's reference configuration, on the same sequences, `micro` padded rows a batch, torch's fused AdamW.

Also measured: `sr_check` (5 AdamW steps at lr 1e-6 on 4M bf16 weights in [0.5, 1): the mean displacement along
float32 AdamW's, 1.0 = float32's, for the learner's optimizer and torch's fused one), `optimizer_timing` per bf16
variant (one optimizer step on the 4B weights, synchronised: the learner's vs torch's fused AdamW; the step's
`optimizer_s` is host time and leaves queued GPU work to the next step's `fwd_bwd_s`), and optionally a check of
the packed (varlen) and padded (SDPA) bf16 logprobs against a float32 padded forward.

MFU = 6 * N * tokens/s / 989 TFLOP/s (N = parameters, tied embedding once; tokens = real, unpadded tokens).
Writes bench/results/gpu_learner.json (and $OUT/gpu_learner.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.gpu_common import (
    H100_BF16_FLOPS,
    RESULTS,
    out_dir,
    param_count,
    qwen3_config,
    random_model,
    write_result,
)
from bench.synthetic import scored_groups
from broker.schemas import ScoredGroup
from learner.batch import assemble, group_to_samples
from learner.config import GRPOConfig, OptimizerConfig, OptimizerKwargs, PolicyConfig
from learner.kernels import use_varlen_attention
from learner.loss import LossSettings
from learner.packing import collate, collate_packed
from learner.step import ForwardSettings, PolicyLogprobs, Trainer
from learner.train import build_optimizer

log = logging.getLogger("bench.gpu_learner")
TARGET_MFU = 0.40


def make_groups(args, vocab: int) -> list[ScoredGroup]:
    return scored_groups(args.prompts, args.generations, args.prompt_len, args.completion_len, vocab,
                         shortest=0.25, logprob_scale=3)  # fmt: skip


LR, WEIGHT_DECAY = 1e-6, 0.01  # the tutorial's


def torch_adamw(params) -> torch.optim.Optimizer:
    """The baseline's optimizer: torch's AdamW, fused on GPUs (foreach's temporaries do not fit next to a 4B
    model's float32 weights, gradients and moments on one 80 GB card)."""
    params = list(params)
    fused = params[0].device.type == "cuda"
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=fused, foreach=not fused)


def learner_optimizer(params, dtype: str) -> torch.optim.Optimizer:
    """What the learner builds for `policy.master_weights` = bfloat16 (bf16) or float32 (fp32)."""
    master = "bfloat16" if dtype == "bf16" else "float32"
    kwargs = OptimizerKwargs(lr=LR, weight_decay=WEIGHT_DECAY)
    policy = PolicyConfig(model_name="bench", precision="bfloat16", master_weights=master,
                          optimizer=OptimizerConfig(kwargs=kwargs))  # fmt: skip
    return build_optimizer(params, policy)


PROJECT_DEFAULTS = {"dtype": "bf16", "pack": 8192, "micro": 4, "ckpt": 0, "compile": 0, "chunk": 2048}


def parse_variant(spec: str) -> tuple[str, dict, str]:
    """`project:pack=8192,ckpt=0` or `baseline:micro=2,ckpt=1` -> (kind, knobs, label)."""
    kind, _, rest = spec.partition(":")
    knobs = dict(kv.split("=") for kv in rest.split(",") if kv)
    if kind == "project":
        opts: dict = PROJECT_DEFAULTS | {k: (v if k == "dtype" else int(v)) for k, v in knobs.items()}
        shape = f"pack{opts['pack']}" if opts["pack"] else f"micro{opts['micro']}"
        label = f"project_{opts['dtype']}_{shape}_ckpt{opts['ckpt']}_compile{opts['compile']}_chunk{opts['chunk']}"
        return kind, opts, label
    if kind == "baseline":
        opts = {"micro": 2, "ckpt": 1} | {k: int(v) for k, v in knobs.items()}
        return kind, opts, f"baseline_micro{opts['micro']}_ckpt{opts['ckpt']}"
    raise ValueError(f"unknown variant {spec!r}")


def project_variant(args, groups, opts: dict, device: torch.device) -> dict:
    master_dtype = torch.float32 if opts["dtype"] == "fp32" else torch.bfloat16
    model = random_model(qwen3_config(**args.shape), master_dtype, device)
    n_params = param_count(model)
    if opts["ckpt"]:
        model.gradient_checkpointing_enable()
    opt = learner_optimizer(model.parameters(), opts["dtype"])
    opt_name = type(opt).__name__
    forward = ForwardSettings(pack_tokens=opts["pack"] or None, logprob_chunk=opts["chunk"] or None,
                              compile_layers=bool(opts["compile"]))  # fmt: skip
    trainer = Trainer(model, opt, LossSettings(), world_size=1, micro_batch_size=opts["micro"], max_grad_norm=1.0,
                      device=device, compute_dtype=torch.bfloat16, forward=forward)  # fmt: skip
    cfg = GRPOConfig(num_prompts_per_step=args.prompts, num_generations_per_prompt=args.generations)
    max_len = args.prompt_len + args.completion_len + 1
    warmup = 2 if opts["compile"] else 1  # compiled layers: the second shape recompiles them as dynamic
    times: list[float] = []
    tokens, parts, micros = 0, dict[str, float](), 0
    try:
        for step in range(args.repeats + warmup):  # warm-up steps (allocator, cuBLAS plans, compile) not counted
            samples = [s for g in groups for s in group_to_samples(g, cfg, max_len)]
            tokens = sum(len(s.input_ids) for s in samples)
            micros = len(trainer._chunks(samples))
            _sync(device)
            t0 = time.perf_counter()
            _, parts = trainer.train(assemble(samples, 1, None)[0])
            _sync(device)
            if step >= warmup:
                times.append(time.perf_counter() - t0)
            log.info("%s step %d: %.2fs", opts, step, time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        timing = time_optimizers(model, opt, device) if opts["dtype"] == "bf16" else None
    except torch.OutOfMemoryError as exc:
        return {"error": "out of memory: " + str(exc).splitlines()[0][:160]}
    finally:
        del trainer, opt, model
        _free(device)
    extra = {"optimizer_timing": timing} if timing else {}
    return _figures(tokens, times, n_params, peak) | {
        "fwd_bwd_s": round(parts["fwd_bwd_s"], 3),
        "optimizer_s": round(parts["optimizer_s"], 3),
        "micro_batches": micros,
        **extra,
        "knobs": opts | {"optimizer": opt_name},
    }


def profile_step(args, groups, opts: dict, device: torch.device, path) -> None:
    """One warmed-up project step under torch.profiler: the 40 costliest GPU kernels into `path` (a text table)."""
    from torch.profiler import ProfilerActivity, profile

    dtype = torch.float32 if opts["dtype"] == "fp32" else torch.bfloat16
    model = random_model(qwen3_config(**args.shape), dtype, device)
    if opts["ckpt"]:
        model.gradient_checkpointing_enable()
    forward = ForwardSettings(pack_tokens=opts["pack"] or None, logprob_chunk=opts["chunk"] or None,
                              compile_layers=bool(opts["compile"]))  # fmt: skip
    opt = learner_optimizer(model.parameters(), opts["dtype"])
    trainer = Trainer(model, opt, LossSettings(), world_size=1, micro_batch_size=opts["micro"], max_grad_norm=1.0,
                      device=device, compute_dtype=torch.bfloat16, forward=forward)  # fmt: skip
    cfg = GRPOConfig(num_prompts_per_step=args.prompts, num_generations_per_prompt=args.generations)
    max_len = args.prompt_len + args.completion_len + 1
    for step in range(3 if opts["compile"] else 2):
        samples = [s for g in groups for s in group_to_samples(g, cfg, max_len)]
        if step == (2 if opts["compile"] else 1):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                trainer.train(assemble(samples, 1, None)[0])
                _sync(device)
        else:
            trainer.train(assemble(samples, 1, None)[0])
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    path.write_text(table)
    print(table[:6000])
    del trainer, model
    _free(device)


def varlen_check(args, groups, device: torch.device, layers: int = 4) -> dict:
    """Packed (varlen) and padded (SDPA) bf16 logprobs of 16 samples against a float32 padded forward.

    `layers` decoder layers of the Qwen3-4B shape (the whole depth only scales the error).
    """
    cfg = GRPOConfig(num_prompts_per_step=args.prompts, num_generations_per_prompt=args.generations)
    max_len = args.prompt_len + args.completion_len + 1
    samples = [s for g in groups[:2] for s in group_to_samples(g, cfg, max_len)]
    shape = {**args.shape, "num_hidden_layers": min(layers, qwen3_config(**args.shape).num_hidden_layers)}
    ref_model = random_model(qwen3_config(**shape), torch.float32, device).eval()
    out: dict = {"samples": len(samples), "layers": shape["num_hidden_layers"]}
    with torch.no_grad():
        padded = collate(samples, device)
        ref, _ = PolicyLogprobs(ref_model)(**padded.model_inputs())
        model = ref_model.to(torch.bfloat16)
        got_padded, _ = PolicyLogprobs(model, 4096)(**padded.model_inputs())
        use_varlen_attention(model)
        got_packed, _ = PolicyLogprobs(model, 4096)(**collate_packed(samples, device).model_inputs())
    for name, got in (("padded_sdpa_bf16", got_padded), ("packed_varlen_bf16", got_packed)):
        err = (got.float() - ref).abs()
        out[name] = {"max_abs_err": round(float(err.max()), 4), "mean_abs_err": round(float(err.mean()), 5)}
    err = (got_packed.float() - got_padded.float()).abs()
    out["packed_vs_padded"] = {"max_abs_diff": round(float(err.max()), 4), "mean_abs_diff": round(float(err.mean()), 5)}
    del model, ref_model
    _free(device)
    return out


def baseline_variant(args, groups, opts: dict, device: torch.device) -> dict:
    micro, checkpointing = opts["micro"], bool(opts["ckpt"])
    model: Any = random_model(qwen3_config(**args.shape), torch.bfloat16, device)
    n_params = param_count(model)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch_adamw(model.parameters())
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
            log.info("baseline %s step %d: %.2fs", opts, step, time.perf_counter() - t0)
    except torch.OutOfMemoryError as exc:
        return {"error": "out of memory: " + str(exc).splitlines()[0][:160]}
    finally:
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        del opt, model
        _free(device)
    return _figures(tokens, times, n_params, peak) | {"knobs": opts}


def time_optimizers(model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device, repeats: int = 3) -> dict:
    """Seconds of one optimizer step on `model`'s weights (synchronised, best of `repeats` after a warm-up): the
    learner's optimizer `opt` (its state already built) and torch's fused AdamW on the same bf16 weights; `_host_s`:
    until `step()` returns (launching; the GPU may still be busy), so host_s ~ total means the host bounds it."""
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out: dict = {}
    for name, o in (("learner", opt), ("torch_fused_adamw", torch_adamw(params))):
        o.step()  # warm-up: state, compile
        times, host = [], []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            o.step()
            host.append(time.perf_counter() - t0)
            _sync(device)
            times.append(time.perf_counter() - t0)
        out[f"{name}_s"] = round(min(times), 4)
        out[f"{name}_host_s"] = round(min(host), 4)
        if o is not opt:
            o.state.clear()
    for p in params:
        p.grad = None
    return out


def sr_check(device: torch.device, n: int = 1 << 22, steps: int = 5) -> dict:
    """`steps` AdamW steps at lr 1e-6 with random gradients on `n` bf16 weights in [0.5, 1) (a bf16 gap of 2^-8,
    ~4000x the update). Progress: mean displacement along float32 AdamW's, as a fraction of it (1.0: float32's)."""
    gen = torch.Generator(device).manual_seed(0)
    w0 = (0.5 + torch.rand(n, device=device, generator=gen) / 2).to(torch.bfloat16)
    ref = w0.float().requires_grad_()
    runs = {"learner": w0.clone().requires_grad_(), "torch_fused_adamw": w0.clone().requires_grad_()}
    opts = {"ref": torch.optim.AdamW([ref], lr=LR, weight_decay=WEIGHT_DECAY),
            "learner": learner_optimizer([runs["learner"]], "bf16"),
            "torch_fused_adamw": torch_adamw([runs["torch_fused_adamw"]])}  # fmt: skip
    for _ in range(steps):
        g = torch.randn(n, device=device, generator=gen)
        for name, p in (("ref", ref), *runs.items()):
            p.grad = g.to(p.dtype)
            opts[name].step()
    delta = ref.detach() - w0.float()
    moved = delta.abs().mean()
    out = {"weights": n, "steps": steps, "lr": LR, "optimizer": type(opts["learner"]).__name__}
    for name, p in runs.items():
        out[f"{name}_progress"] = round(float(((p.detach().float() - w0.float()) * delta.sign()).mean() / moved), 4)
        out[f"{name}_changed_fraction"] = round(float((p.detach() != w0).float().mean()), 5)
    return out


def carry_previous(figures: dict, path: Path = RESULTS / "gpu_learner.json") -> None:
    """Variants (and the varlen check) of the result file this run replaces, as measured then, under
    figures["previous_run"]["variants"] as "<label> @ <date>"; an entry without an `optimizer` knob ran torch's
    fused AdamW (all did before learner/optim.py existed). This run's figures are the top-level ones; the summary
    looks at those only."""
    if not path.exists():
        return
    old = json.loads(path.read_text())
    old_figures = old.get("figures", {})
    carried = {}
    for key, value in old_figures.get("previous_run", {}).get("variants", {}).items():
        carried[key if " @ " in key else f"{key} @ {value.get('date', '?')}"] = value
    for key, value in old_figures.items():
        if isinstance(value, dict) and (key.startswith(("project_", "baseline_")) or key == "varlen_check"):
            entry = {"date": old["date"], **value}
            if "knobs" in entry and "optimizer" not in entry["knobs"]:
                entry["knobs"] = {**entry["knobs"], "optimizer": "AdamW (torch, fused)"}
            carried[f"{key} @ {old['date']}"] = entry
    if carried:
        figures["previous_run"] = {"note": "earlier runs' figures as measured then", "variants": carried}


def _figures(tokens: int, times: list[float], n_params: int, peak_gib: float) -> dict:
    """Best of the timed steps (and their mean, to show the spread)."""
    tps = tokens / min(times)
    return {
        "tokens_per_s": round(tps, 1),
        "mfu": round(6 * n_params * tps / H100_BF16_FLOPS, 4),
        "step_s": round(min(times), 3),
        "mean_step_s": round(sum(times) / len(times), 3),
        "tokens_per_step": tokens,
        "params": n_params,
        "peak_gib": round(peak_gib, 1),
    }


def summarize(figures: dict) -> tuple[bool, float]:
    """Adds best_project_mfu / speedup_vs_baseline_gc; returns (target met, best project MFU)."""
    runs = {k: v.get("mfu", 0.0) for k, v in figures.items() if isinstance(v, dict)}
    best = max((v for k, v in runs.items() if k.startswith("project")), default=0.0)
    base = max((v for k, v in runs.items() if k.startswith("baseline") and k.endswith("ckpt1")), default=0.0)
    figures["best_project_mfu"] = best
    figures["best_project_variant"] = max((k for k in runs if k.startswith("project")), key=runs.get, default=None)
    figures["project_fp32_master_mfu"] = max((v for k, v in runs.items() if k.startswith("project_fp32")), default=None)
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
        default="project:pack=8192,compile=1;project:pack=10240,compile=1;project:pack=16384,ckpt=1,compile=1;"
        "project:pack=6144;project:pack=0,micro=4,chunk=0;baseline:micro=2,ckpt=1;"
        "project:dtype=fp32,pack=4096,ckpt=1,compile=1",
        help="';'-separated kind:knob=value,... (kinds project | baseline; see the module docstring).",
    )
    parser.add_argument("--no-check", action="store_true", help="Skip the varlen-vs-padded logprob check.")
    parser.add_argument("--profile", default="", help="A project variant to profile after the sweep ($OUT).")
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
    if not args.no_write:
        carry_previous(figures)  # before the first write replaces the file
    try:
        figures["sr_check"] = sr_check(device, n=1 << 18 if args.tiny else 1 << 22)
    except Exception as exc:
        log.exception("stochastic rounding check failed")
        figures["sr_check"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    print(f"sr check: {figures['sr_check']}")
    if not args.no_check:
        try:
            figures["varlen_check"] = varlen_check(args, groups, device)
        except Exception as exc:
            log.exception("varlen check failed")
            figures["varlen_check"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(f"varlen check: {figures['varlen_check']}")
    met, best_project = False, 0.0
    for spec in args.variants.split(";"):  # results are written after each, so a timeout keeps them
        kind, opts, label = parse_variant(spec)
        try:
            run = project_variant if kind == "project" else baseline_variant
            fig = run(args, groups, opts, device)
        except Exception as exc:  # one broken variant must not cost the others' figures (one GPU call each)
            log.exception("variant %s failed", spec)
            fig = {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "knobs": opts}
            _free(device)
        figures[label] = fig
        met, best_project = summarize(figures)
        print(f"{label:50s} {fig}")
        if not args.no_write:
            write_result("gpu_learner", figures, {"best_project_mfu": f">= {TARGET_MFU}"}, met, out_dir())
    if args.profile:
        _, opts, label = parse_variant(args.profile)
        try:
            profile_step(args, groups, opts, device, (out_dir() or Path(".")) / f"profile_{label}.txt")
        except Exception:
            log.exception("profile failed")
    for k, v in figures.items():
        print(f"{k:28s} {v}")
    print(f"gpu_learner: best project MFU {best_project:.3f} (target {TARGET_MFU}): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
