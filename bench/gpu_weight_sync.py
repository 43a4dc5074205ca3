"""Weight sync of a Qwen3-4B-shaped bf16 model, learner process on GPU0 -> generation worker process on GPU1.

Project path: `learner.broadcast.CollectiveBroadcast` (announcement in Redis, NCCL weight group) -> the worker
polls the policy hash, `FastHFEngine.update_weights` (`workers.generate.weights.WeightReceiver`) receives; end to end =
from the learner calling `broadcast()` to the worker's model holding the new weights (same-host monotonic
clock). Two sender layouts: parameters in their own tensors (each bucket packed into a scratch buffer, then
sent) and parameters laid out as the buckets (`weightsync.flat`, sent as they are); the worker always receives
into its parameters. Raw baseline in the same processes: `torch.distributed.broadcast` of the same bytes as one
tensor and as the same buckets. Every version is checked (sentinel values, and a full checksum at the end).
Writes bench/results/gpu_weight_sync.json (and $OUT).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bench.gpu_common import out_dir, qwen3_config, random_model, write_result

log = logging.getLogger("bench.gpu_weight_sync")
TARGET_E2E_S = 0.05
TARGET_RAW_FRACTION = 0.90
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000}  # fmt: skip
RUN = "wsbench"
WORKER = "gpu-worker"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(args, index: int) -> torch.device:
    if args.backend == "nccl":
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _model(args, device: torch.device, seed: int) -> torch.nn.Module:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return random_model(qwen3_config(**(TINY if args.tiny else {})), dtype, device, seed=seed)


def _stamp(model: torch.nn.Module, version: int) -> None:
    """Sentinels the worker checks: the first and last parameters' first element = version."""
    params = list(model.parameters())
    with torch.no_grad():
        params[0].view(-1)[0] = float(version)
        params[-1].view(-1)[0] = float(version)


def _checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def raw_baseline(args, rank: int, device: torch.device, model: torch.nn.Module, r) -> dict:
    """Same bytes through torch.distributed.broadcast: one flat tensor, then the bucket sizes the project uses."""
    from learner.weight_transport import named_tensors, plan_buckets

    dist.init_process_group(
        args.backend, init_method=f"tcp://127.0.0.1:{args.raw_port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=120), device_id=device if device.type == "cuda" else None,
    )  # fmt: skip
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dtype = next(model.parameters()).dtype
    flat = torch.empty(nbytes // torch.empty(0, dtype=dtype).element_size(), dtype=dtype, device=device)
    buckets = plan_buckets(named_tensors(model), args.bucket_mb * 2**20)
    sizes = [b.numel for b in buckets]
    out: dict = {}
    for name, parts in (("raw_one_tensor", [flat]), ("raw_buckets", list(torch.split(flat, sizes)))):
        times = []
        for rep in range(args.repeats + 1):
            dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            works = [dist.broadcast(p, src=0, async_op=True) for p in parts]
            for w in works:
                w.wait()
            _sync(device)
            t1 = time.perf_counter()
            # e2e = sender start -> receiver done, on the host's monotonic clock
            r.hset(f"{RUN}:raw", f"{name}:{rep}:{rank}", json.dumps([t0, t1]))
            dist.barrier()
            if rank == 1 and rep:
                t_send = json.loads(r.hget(f"{RUN}:raw", f"{name}:{rep}:0"))[0]
                times.append(t1 - t_send)
        if rank == 1:
            out[name] = {"s": round(min(times), 5), "median_s": round(sorted(times)[len(times) // 2], 5),
                         "gb_per_s": round(nbytes / min(times) / 1e9, 1)}  # fmt: skip
    del flat
    dist.destroy_process_group()
    out["bytes"] = nbytes
    out["buckets"] = len(buckets)
    return out


def learner_main(args) -> None:
    import redis

    from broker.keys import POLICY_JOIN_PREFIX, Keys
    from learner.broadcast import CollectiveBroadcast
    from learner.weight_transport import named_tensors, plan_buckets
    from weightsync.flat import flatten_into_buckets

    device = _device(args, 0)
    r = redis.Redis.from_url(args.redis)
    model = _model(args, device, seed=1)
    raw = raw_baseline(args, 0, device, model, r)
    sender = CollectiveBroadcast(r, Keys(RUN), master_addr="127.0.0.1", bucket_bytes=args.bucket_mb * 2**20,
                                 timeout_s=120, backend=args.backend)  # fmt: skip
    r.rpush(f"{RUN}:events", json.dumps({"raw": raw}))
    join_deadline = time.monotonic() + 120
    while not r.hexists(Keys(RUN).policy, POLICY_JOIN_PREFIX + WORKER) and time.monotonic() < join_deadline:
        time.sleep(0.01)  # the first version goes to the worker, not to an empty group
    version = 0
    for layout in ("packed", "flat"):
        if layout == "flat":
            flatten_into_buckets(model, plan_buckets(named_tensors(model), args.bucket_mb * 2**20))
        for rep in range(args.repeats + 1):  # rep 0: rendezvous / receiver layout, not counted
            version += 1
            _stamp(model, version)
            _sync(device)
            t0 = time.perf_counter()
            report = sender.broadcast(model, version)
            t1 = time.perf_counter()
            event = {"version": version, "layout": layout, "rep": rep, "t_start": t0, "sender_s": t1 - t0,
                     "members": report.members, "attempts": report.attempts}  # fmt: skip
            r.rpush(f"{RUN}:events", json.dumps(event))
            # wait for the worker's verdict before the next version (it has the same deadline)
            r.blpop([f"{RUN}:ack"], timeout=120)
    r.rpush(f"{RUN}:events", json.dumps({"checksum_learner": _checksum(model), "final_version": version}))
    sender.close()


def worker_main(args) -> None:
    import redis

    from broker.keys import POLICY_JOIN_PREFIX, Keys
    from broker.policy import PolicyHash
    from workers.generate.config import GenerationConfig
    from workers.generate.engine_hf_fast import FastHFEngine

    device = _device(args, 1 if args.backend == "nccl" else 0)
    r = redis.Redis.from_url(args.redis)
    keys = Keys(RUN)
    model = _model(args, device, seed=2)
    raw = raw_baseline(args, 1, device, model, r)
    r.rpush(f"{RUN}:events", json.dumps({"raw_worker": raw}))
    engine = FastHFEngine(GenerationConfig(backend="hf", max_new_tokens=4), WORKER, model=model)
    r.set(keys.worker_alive(WORKER), "1", ex=600)
    r.hset(keys.policy, POLICY_JOIN_PREFIX + WORKER, repr(time.time()))
    seen = 0
    deadline = time.monotonic() + 600
    first, last = next(model.parameters()), list(model.parameters())[-1]
    while time.monotonic() < deadline:
        ann = PolicyHash(r, keys).announcement()
        if ann is None or ann.version <= seen or WORKER not in ann.members:
            time.sleep(0.0002)
            continue
        stats = engine.update_weights(ann)
        _sync(device)
        t_done = time.perf_counter()
        seen = ann.version
        ok = float(first.detach().view(-1)[0]) == ann.version == float(last.detach().view(-1)[0])
        r.rpush(f"{RUN}:events", json.dumps({
            "worker_version": ann.version, "t_done": t_done, "receive_s": stats.receive_s, "load_s": stats.load_s,
            "layout_s": stats.extra.get("layout_s", 0.0), "sentinels_ok": ok,
        }))  # fmt: skip
        r.rpush(f"{RUN}:ack", "1")
        if ann.version == args.versions:
            break
    r.rpush(f"{RUN}:events", json.dumps({"checksum_worker": _checksum(model)}))


def summarize(events: list[dict], args) -> dict:
    raw = next(e["raw_worker"] for e in events if "raw_worker" in e)
    raw_bytes = next(e["raw"] for e in events if "raw" in e)
    sends = {e["version"]: e for e in events if "layout" in e}
    done = {e["worker_version"]: e for e in events if "worker_version" in e}
    figures: dict = {
        "shape": f"Qwen3-4B shape{' (tiny)' if args.tiny else ''}, random weights, {args.backend}",
        "bytes": raw_bytes["bytes"],
        "bucket_mb": args.bucket_mb,
        "buckets": raw_bytes["buckets"],
        **{k: v for k, v in raw.items()},
    }
    for layout in ("packed", "flat"):
        rows = [(sends[v], done[v]) for v in sorted(sends) if sends[v]["layout"] == layout and sends[v]["rep"] > 0]
        e2e = sorted(d["t_done"] - s["t_start"] for s, d in rows)
        recv = sorted(d["receive_s"] for _, d in rows)
        figures[f"project_{layout}"] = {
            "e2e_s": round(e2e[0], 5),
            "e2e_median_s": round(e2e[len(e2e) // 2], 5),
            "receive_s": round(recv[0], 5),
            "load_s": round(min(d["load_s"] for _, d in rows), 5),
            "sender_s": round(min(s["sender_s"] for s, _ in rows), 5),
            "first_update_layout_s": round(done[min(v for v in sends if sends[v]["layout"] == layout)]["layout_s"], 3),
            "sentinels_ok": all(d["sentinels_ok"] for _, d in rows),
        }
    flat = figures["project_flat"]
    figures["e2e_s"] = flat["e2e_s"]
    figures["transfer_fraction_of_raw"] = round(raw["raw_buckets"]["s"] / flat["receive_s"], 3)
    figures["e2e_fraction_of_raw_one_tensor"] = round(raw["raw_one_tensor"]["s"] / flat["e2e_s"], 3)
    c_l = next(e["checksum_learner"] for e in events if "checksum_learner" in e)
    c_w = next(e["checksum_worker"] for e in events if "checksum_worker" in e)
    figures["checksum_equal"] = c_l == c_w
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["main", "learner", "worker"], default="main")
    parser.add_argument("--redis", default="")
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl" if torch.cuda.is_available() else "gloo")
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--raw-port", type=int, default=29613)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    args.versions = 2 * (args.repeats + 1)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.role} %(name)s %(message)s")
    if args.role == "learner":
        return learner_main(args)
    if args.role == "worker":
        return worker_main(args)

    import redis

    from broker.server import RedisServer

    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            base = [sys.executable, "-m", "bench.gpu_weight_sync", "--redis", server.url, "--backend", args.backend,
                    "--bucket-mb", str(args.bucket_mb), "--repeats", str(args.repeats), "--raw-port",
                    str(args.raw_port)] + (["--tiny"] if args.tiny else [])  # fmt: skip
            env = dict(os.environ)
            procs = [subprocess.Popen([*base, "--role", role], env=env) for role in ("learner", "worker")]
            codes = [p.wait(timeout=900) for p in procs]
            r = redis.Redis.from_url(server.url)
            raw_events: Any = r.lrange(f"{RUN}:events", 0, -1)
            events = [json.loads(e) for e in raw_events]
        finally:
            server.stop()
    if any(codes):
        raise SystemExit(f"learner/worker exited with {codes}")
    figures = summarize(events, args)
    for k, v in figures.items():
        print(f"{k:32s} {v}")
    targets = {"e2e_s": f"<= {TARGET_E2E_S}", "transfer_fraction_of_raw": f">= {TARGET_RAW_FRACTION}"}
    met = (
        figures["e2e_s"] <= TARGET_E2E_S
        and figures["transfer_fraction_of_raw"] >= TARGET_RAW_FRACTION
        and figures["checksum_equal"]
        and figures["project_flat"]["sentinels_ok"]
    )
    if not args.no_write:
        write_result("gpu_weight_sync", figures, targets, met, out_dir())
    print(f"gpu_weight_sync: e2e {figures['e2e_s']}s, transfer {figures['transfer_fraction_of_raw']} of raw: "
          f"{'met' if met else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    main()
