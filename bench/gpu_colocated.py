"""The tutorial's job on one GPU, colocated: what `rlq train` does with the learner and a vLLM worker on one GPU.

Three steps, run by scripts/gpu_colocated_session.sh on the GPU node (docs/gpu.md has the command):

    python -m bench.gpu_colocated prepare --hub-cache DIR --tokenizer artifacts/gpu-base --data data/dapo-local.jsonl
        a Qwen3-4B-shaped model with random bf16 weights (vocab 151936, 4.02 B parameters, 8.04 GB) under the hub
        id Qwen/Qwen3-4B-Instruct-2507 in an HF cache layout, with a locally trained tokenizer (no model can be
        downloaded there), and a DAPO-schema JSONL of arithmetic problems for `rlq prepare-data --source dapo`;
    python -m bench.gpu_colocated alone --config C [overrides]
        the worker's engine alone on the GPU (same VllmEngine, same settings, same batch shape): the baseline of
        the in-loop throughput, measured in the same session;
    python -m bench.gpu_colocated report --run-dir R [--smi F] [--alone F]
        reads what the run left (metrics.jsonl, the roles' logs, an nvidia-smi trace) and writes
        bench/results/gpu_colocated.json.

Random weights rarely emit EOS, so every completion runs to max_new_tokens and the judge finds no answer: the
rewards are all 0, which says nothing about learning; the run measures the machinery. Zero rewards give zero
advantages, which the learner skips by default, so the session sets policy.skip_zero_advantage=false to make
each step train on every token, as a step with real rewards would.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HUB_ID = "Qwen/Qwen3-4B-Instruct-2507"
PARAMS = 4.022e9  # Qwen3-4B, tied embedding counted once
PEAK_BF16_FLOPS = 989e12  # dense bf16 of an H100/H200 SXM: the same tensor cores and clock
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
TINY_SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512}  # fmt: skip
TARGETS = {
    "loop_vs_alone_tokens_per_s": ">= 0.8",
    "refit_s": "<= 0.1",
    "token_mult_prob_error": "<= 1.02",
    "gpu_busy_fraction": ">= 0.85",
}


def prepare(args: argparse.Namespace) -> None:
    import random

    import torch

    from bench.gpu_common import qwen3_config, random_model
    from rlq.models import place_in_hf_cache

    t0 = time.perf_counter()
    shape = TINY_SHAPE if args.tiny else {}  # --tiny: the same steps on a CPU machine, to check the session
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = random_model(qwen3_config(**shape), dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer_dir = Path(args.tokenizer)
    eos = json.loads((tokenizer_dir / "generation_config.json").read_text()).get("eos_token_id")
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        staging = Path(tmp) / "model"
        model.save_pretrained(staging)
        del model
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, staging / name)
        snapshot = place_in_hf_cache(staging, HUB_ID, Path(args.hub_cache))
    rng = random.Random(0)
    rows = []
    for index in range(args.problems):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        rows.append({"data_source": "math_dapo", "ability": "MATH", "extra_info": {"index": str(index)},
                     "prompt": [{"role": "user", "content": f"What is {a} + {b} * {c}?"}],
                     "reward_model": {"ground_truth": str(a + b * c), "style": "rule-lighteval/MATH_v2"}})  # fmt: skip
    Path(args.data).parent.mkdir(parents=True, exist_ok=True)
    Path(args.data).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"model {HUB_ID} -> {snapshot} and {len(rows)} DAPO rows -> {args.data} in {time.perf_counter() - t0:.0f}s")


def alone(args: argparse.Namespace) -> None:
    """The colocated worker's engine, alone on the GPU, on the step's shape: prompts x generations x max tokens."""
    import torch

    from broker.prepared import read_rows
    from learner.data_source import prompt_from_row
    from rlq.config import load_run_config
    from rlq.models import resolve_model
    from workers.generate.engines import VllmEngine, request_seed

    cfg = load_run_config(args.config, args.overrides)
    gen = cfg.policy.generation.model_copy(deep=True)
    gen.vllm_cfg.gpu_memory_utilization = gen.vllm_cfg.colocated_gpu_memory_utilization  # as rlq train sets it
    path = resolve_model(cfg.policy.model_name)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = read_rows(Path(cfg.data.path) / "train.jsonl")
    t0 = time.perf_counter()
    engine = VllmEngine(gen, "alone", path)
    start_s = time.perf_counter() - t0
    runs = []
    for repeat in range(args.repeats + 1):  # the first is a warm-up
        batch = [prompt_from_row(rows[(repeat * 7 + i) % len(rows)], i, tokenizer) for i in range(args.prompts)]
        prompts = [p.token_ids.to_numpy().tolist() for p in batch]
        seeds = [request_seed(gen.vllm_cfg.seed, f"{p.prompt_id}@alone{repeat}") for p in batch]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        out = engine.generate(prompts, cfg.grpo.num_generations_per_prompt, seeds)
        seconds = time.perf_counter() - t1
        tokens = sum(len(c.token_ids) for group in out for c in group)
        if repeat:
            runs.append({"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds})
    engine.close()
    result = {
        "engine_start_s": start_s,
        "runs": runs,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


BATCH_LINE = re.compile(
    r"^(\S+ \S+) .*read of \d+ batches \(train\)[^:]*: (\d+) groups, (\d+) tokens in ([\d.]+)s at v(\d+)"
)
LOADED_LINE = re.compile(r"^(\S+ \S+) .*weights v(\d+) loaded \(receive ([\d.]+)s, load ([\d.]+)s.*, ([\d.]+)s after")


def report(args: argparse.Namespace) -> None:
    from bench.gpu_common import write_result

    run_dir = Path(args.run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/total" in r]
    steady = steps[1:] or steps  # the first step pays the learner's compile and the engine's first batch
    batches = [m.groups() for m in map(BATCH_LINE.match, _lines(run_dir / "logs" / "generate-0.log")) if m]
    loads = [m.groups() for m in map(LOADED_LINE.match, _lines(run_dir / "logs" / "generate-0.log")) if m]
    gen_by_version: dict[int, float] = {}
    for _, _, _, seconds, version in batches:
        gen_by_version[int(version)] = gen_by_version.get(int(version), 0.0) + float(seconds)
    loop_tps = [int(tokens) / float(seconds) for _, _, tokens, seconds, _ in batches[1:] or batches]

    def mean(key: str, rows: list[dict] = steady) -> float:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return statistics.fmean(values) if values else float("nan")

    # A step of the synchronous loop: generation of version v-1's samples, the judges, training, the refit.
    generation = statistics.fmean(gen_by_version.get(r["step"] - 1, 0.0) for r in steady)
    wait = mean("queue/wait_s")
    load_after = [float(after) for _, version, _, _, after in loads if int(version) > 0]
    refit_learner = mean("sync/broadcast_s")
    figures = {
        "steps": len(steps),
        "step_s": mean("perf/step_s"),
        "split_generation_s": generation,
        "split_judge_wait_s": max(0.0, wait - generation),
        "split_training_s": mean("perf/train_s"),
        "split_refit_learner_s": refit_learner,
        "split_checkpoint_s": mean("perf/checkpoint_s"),
        "refit_bytes": mean("sync/bytes"),
        "refit_worker_load_s": statistics.fmean(float(load) for _, v, _, load, _ in loads if int(v) > 0)
        if load_after
        else float("nan"),
        "refit_announcement_to_loaded_s": statistics.median(load_after) if load_after else float("nan"),
        "loop_tokens_per_s": statistics.median(loop_tps) if loop_tps else float("nan"),
        "learner_tokens_per_s": mean("perf/tokens_per_s"),
        "token_mult_prob_error": mean("loss/token_mult_prob_error"),
        "token_mult_prob_error_step1": steps[0].get("loss/token_mult_prob_error") if steps else None,
        "versions": [r["step"] for r in steps],
        "sampled_versions": sorted({int(v) for *_, v in batches}),
    }
    # The refit itself: the learner rewrites its shared buffers, the worker loads them in place. The time from the
    # announcement to "loaded" adds the worker's poll when it is idle (sync runs), and in async runs the rest of the
    # batch in hand, which is the design, not the refit: both are reported.
    figures["refit_s"] = refit_learner + figures["refit_worker_load_s"]
    figures["learner_mfu"] = 6 * PARAMS * figures["learner_tokens_per_s"] / PEAK_BF16_FLOPS
    if args.alone and Path(args.alone).exists():
        alone_result = json.loads(Path(args.alone).read_text())
        figures["alone_tokens_per_s"] = alone_result["tokens_per_s"]
        figures["alone_engine_start_s"] = alone_result["engine_start_s"]
        figures["loop_vs_alone_tokens_per_s"] = figures["loop_tokens_per_s"] / alone_result["tokens_per_s"]
    if args.smi and Path(args.smi).exists() and len(steady) > 1:
        figures.update(_gpu_busy(Path(args.smi), steady[0]["time"] - steady[0]["perf/step_s"], steady[-1]["time"]))
    met = all(_meets(figures.get(k), t) for k, t in TARGETS.items())
    figures["note"] = args.note
    path = write_result(args.out_name, figures, TARGETS, met)
    print(json.dumps(figures, indent=1))
    print(f"wrote {path}; met={met}")


def _gpu_busy(smi: Path, start: float, end: float) -> dict[str, float]:
    """Share of nvidia-smi samples' time with a kernel running (utilization.gpu), over the steady steps."""
    import datetime as dt

    busy, memory = [], []
    for line in smi.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            when = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            util, used = float(parts[1]), float(parts[2])
        except (ValueError, IndexError):
            continue
        if start <= when <= end:
            busy.append(util / 100)
            memory.append(used)
    if not busy:
        return {}
    return {"gpu_busy_fraction": statistics.fmean(busy), "gpu_samples": len(busy), "gpu_memory_max_mib": max(memory)}


def _meets(value: object, target: str) -> bool:
    if not isinstance(value, (int, float)):
        return False
    op, bound = target.split()
    return value >= float(bound) if op == ">=" else value <= float(bound)


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--hub-cache", required=True)
    p.add_argument("--tokenizer", default="artifacts/gpu-base")
    p.add_argument("--data", default="data/dapo-local.jsonl")
    p.add_argument("--problems", type=int, default=400)
    p.add_argument("--scratch", default=None, help="Where the model is staged before it enters the cache.")
    p.add_argument("--tiny", action="store_true", help="A 2-layer float32 model of the same family (CPU check).")
    a = sub.add_parser("alone")
    a.add_argument("--config", required=True)
    a.add_argument("--prompts", type=int, default=4)
    a.add_argument("--repeats", type=int, default=3)
    a.add_argument("--out", default="engine_alone.json")
    a.add_argument("overrides", nargs="*")
    r = sub.add_parser("report")
    r.add_argument("--run-dir", required=True)
    r.add_argument("--alone")
    r.add_argument("--smi")
    r.add_argument("--note", default="")
    r.add_argument("--out-name", default="gpu_colocated", help="bench/results/<name>.json")
    args = parser.parse_args()
    {"prepare": prepare, "alone": alone, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
