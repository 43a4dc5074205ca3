"""Transformers generation on one GPU: FastHFEngine (static cache + CUDA-graphed step) vs plain `generate()`.

Qwen3-4B shape, random bf16 weights, `--batch` sequences (distinct prompts of 3/4..1 x `--prompt-len` tokens, left
padded), `--new-tokens` sampled tokens each at temperature 1 over the whole vocabulary; EOS is switched off so
every row produces the same count in every engine. Also times the project's former transformers path
(`HFEngine.generate`, which keeps every step's scores for the logprobs) and checks the fast engine's logprobs
against a full forward over the sampled sequences. Writes bench/results/gpu_generate.json (and $OUT).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import numpy as np
import torch

from bench.gpu_common import out_dir, qwen3_config, random_model, write_result
from workers.engine_hf_fast import FastHFEngine, process_logits
from workers.engines import HFEngine
from workers.generate_config import GenerationConfig

log = logging.getLogger("bench.gpu_generate")
TARGET_SPEEDUP = 3.0


def make_prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(10, vocab, int(rng.integers(length * 3 // 4, length + 1))).tolist() for _ in range(batch)]


def plain_generate(model, prompts: list[list[int]], new_tokens: int, device: torch.device) -> tuple[int, float]:
    """`model.generate(do_sample=True)` exactly as transformers ships it; returns (new tokens, seconds)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
        )  # fmt: skip
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    return (out.shape[1] - width) * len(prompts), time.perf_counter() - t0


def engine_generate(engine, prompts: list[list[int]], seed: int) -> tuple[int, float, list]:
    dev = engine.device
    torch.cuda.synchronize(dev) if dev.type == "cuda" else None
    t0 = time.perf_counter()
    out = engine.generate(prompts, 1, [seed])
    torch.cuda.synchronize(dev) if dev.type == "cuda" else None
    seconds = time.perf_counter() - t0
    return sum(len(g[0].token_ids) for g in out), seconds, out


def logprob_check(model, prompts, out, rows: int = 4) -> float:
    """Largest |fast logprob - full-forward logprob| over a few rows (bf16: ~1e-2 is rounding)."""
    worst = 0.0
    for prompt, group in list(zip(prompts, out, strict=True))[:rows]:
        c = group[0]
        seq = torch.tensor([prompt + c.token_ids], device=next(model.parameters()).device)
        with torch.no_grad():
            logits = model(input_ids=seq).logits[0, len(prompt) - 1 : -1]  # [T, V]
        ref = process_logits(logits, 1.0, None, 1.0).gather(1, seq[0, len(prompt) :, None])[:, 0].float().cpu()
        worst = max(worst, float((torch.tensor(c.logprobs) - ref).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-hfengine", action="store_true", help="Skip the former HFEngine path (slow).")
    parser.add_argument("--tiny", action="store_true", help="2 small layers: a CPU check of the script.")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    shape = (
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
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model: Any = random_model(qwen3_config(**shape), dtype, device).eval()
    model.generation_config.eos_token_id = None  # equal lengths everywhere (random weights rarely stop anyway)
    prompts = make_prompts(args.batch, args.prompt_len, model.config.vocab_size)
    cfg = GenerationConfig(backend="hf", max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0)
    cfg.vllm_cfg.precision = "bfloat16" if dtype == torch.bfloat16 else "float32"
    figures: dict = {
        "shape": f"Qwen3-4B shape{' (tiny)' if args.tiny else ''}, random {dtype}; batch {args.batch}, prompt "
        f"{args.prompt_len * 3 // 4}-{args.prompt_len}, {args.new_tokens} new tokens, temperature 1, full vocab",
    }

    fast = FastHFEngine(cfg, "bench", model=model, max_batch=max(args.batch, 8))
    t_warm = time.perf_counter()
    engine_generate(fast, prompts, seed=0)  # captures the graph
    figures["fast_first_call_s"] = round(time.perf_counter() - t_warm, 2)
    runs = [engine_generate(fast, prompts, seed=1 + r) for r in range(args.repeats)]
    tokens, seconds, out = min(runs, key=lambda r: r[1])
    figures["fast_new_tokens_per_s"] = round(tokens / seconds, 1)
    figures["fast_ms_per_step"] = round(1000 * seconds / args.new_tokens, 2)
    figures["fast_graph_captured"] = fast.graph_failures == 0 and fast.use_graphs
    figures["fast_logprob_max_abs_diff"] = round(logprob_check(model, prompts, out), 4)
    log.info("fast: %.0f new tokens/s", tokens / seconds)
    fast._decoder = None  # free its cache before the baselines
    if device.type == "cuda":
        torch.cuda.empty_cache()

    plain_generate(model, prompts[:8], 8, device)  # warm-up
    tokens, seconds = plain_generate(model, prompts, args.new_tokens, device)
    figures["plain_generate_new_tokens_per_s"] = round(tokens / seconds, 1)
    log.info("plain generate: %.0f new tokens/s", tokens / seconds)

    if not args.skip_hfengine:
        former = HFEngine.__new__(HFEngine)  # the former project path on the same in-memory model
        former.cfg, former.worker_id, former.torch, former.device = cfg, "bench", torch, device
        former.model, former.tokenizer, former.eos_ids, former._receiver = model, None, set(), None
        tokens, seconds, _ = engine_generate(former, prompts, seed=1)
        figures["hfengine_new_tokens_per_s"] = round(tokens / seconds, 1)

    speedup = figures["fast_new_tokens_per_s"] / figures["plain_generate_new_tokens_per_s"]
    figures["speedup_vs_plain_generate"] = round(speedup, 2)
    if "hfengine_new_tokens_per_s" in figures:
        former = figures["hfengine_new_tokens_per_s"]
        figures["speedup_vs_hfengine"] = round(figures["fast_new_tokens_per_s"] / former, 2)
    for k, v in figures.items():
        print(f"{k:34s} {v}")
    targets = {"speedup_vs_plain_generate": f">= {TARGET_SPEEDUP}"}
    met = speedup >= TARGET_SPEEDUP
    if not args.no_write:
        write_result("gpu_generate", figures, targets, met, out_dir())
    print(f"gpu_generate: {speedup:.2f}x plain generate() (target {TARGET_SPEEDUP}x): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
