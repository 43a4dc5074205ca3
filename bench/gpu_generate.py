"""Generation on one GPU: FastHFEngine (static cache + CUDA-graphed step) vs plain `generate()` vs vLLM.

Qwen3-4B shape, random bf16 weights, `--batch` sequences (distinct prompts of 3/4..1 x `--prompt-len` tokens, left
padded), `--new-tokens` sampled tokens each at temperature 1 over the whole vocabulary; EOS is switched off so
every row produces the same count in every engine. Also times the project's former transformers path
(`HFEngine.generate`, which keeps every step's scores for the logprobs) and checks the fast engine's logprobs
against a full forward over the sampled sequences.

Last, the same random model saved to a temporary directory (no tokenizer: no detokenization) runs through
`workers.generate.engines.VllmEngine`, the class the generation worker uses, on the same prompts with one seed
per prompt as the worker derives them. vLLM comes last because it claims a share of the GPU when it starts: the HF model
stays (8 GB, needed for the logprob check), the fast engine's static cache and graphs are freed first. Its tokens
per second count the tokens it actually produced (its SamplingParams do not set ignore_eos; the saved model has
no EOS id, so rows should not stop early: `vllm_rows_short` says). Its behaviour logprobs of the sampled tokens
are compared with a full transformers forward over every row: mean/max |difference| and NeMo RL's
`token_mult_prob_error`.

Writes bench/results/gpu_generate.json (and $OUT) in the bench format (bench/gpu_common.py `write_result`).

On the GPU node (repository root, project venv; a few minutes, most of vLLM's in its compile and graph capture;
only $OUT comes back from a lent machine):
    OUT=/some/dir python -m bench.gpu_generate                 # the recorded run
    python -m bench.gpu_generate --vllm-eager --skip-hfengine  # quicker: vLLM without torch.compile/graphs
CPU check of the whole script (tiny float32 model; result in $TMPDIR/rlq-gpu-generate-cpucheck/, never in
bench/results/):
    python -m bench.gpu_generate --cpu-check

Flags: --batch 64, --prompt-len 128, --new-tokens 256, --repeats 2 (timed fast-engine and vLLM calls, best kept),
--skip-hfengine, --skip-vllm, --vllm-eager (enforce_eager; default compiled), --gpu-memory-utilization 0.35
(vLLM's share of the GPU), --tiny (2 small layers), --cpu-check (tiny on CPU, batch 4, 16 tokens), --no-write.
"""

from __future__ import annotations

import argparse
import gc
import logging
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from bench import gpu_common
from bench.gpu_common import out_dir, qwen3_config, random_model, write_result
from workers.generate.config import GenerationConfig
from workers.generate.engine_hf_fast import FastHFEngine, process_logits
from workers.generate.engines import HFEngine, VllmEngine, request_seed

log = logging.getLogger("bench.gpu_generate")
TARGET_SPEEDUP = 3.0
# head_dim 32: vLLM's CPU attention has no kernel for 16 (rlq/tiny_policy.py uses 32 for the same reason).
TINY = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 512,
}
LEN_SLACK = 16
"""vLLM's max_model_len over the longest prompt + new tokens."""


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


def vllm_generate(engine: VllmEngine, prompts: list[list[int]], seed: int) -> tuple[int, float, list]:
    """One `VllmEngine.generate` call, one seed per prompt derived as the worker does (`request_seed`)."""
    # Same prompts every call: without the reset, the prefix cache would skip the prefills the HF engines pay.
    engine.llm.reset_prefix_cache()
    seeds = [request_seed(seed, f"row-{i}") for i in range(len(prompts))]
    t0 = time.perf_counter()
    out = engine.generate(prompts, 1, seeds)  # returns when every request has finished: no device sync needed
    seconds = time.perf_counter() - t0
    return sum(len(g[0].token_ids) for g in out), seconds, out


def logprob_diffs(model, prompts, out, rows: int | None = None) -> torch.Tensor:
    """Engine logprob - full-forward logprob of each sampled token of the first `rows` rows, float32 [tokens]."""
    dev = next(model.parameters()).device
    diffs = []
    for prompt, group in list(zip(prompts, out, strict=True))[:rows]:
        c = group[0]
        if not c.token_ids:
            continue
        seq = torch.tensor([prompt + c.token_ids], device=dev)
        with torch.no_grad():
            logits = model(input_ids=seq).logits[0, len(prompt) - 1 : -1]  # [T, V]
        ref = process_logits(logits, 1.0, None, 1.0).gather(1, seq[0, len(prompt) :, None])[:, 0].float().cpu()
        diffs.append(torch.tensor(c.logprobs, dtype=torch.float32) - ref)
    return torch.cat(diffs) if diffs else torch.zeros(0)


def sig(x: float) -> float:
    """4 significant digits: float32 differences are ~1e-7, bf16 ones ~1e-2; a fixed rounding hides the former."""
    return float(f"{x:.4g}")


def token_mult_prob_error(diffs: torch.Tensor) -> float:
    """NeMo RL's logprob consistency metric: the mean over tokens of exp(|logp_inference - logp_train|); 1 = equal.

    As NVIDIA-NeMo/RL computes it in nemo_rl/algorithms/loss_functions.py (ClippedPGLossFn:
    `masked_mean(torch.exp(torch.abs(generation_logprobs - prev_logprobs) * mask), mask)`) and defines it in
    docs/guides/grpo.md ("Multiplicative Token Probability Error"): the mean of the exponentials, not the
    exponential of the mean |difference| (which is never larger).
    """
    return float(diffs.abs().exp().mean()) if diffs.numel() else float("nan")


def vllm_figures(args, model, prompts, cfg: GenerationConfig, precision: str) -> dict[str, Any]:
    """Start VllmEngine on the model saved to a temp dir, warm it up, time it, check its logprobs."""
    vllm_cfg = cfg.vllm_cfg.model_copy(
        update={
            "precision": precision,
            "max_model_len": max(len(p) for p in prompts) + args.new_tokens + LEN_SLACK,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "enforce_eager": args.vllm_eager,
            "max_num_seqs": args.batch,  # every row decodes in one batch, as in the HF engines
            "cpu_kvcache_space_gib": 1,  # CPU only: unset, the CPU engine claims ~92 % of RAM
        }
    )
    vcfg = cfg.model_copy(update={"backend": "vllm", "stop_token_ids": None, "vllm_cfg": vllm_cfg})
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rlq-gpu-generate-") as model_dir:
        # transformers 5 always writes safetensors (no safe_serialization argument); the model's own dtype.
        model.save_pretrained(model_dir)
        t0 = time.perf_counter()
        engine = VllmEngine(vcfg, "bench", model_dir)
        figures["vllm_engine_start_s"] = round(time.perf_counter() - t0, 2)
        try:
            if engine.detokenize:
                raise RuntimeError(f"{model_dir} holds a tokenizer: timings would include detokenization")
            t_warm = time.perf_counter()
            vllm_generate(engine, prompts, seed=0)
            figures["vllm_first_call_s"] = round(time.perf_counter() - t_warm, 2)
            runs = [vllm_generate(engine, prompts, seed=1 + r) for r in range(args.repeats)]
        finally:
            engine.close()
            del engine
    tokens, seconds, out = min(runs, key=lambda r: r[1])
    figures["vllm_new_tokens_per_s"] = round(tokens / seconds, 1)
    figures["vllm_new_tokens"] = tokens
    figures["vllm_rows_short"] = sum(len(g[0].token_ids) < args.new_tokens for g in out)
    figures["vllm_compiled"] = not args.vllm_eager
    figures["vllm_gpu_memory_utilization"] = args.gpu_memory_utilization
    log.info("vLLM: %.0f new tokens/s (%d tokens)", tokens / seconds, tokens)
    diffs = logprob_diffs(model, prompts, out)
    figures["vllm_logprob_tokens_checked"] = int(diffs.numel())
    figures["vllm_logprob_mean_abs_diff"] = sig(float(diffs.abs().mean()))
    figures["vllm_logprob_max_abs_diff"] = sig(float(diffs.abs().max()))
    figures["vllm_token_mult_prob_error"] = round(token_mult_prob_error(diffs), 6)
    return figures


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-hfengine", action="store_true", help="Skip the former HFEngine path (slow).")
    parser.add_argument("--skip-vllm", action="store_true", help="Skip the VllmEngine measurement.")
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM enforce_eager (default: compiled).")
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.35, help="vLLM's share of the GPU (the HF model stays)."
    )
    parser.add_argument("--tiny", action="store_true", help="2 small layers: a check of the script.")
    parser.add_argument(
        "--cpu-check", action="store_true", help="Tiny, on CPU, batch 4, 16 tokens; result under $TMPDIR only."
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.cpu_check:  # small enough for a shared 2-core machine
        args.tiny = True
        args.batch, args.prompt_len, args.new_tokens, args.repeats = 4, 16, 16, 1
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    shape = TINY if args.tiny else {}
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_check else "cpu")
    # float32 on CPU: vLLM's CPU build has crashed in bf16 (workers/generate/config.py, `precision`).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    precision = "bfloat16" if dtype == torch.bfloat16 else "float32"
    model: Any = random_model(qwen3_config(**shape), dtype, device).eval()
    # Equal lengths everywhere (random weights rarely stop anyway); saved with the model, so vLLM has none either.
    model.generation_config.eos_token_id = None
    prompts = make_prompts(args.batch, args.prompt_len, model.config.vocab_size)
    cfg = GenerationConfig(backend="hf", max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0)
    cfg.vllm_cfg.precision = precision
    figures: dict = {
        "shape": f"Qwen3-4B shape{' (tiny)' if args.tiny else ''}, random {dtype}; batch {args.batch}, prompt "
        f"{args.prompt_len * 3 // 4}-{args.prompt_len}, {args.new_tokens} new tokens, temperature 1, full vocab",
    }

    # FastHFEngine runs on CPU too (eager steps, no graphs), so the CPU check covers it.
    fast = FastHFEngine(cfg, "bench", model=model, max_batch=max(args.batch, 8))
    t_warm = time.perf_counter()
    engine_generate(fast, prompts, seed=0)  # captures the graph
    figures["fast_first_call_s"] = round(time.perf_counter() - t_warm, 2)
    runs = [engine_generate(fast, prompts, seed=1 + r) for r in range(args.repeats)]
    tokens, seconds, out = min(runs, key=lambda r: r[1])
    figures["fast_new_tokens_per_s"] = round(tokens / seconds, 1)
    figures["fast_ms_per_step"] = round(1000 * seconds / args.new_tokens, 2)
    figures["fast_graph_captured"] = fast.graph_failures == 0 and fast.use_graphs
    fast_diffs = logprob_diffs(model, prompts, out, rows=4)
    figures["fast_logprob_max_abs_diff"] = round(float(fast_diffs.abs().max()), 4)
    figures["fast_token_mult_prob_error"] = round(token_mult_prob_error(fast_diffs), 6)
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
        del former

    if not args.skip_vllm:
        # vLLM checks at start that its share of the GPU is free: drop everything but the model itself.
        del fast, out, runs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        figures |= vllm_figures(args, model, prompts, cfg, precision)
        figures["vllm_vs_fast_hf"] = round(figures["vllm_new_tokens_per_s"] / figures["fast_new_tokens_per_s"], 2)
        plain = figures["plain_generate_new_tokens_per_s"]
        figures["vllm_vs_plain_generate"] = round(figures["vllm_new_tokens_per_s"] / plain, 2)

    speedup = figures["fast_new_tokens_per_s"] / figures["plain_generate_new_tokens_per_s"]
    figures["speedup_vs_plain_generate"] = round(speedup, 2)
    if "hfengine_new_tokens_per_s" in figures:
        former_tps = figures["hfengine_new_tokens_per_s"]
        figures["speedup_vs_hfengine"] = round(figures["fast_new_tokens_per_s"] / former_tps, 2)
    for k, v in figures.items():
        print(f"{k:34s} {v}")
    targets = {"speedup_vs_plain_generate": f">= {TARGET_SPEEDUP}"}
    met = speedup >= TARGET_SPEEDUP
    if args.cpu_check and not args.no_write:
        # write_result always writes bench/results/<name>.json: point it elsewhere so the GPU record stays.
        results = Path(tempfile.gettempdir()) / "rlq-gpu-generate-cpucheck"
        with mock.patch.object(gpu_common, "RESULTS", results):
            path = write_result("gpu_generate_cpucheck", figures, targets, met, out_dir())
        print(f"cpu check written to {path}")
    elif not args.no_write:
        write_result("gpu_generate", figures, targets, met, out_dir())
    print(f"gpu_generate: {speedup:.2f}x plain generate() (target {TARGET_SPEEDUP}x): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
