"""Generation-worker benchmark, one run: vLLM CPU vs transformers tokens/s, and weight-update time vs raw gloo.

- tokens/s: the same tiny Qwen3 (rlq/tiny_policy.py), the same prompts, n samples each, through
  `workers.engines.VllmEngine` (warm) and `HFEngine` (`generate()`), both float32 on CPU.
- weight update: `learner.broadcast.CollectiveBroadcast` -> `VllmEngine.update_weights` (join once, then steady
  state: bucketed gloo broadcast into the engine's worker process + `reload_weights` + prefix-cache reset),
  against a raw gloo broadcast of the same bytes as one flat tensor between two ranks. Medians of repeats.

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
import threading
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

    return build_base_model(cache)


def prompts(count: int) -> list[list[int]]:
    return [[3 + i % 50, 10 + i, 20, 30, 40 + i % 7, 11] for i in range(count)]


def tokens_per_s(engine, batch: list[list[int]], n: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = engine.generate(batch, n, list(range(len(batch))))
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for comps in out for c in comps)
    return tokens / seconds, tokens


def raw_gloo_seconds(numel: int, repeats: int) -> float:
    """Median seconds of one gloo broadcast of `numel` float32 between two ranks (threads, loopback TCP)."""
    import torch
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=60), wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", store.port, None, False, timedelta(seconds=60))
    groups: dict[int, object] = {}

    def make(rank: int, s) -> None:
        groups[rank] = dist.ProcessGroupGloo(dist.PrefixStore("raw/", s), rank, 2, timedelta(seconds=60))

    threads = [threading.Thread(target=make, args=(0, store)), threading.Thread(target=make, args=(1, client))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    send, recv = torch.randn(numel), torch.empty(numel)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        works = [groups[0].broadcast([send], opts), groups[1].broadcast([recv], opts)]  # type: ignore[attr-defined]
        for w in works:
            w.wait()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def weight_update_seconds(engine, model, repeats: int) -> dict[str, float]:
    """Median seconds of steady-state updates: learner broadcast() and the worker's receive + reload."""
    from broker.connection import connect
    from broker.keys import POLICY_JOIN_PREFIX, Keys
    from broker.server import RedisServer
    from learner.broadcast import CollectiveBroadcast, read_announcement

    with tempfile.TemporaryDirectory() as tmp, RedisServer(directory=Path(tmp)) as server:
        r = connect(server.url)
        keys = Keys("bench")
        learner = CollectiveBroadcast(r, keys, master_addr="127.0.0.1", timeout_s=60)
        r.set(keys.worker_alive(engine.worker_id), "1", ex=3600)
        r.hset(keys.policy, POLICY_JOIN_PREFIX + engine.worker_id, time.time())
        worker_s, learner_s, receive_s, load_s = [], [], [], []
        for version in range(1, repeats + 2):
            reports: list = []
            sender = threading.Thread(target=lambda v=version, out=reports: out.append(learner.broadcast(model, v)))
            t0 = time.perf_counter()
            sender.start()
            ann = None
            while ann is None or ann.version != version:
                ann = read_announcement(r, keys)
            stats = engine.update_weights(ann)
            elapsed = time.perf_counter() - t0
            sender.join()
            if version > 1:  # the first one includes the rendezvous (once per epoch)
                worker_s.append(elapsed)
                learner_s.append(reports[0].seconds)
                receive_s.append(stats.receive_s)
                load_s.append(stats.load_s)
        learner.close()
        nbytes = reports[0].bytes
    med = statistics.median
    return {"update_s": med(worker_s), "learner_broadcast_s": med(learner_s), "receive_s": med(receive_s),
            "reload_s": med(load_s), "bytes": float(nbytes)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/rlq-bench-tiny"))
    args = ap.parse_args()

    import torch

    from workers.engines import HFEngine, VllmEngine
    from workers.generate_config import GenerationConfig

    model_dir = build_model(args.cache)
    cfg = GenerationConfig.model_validate(
        {"max_new_tokens": args.max_new_tokens, "temperature": 1.0,
         "vllm_cfg": {"max_model_len": 256, "cpu_kvcache_space_gib": 1, "max_num_seqs": 256}}
    )  # fmt: skip
    batch = prompts(args.prompts)

    hf = HFEngine(cfg, "bench-hf", str(model_dir), device="cpu")
    tokens_per_s(hf, batch[:2], args.n)  # warm-up
    hf_tps, hf_tokens = tokens_per_s(hf, batch, args.n)
    print(f"transformers generate(): {hf_tps:,.0f} tokens/s ({hf_tokens} tokens)")

    vllm = VllmEngine(cfg, "bench-vllm", str(model_dir))
    tokens_per_s(vllm, batch, args.n)  # warm-up (compilation, first KV blocks)
    runs = sorted(tokens_per_s(vllm, batch, args.n) for _ in range(3))
    vllm_tps, vllm_tokens = runs[1]  # the median run
    print(f"vLLM CPU: {vllm_tps:,.0f} tokens/s ({vllm_tokens} tokens)")

    update = weight_update_seconds(vllm, hf.model, args.repeats)
    numel = int(update["bytes"]) // 4
    raw_s = raw_gloo_seconds(numel, args.repeats)
    print(f"weight update {update['update_s'] * 1e3:.1f} ms (receive {update['receive_s'] * 1e3:.1f} ms, reload "
          f"{update['reload_s'] * 1e3:.1f} ms; learner blocked {update['learner_broadcast_s'] * 1e3:.1f} ms) vs raw "
          f"gloo broadcast of the same {update['bytes'] / 1e6:.1f} MB: {raw_s * 1e3:.1f} ms")  # fmt: skip
    vllm.close()

    figures = {
        "vllm_tokens_per_s": vllm_tps,
        "hf_tokens_per_s": hf_tps,
        "speedup_vllm_over_hf": vllm_tps / hf_tps,
        "weight_update_s": update["update_s"],
        "weight_update_receive_s": update["receive_s"],
        "weight_update_reload_s": update["reload_s"],
        "learner_broadcast_s": update["learner_broadcast_s"],
        "raw_gloo_broadcast_s": raw_s,
        "weight_bytes": update["bytes"],
        "update_over_raw_gloo": update["update_s"] / raw_s,
        "learner_broadcast_over_raw_gloo": update["learner_broadcast_s"] / raw_s,
    }
    targets = {"speedup_vllm_over_hf": ">= 10", "update_over_raw_gloo": "<= 1.5"}
    met = figures["speedup_vllm_over_hf"] >= 10 and figures["update_over_raw_gloo"] <= 1.5
    result = {
        "bench": "generate",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "settings": vars(args) | {"cache": str(args.cache), "model_params": hf.model.num_parameters()},
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
