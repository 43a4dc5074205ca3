"""Generation-worker benchmark, one run: vLLM CPU vs transformers tokens/s, and weight-update time vs raw gloo.

- tokens/s: the same tiny Qwen3 (rlq/tiny_policy.py), the same prompts, n samples each, through
  `workers.generate.engines.VllmEngine` (warm, the project's GenerationConfig defaults: compiled, engine inside this
  process, text decoded once per completion) and `HFEngine` (`generate()`), both float32 on CPU, in this process
  with the same torch thread count (the engine's: the usable CPUs less one, 1 on a 2-core machine). Each
  backend's best of --rounds interleaved rounds. (Until 2026-11-27 generate() ran with torch's default 2 threads
  beside vLLM's engine processes: on this shared 2-vCPU machine that collapsed it to ~1k tokens/s through OpenMP
  waits, against ~10k with one thread; the 4.8x recorded then compared vLLM with that collapsed baseline.)
- weight update: `learner.broadcast.CollectiveBroadcast(flatten=True)` in a learner process of its own ->
  `VllmEngine.update_weights` (join once, then steady state: bucketed gloo broadcast into the engine + the
  in-place load of workers/generate/vllm_reload.py + prefix-cache reset), from the learner's first step until the worker
  has loaded, against a raw gloo broadcast of the same bytes as one flat tensor between two processes. Medians
  of repeats. Since 2026-11-27 the worker loads and re-packs each bucket as it arrives: `*_receive_s` includes
  that overlapped work and `*_reload_s` is only what follows the last bucket (before: receive, then load). The
  learner was a thread of the bench process before and the engine had its own processes; the update crossed
  one process boundary then as now.
- the same update on a wider random Qwen3 (--scaled-hidden x --scaled-layers), to show how the ratio moves
  when bytes, not per-layer overheads, dominate.
- every vLLM figure twice: with the default `vllm_cfg.cpu_gemm=onednn` (packed weights, re-packed at each update)
  and, as `torch_gemm_*`, with `cpu_gemm=torch` (weights kept, updates copy in place), tokens/s included. The
  targets are judged on the default.

Usage: python bench/generate.py [--prompts 16] [--n 8] [--max-new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

# Run as `python bench/generate.py`, this folder would come first on sys.path and bench/broker.py would shadow
# the `broker` package; the repository root goes there instead.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

RESULTS = Path(__file__).parent / "results" / "generate.json"


def build_model(cache: Path) -> Path:
    from rlq.tiny_policy import build_base_model

    return build_base_model(cache / "tiny")


def prompts(count: int) -> list[list[int]]:
    return [[3 + i % 50, 10 + i, 20, 30, 40 + i % 7, 11] for i in range(count)]


def tokens_per_s(engine, batch: list[list[int]], n: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = engine.generate(batch, n, list(range(len(batch))))
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for comps in out for c in comps)
    return tokens / seconds, tokens


_RAW_RECEIVER = """
import sys, torch, torch.distributed as dist
from datetime import timedelta
port, numel, rounds = map(int, sys.argv[1:4])
store = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=120))
pg = dist.ProcessGroupGloo(dist.PrefixStore("raw/", store), 1, 2, timedelta(seconds=120))
opts = dist.BroadcastOptions()
opts.rootRank = 0
buf = torch.empty(numel)
for i in range(rounds):
    pg.broadcast([buf], opts).wait()
    store.set(f"done{i}", "1")
"""


def raw_gloo_seconds(numel: int, repeats: int) -> float:
    """Median seconds of one gloo broadcast of `numel` float32 to a receiver in another process (loopback TCP),
    until the receiver has all of it: the same process boundary the weight update crosses."""
    import subprocess

    import torch
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=120), wait_for_workers=False)
    rounds = repeats + 1
    receiver = subprocess.Popen([sys.executable, "-c", _RAW_RECEIVER, str(store.port), str(numel), str(rounds)])
    try:
        pg = dist.ProcessGroupGloo(dist.PrefixStore("raw/", store), 0, 2, timedelta(seconds=120))
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        send = torch.randn(numel)
        times = []
        for i in range(rounds):
            t0 = time.perf_counter()
            pg.broadcast([send], opts).wait()
            store.wait([f"done{i}"])
            times.append(time.perf_counter() - t0)
    finally:
        receiver.wait(60)
    return statistics.median(times[1:])


_LEARNER = """
import json, sys
sys.path.insert(0, sys.argv[4])
from transformers import AutoModelForCausalLM
from broker.connection import connect
from broker.keys import Keys
from learner.broadcast import CollectiveBroadcast
url, model_dir, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = connect(url)
model = AutoModelForCausalLM.from_pretrained(model_dir)
learner = CollectiveBroadcast(r, Keys("bench"), master_addr="127.0.0.1", timeout_s=60, flatten=True)
r.rpush("bench:ready", 1)
for version in range(1, rounds + 1):
    r.blpop(["bench:go"])
    report = learner.broadcast(model, version)
    r.rpush("bench:report", json.dumps({"seconds": report.seconds, "bytes": report.bytes}))
learner.close()
# As rlq/cli_learner.py does: gloo's threads outlive the group, and one that runs into interpreter finalization
# aborts the process ("terminate called without an active exception").
import os
os._exit(0)
"""


def weight_update_seconds(engine, model_dir: Path, repeats: int) -> dict[str, float]:
    """Median seconds of steady-state updates: learner broadcast() and the worker's receive + reload.

    The learner is a process of its own (`CollectiveBroadcast(flatten=True)`, as `make_broadcast` builds it), as
    in a run: with the vLLM CPU engine inside this process, a learner thread here would share its interpreter.
    """
    import json
    import subprocess

    from broker.connection import connect
    from broker.keys import POLICY_JOIN_PREFIX, Keys
    from broker.policy import PolicyHash
    from broker.server import RedisServer

    rounds = repeats + 1
    with tempfile.TemporaryDirectory() as tmp, RedisServer(directory=Path(tmp)) as server:
        r = connect(server.url)
        keys = Keys("bench")
        r.set(keys.worker_alive(engine.worker_id), "1", ex=3600)
        r.hset(keys.policy, POLICY_JOIN_PREFIX + engine.worker_id, time.time())
        cmd = [sys.executable, "-c", _LEARNER, server.url, str(model_dir), str(rounds), str(_ROOT)]
        learner = subprocess.Popen(cmd)
        try:
            r.blpop(["bench:ready"], timeout=300)
            worker_s, learner_s, receive_s, load_s, in_place = [], [], [], [], []
            for version in range(1, rounds + 1):
                t0 = time.perf_counter()
                r.rpush("bench:go", 1)
                ann = None
                while ann is None or ann.version != version:
                    ann = PolicyHash(r, keys).announcement()
                stats = engine.update_weights(ann)
                elapsed = time.perf_counter() - t0
                report = json.loads(r.blpop(["bench:report"], timeout=120)[1])
                if version > 1:  # the first one includes the rendezvous (once per epoch) and the layout
                    worker_s.append(elapsed)
                    learner_s.append(report["seconds"])
                    receive_s.append(stats.receive_s)
                    load_s.append(stats.load_s)
                    in_place.append(stats.extra.get("in_place", 0.0))
        finally:
            learner.wait(60)
    med = statistics.median
    return {"update_s": med(worker_s), "learner_broadcast_s": med(learner_s), "receive_s": med(receive_s),
            "reload_s": med(load_s), "bytes": float(report["bytes"]), "in_place": min(in_place)}  # fmt: skip


def build_scaled_model(out: Path, hidden: int, layers: int) -> Path:
    """A random Qwen3 of realistic width (no tokenizer: the engine runs on token ids), for the size trend."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if (out / "model.safetensors").exists():
        return out
    cfg = Qwen3Config(
        vocab_size=32_000, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), head_dim=64,
        max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).to(torch.float32).save_pretrained(out)
    return out


def scaled_update(cfg, cache: Path, hidden: int, layers: int, repeats: int, prefix: str) -> dict[str, float]:
    """Tokens/s and weight update vs raw gloo on a wider model, where bytes rather than per-layer overheads
    dominate: `update_figures` under `{prefix}scaled_`."""
    from workers.generate.engines import VllmEngine

    model_dir = build_scaled_model(cache / f"scaled-{hidden}x{layers}", hidden, layers)
    engine = VllmEngine(cfg, "bench-scaled", str(model_dir))
    try:
        batch = prompts(16)
        tokens_per_s(engine, batch, 8)  # warm-up
        tps = max(tokens_per_s(engine, batch, 8)[0] for _ in range(2))
        print(f"{prefix}scaled model: {tps:,.0f} tokens/s")
        # raw gloo is measured with the engine up, as in the update
        return {f"{prefix}scaled_tokens_per_s": tps, **update_figures(engine, model_dir, repeats, f"{prefix}scaled_")}
    finally:
        engine.close()


def update_figures(engine, model_dir: Path, repeats: int, prefix: str) -> dict[str, float]:
    """One engine's steady-state weight update against a raw gloo broadcast of the same bytes."""
    update = weight_update_seconds(engine, model_dir, repeats)
    raw_s = raw_gloo_seconds(int(update["bytes"]) // 4, repeats)
    print(f"{prefix}weight update {update['update_s'] * 1e3:.1f} ms (receive {update['receive_s'] * 1e3:.1f} ms, "
          f"reload {update['reload_s'] * 1e3:.1f} ms; learner blocked {update['learner_broadcast_s'] * 1e3:.1f} ms) "
          f"vs raw gloo broadcast of the same {update['bytes'] / 1e6:.1f} MB: {raw_s * 1e3:.1f} ms")  # fmt: skip
    return {
        f"{prefix}weight_update_s": update["update_s"],
        f"{prefix}weight_update_receive_s": update["receive_s"],
        f"{prefix}weight_update_reload_s": update["reload_s"],
        f"{prefix}learner_broadcast_s": update["learner_broadcast_s"],
        f"{prefix}raw_gloo_broadcast_s": raw_s,
        f"{prefix}weight_bytes": update["bytes"],
        f"{prefix}update_over_raw_gloo": update["update_s"] / raw_s,
        f"{prefix}learner_broadcast_over_raw_gloo": update["learner_broadcast_s"] / raw_s,
        f"{prefix}weight_update_in_place": update["in_place"],  # 1: workers/generate/vllm_reload.py's path, 0: vLLM's
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/rlq-bench-tiny"))
    ap.add_argument("--scaled-hidden", type=int, default=1024, help="Width of the size-trend model (0: skip).")
    ap.add_argument("--scaled-layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="Interleaved generation rounds per backend (best).")
    args = ap.parse_args()

    import torch

    from workers.generate.config import GenerationConfig
    from workers.generate.engines import HFEngine, VllmEngine

    model_dir = build_model(args.cache)
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": 1.0,
                "vllm_cfg": {"max_model_len": 256, "cpu_kvcache_space_gib": 1, "max_num_seqs": 256}}  # fmt: skip
    cfg = GenerationConfig.model_validate(settings)
    torch_cfg = cfg.model_copy(update={"vllm_cfg": cfg.vllm_cfg.model_copy(update={"cpu_gemm": "torch"})})
    batch = prompts(args.prompts)

    hf = HFEngine(cfg, "bench-hf", str(model_dir), device="cpu")
    vllm = VllmEngine(cfg, "bench-vllm", str(model_dir))
    vllm_torch = VllmEngine(torch_cfg, "bench-vllm-torch", str(model_dir))
    threads = torch.get_num_threads()  # the vLLM engine set it (cpu_threads); generate() runs with the same
    tokens_per_s(hf, batch[:2], args.n)  # warm-up
    for engine in (vllm, vllm_torch):
        tokens_per_s(engine, batch, args.n)  # warm-up (compilation, first KV blocks)
    # The machine is shared: interleave the backends and keep each one's best round.
    runs: dict[str, list[tuple[float, int]]] = {"hf": [], "vllm": [], "vllm_torch": []}
    for _ in range(args.rounds):
        for name, engine in (("hf", hf), ("vllm", vllm), ("vllm_torch", vllm_torch)):
            runs[name].append(tokens_per_s(engine, batch, args.n))
    best = {name: max(r) for name, r in runs.items()}
    print(f"transformers generate(): {best['hf'][0]:,.0f} tokens/s ({best['hf'][1]} tokens), best of {args.rounds}")
    print(f"vLLM CPU (oneDNN GEMMs): {best['vllm'][0]:,.0f} tokens/s; torch GEMMs: {best['vllm_torch'][0]:,.0f}")

    figures = {
        "vllm_tokens_per_s": best["vllm"][0],
        "hf_tokens_per_s": best["hf"][0],
        "speedup_vllm_over_hf": best["vllm"][0] / best["hf"][0],
        "torch_gemm_vllm_tokens_per_s": best["vllm_torch"][0],
    }
    figures |= update_figures(vllm, model_dir, args.repeats, prefix="")
    figures |= update_figures(vllm_torch, model_dir, args.repeats, prefix="torch_gemm_")
    vllm.close()
    vllm_torch.close()
    if args.scaled_hidden:
        for prefix, c in (("", cfg), ("torch_gemm_", torch_cfg)):
            figures |= scaled_update(c, args.cache, args.scaled_hidden, args.scaled_layers, args.repeats, prefix)

    targets = {"speedup_vllm_over_hf": ">= 10", "update_over_raw_gloo": "<= 1.5"}
    met = figures["speedup_vllm_over_hf"] >= 10 and figures["update_over_raw_gloo"] <= 1.5
    result = {
        "bench": "generate",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "settings": vars(args)
        | {"cache": str(args.cache), "model_params": hf.model.num_parameters(), "torch_threads": threads},
        "figures": figures,
        "targets": targets,
        "met": met,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(figures, indent=1))
    print(f"targets met: {met} -> {RESULTS}")


if __name__ == "__main__":
    main()
