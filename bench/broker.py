"""Broker throughput: RolloutGroups through XADD -> XREADGROUP -> XACK against the same bytes through SET/GET.

One run starts its own redis-server, then times, interleaved and best of `--repeats`:
  * project: a real RolloutGroup (16 samples x 1024 tokens, int32 ids + float32 logprobs, ~128 KB) encoded,
    appended with StreamProducer.add_many (pipelined XADD), read back with StreamConsumer.read (batched
    XREADGROUP + decode + validation) and acknowledged with StreamConsumer.ack as the roles configure it (one
    script per batch: XACK, then trim what every group has acknowledged, keeping the newest ROLE_KEEP_ACKED);
  * raw: the same encoded bytes through pipelined SET then pipelined GET, no encode/decode at all;
  * stream bytes only: the same pre-encoded bytes through XADD/XREADGROUP and the same ack, without the codec;
  * naive: one message at a time (XADD, XREADGROUP COUNT 1, decode, XACK), both for reference.
Prints the figures and writes bench/results/broker.json.

Until 2026-11-27 the roles never trimmed (their consumers acknowledged only) and neither did this bench's project
path: every entry of a pass stayed in the server, as the raw path's keys still do. Trimming at each ack lets
the server reuse the freed entries' memory instead of faulting in fresh pages for each new 133 KB entry.

    python bench/broker.py [--groups 512] [--batch 32] [--repeats 15] [--redis-server PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as `python bench/broker.py`, this file's folder would come first on sys.path and shadow the `broker`
# package with this very module; the repository root goes there instead.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

import numpy as np  # noqa: E402

from broker.allocator import tune_allocator  # noqa: E402
from broker.connection import connect  # noqa: E402
from broker.schemas import Array, Prompt, RolloutGroup, Sample, decode, encode  # noqa: E402
from broker.server import RedisServer, find_redis_server  # noqa: E402
from broker.streams import StreamConsumer, StreamProducer  # noqa: E402
from broker.trim import ROLE_KEEP_ACKED, ack_and_trim  # noqa: E402

RESULT = Path(__file__).parent / "results" / "broker.json"
TARGET_GROUPS_S = 3000.0
TARGET_RATIO = 0.90


def make_group(i: int, n_samples: int = 16, length: int = 1024) -> RolloutGroup:
    rng = np.random.default_rng(i)
    samples = [
        Sample(
            token_ids=Array.from_numpy(rng.integers(0, 151_000, length), "int32"),
            logprobs=Array.from_numpy(-rng.random(length, dtype=np.float32), "float32"),
            finish_reason="stop",
        )
        for _ in range(n_samples)
    ]
    prompt = Prompt(prompt_id=f"p{i}", token_ids=Array.from_numpy(np.arange(128), "int32"), ground_truth="42")
    return RolloutGroup(
        group_id=f"p{i}@b0", batch_id="b0", prompt=prompt, samples=samples, policy_version=1, worker_id="bench"
    )


class Meter:
    """Wall time, this process's CPU time and the Redis server's CPU time of one timed pass."""

    def __init__(self, r) -> None:
        self.r = r

    def __enter__(self) -> Meter:
        self.server0, self.cpu0, self.wall0 = self._server_cpu(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.client_cpu = time.process_time() - self.cpu0
        self.server_cpu = self._server_cpu() - self.server0

    def _server_cpu(self) -> float:
        info = self.r.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run_project(r, groups: list[RolloutGroup], batch: int) -> Meter:
    """Push every group through the stream and back, batch by batch: add_many, read, ack."""
    stream = "bench:stream"
    r.delete(stream)
    producer = StreamProducer(r, stream)
    consumer = StreamConsumer(
        r,
        stream,
        "g",
        "c0",
        expected=RolloutGroup,
        dead_stream="bench:dead",
        claim_idle_ms=60_000,
        count=batch,
        trim_keep_acked=ROLE_KEEP_ACKED,
    )
    consumer.ensure_group()
    received = 0
    with Meter(r) as meter:
        for lo in range(0, len(groups), batch):
            producer.add_many(groups[lo : lo + batch])
            deliveries = consumer.read(count=batch, block_ms=0)
            received += len(deliveries)
            consumer.ack([d.entry_id for d in deliveries])
    assert received == len(groups), f"lost messages: {received} of {len(groups)}"
    assert r.xlen("bench:dead") == 0 and r.xpending(stream, "g")["pending"] == 0
    r.delete(stream)
    return meter


def run_raw(r, payloads: list[bytes], batch: int) -> Meter:
    """SET then GET the same bytes, pipelined batch by batch."""
    moved = 0
    with Meter(r) as meter:
        for lo in range(0, len(payloads), batch):
            chunk = payloads[lo : lo + batch]
            pipe = r.pipeline(transaction=False)
            for j, payload in enumerate(chunk):
                pipe.set(f"bench:raw:{lo + j}", payload)
            pipe.execute()
            pipe = r.pipeline(transaction=False)
            for j in range(len(chunk)):
                pipe.get(f"bench:raw:{lo + j}")
            moved += sum(len(v) for v in pipe.execute())
    assert moved == sum(len(p) for p in payloads)
    r.flushdb()
    return meter


def run_stream_bytes(r, payloads: list[bytes], batch: int) -> Meter:
    """The project's stream round trip on pre-encoded bytes, no decode: what the stream itself costs."""
    stream = "bench:bytes"
    r.delete(stream)
    r.xgroup_create(stream, "g", id="0", mkstream=True)
    producer = StreamProducer(r, stream)
    moved = 0
    with Meter(r) as meter:
        for lo in range(0, len(payloads), batch):
            producer.add_encoded(payloads[lo : lo + batch])
            ((_, entries),) = r.xreadgroup("g", "c0", {stream: ">"}, count=batch)
            moved += sum(len(fields[b"m"]) for _, fields in entries)
            ack_and_trim(r, stream, "g", [entry_id for entry_id, _ in entries], ROLE_KEEP_ACKED)
    assert moved == sum(len(p) for p in payloads)
    r.delete(stream)
    return meter


def run_naive(r, groups: list[RolloutGroup]) -> Meter:
    """The one-message-at-a-time loop: XADD, XREADGROUP COUNT 1, decode, XACK per group."""
    stream = "bench:naive"
    r.delete(stream)
    r.xgroup_create(stream, "g", id="0", mkstream=True)
    with Meter(r) as meter:
        for group in groups:
            r.xadd(stream, {b"m": encode(group)})
            ((_, ((entry_id, fields),)),) = r.xreadgroup("g", "c0", {stream: ">"}, count=1)
            decode(fields[b"m"], RolloutGroup)
            r.xack(stream, "g", entry_id)
    r.delete(stream)
    return meter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=512, help="groups per timed pass")
    parser.add_argument("--batch", type=int, default=32, help="groups per XADD pipeline / XREADGROUP / XACK")
    parser.add_argument("--repeats", type=int, default=15, help="timed passes per path; the best one counts")
    parser.add_argument("--redis-server", help="redis-server binary (default: the one RedisServer finds)")
    parser.add_argument("--no-tune", action="store_true", help="leave glibc's malloc thresholds at their defaults")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write the result file")
    args = parser.parse_args()
    if args.redis_server:  # RedisServer takes the first redis-server on PATH
        os.environ["PATH"] = f"{Path(args.redis_server).resolve().parent}{os.pathsep}{os.environ['PATH']}"
    tuned = False if args.no_tune else tune_allocator()  # this process only: both paths alike, not the server
    server_version = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True).stdout.strip()

    distinct = [make_group(i) for i in range(64)]
    groups = [distinct[i % len(distinct)] for i in range(args.groups)]
    payloads = [encode(g) for g in groups]
    group_bytes = len(payloads[0])

    with tempfile.TemporaryDirectory() as tmp, RedisServer(directory=Path(tmp)) as server:
        r = connect(server.url)
        run_project(r, groups[: args.batch * 4], args.batch)  # warm-up: connections, allocator, code paths
        run_raw(r, payloads[: args.batch * 4], args.batch)
        project_m, raw_m, bytes_m = [], [], []
        for _ in range(args.repeats):  # interleaved, so a noisy neighbour hurts every path alike
            project_m.append(run_project(r, groups, args.batch))
            raw_m.append(run_raw(r, payloads, args.batch))
            bytes_m.append(run_stream_bytes(r, payloads, args.batch))
        naive_n = min(args.groups, 500)
        naive_m = [run_naive(r, groups[:naive_n]) for _ in range(3)]
        # Server time per command, all passes together: where the stream path's extra server CPU goes.
        stats = r.info("commandstats")
        r.close()
    server_us = {
        f"server_us_per_{name}": stats[f"cmdstat_{name}"]["usec_per_call"] for name in ("set", "get", "xadd", "xack")
    }
    server_us["server_us_per_xreadgroup_entry"] = round(
        stats["cmdstat_xreadgroup"]["usec"] / (args.groups * args.repeats * 2 + naive_n * 3 + args.batch * 4), 2
    )

    n = args.groups
    project, raw = n / min(m.wall for m in project_m), n / min(m.wall for m in raw_m)
    # CPU time per group (client + server) barely depends on what else runs on the machine; wall time does.
    project_cpu = min(m.client_cpu + m.server_cpu for m in project_m) / n
    raw_cpu = min(m.client_cpu + m.server_cpu for m in raw_m) / n
    figures = {
        "redis_server": server_version,
        "group_bytes": group_bytes,
        "groups_per_pass": n,
        "batch": args.batch,
        "repeats": args.repeats,
        "project_groups_per_s": round(project, 1),
        "raw_set_get_groups_per_s": round(raw, 1),
        "ratio_to_raw": round(project / raw, 3),
        "project_MB_per_s": round(project * group_bytes / 1e6, 1),
        "naive_one_at_a_time_groups_per_s": round(naive_n / min(m.wall for m in naive_m), 1),
        "project_groups_per_s_median": round(n / float(np.median([m.wall for m in project_m])), 1),
        "raw_groups_per_s_median": round(n / float(np.median([m.wall for m in raw_m])), 1),
        "project_cpu_us_per_group": round(project_cpu * 1e6, 1),
        "project_client_cpu_us_per_group": round(min(m.client_cpu for m in project_m) / n * 1e6, 1),
        "project_server_cpu_us_per_group": round(min(m.server_cpu for m in project_m) / n * 1e6, 1),
        "raw_cpu_us_per_group": round(raw_cpu * 1e6, 1),
        "raw_client_cpu_us_per_group": round(min(m.client_cpu for m in raw_m) / n * 1e6, 1),
        "raw_server_cpu_us_per_group": round(min(m.server_cpu for m in raw_m) / n * 1e6, 1),
        "cpu_ratio_to_raw": round(raw_cpu / project_cpu, 3),
        "stream_bytes_only_groups_per_s": round(n / min(m.wall for m in bytes_m), 1),
        "stream_bytes_only_cpu_us_per_group": round(min(m.client_cpu + m.server_cpu for m in bytes_m) / n * 1e6, 1),
        **server_us,
        "client_malloc_tuned": tuned,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    targets = {"project_groups_per_s": f">= {TARGET_GROUPS_S:g}", "ratio_to_raw": f">= {TARGET_RATIO:g}"}
    met = project >= TARGET_GROUPS_S and project / raw >= TARGET_RATIO
    for name, value in figures.items():
        print(f"{name:36s} {value}")
    print(f"{'targets met':36s} {met}")
    if not args.no_write:
        result = {
            "bench": "broker",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''} "
            f"python {platform.python_version()}".strip(),
            "figures": figures,
            "targets": targets,
            "met": met,
        }
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
