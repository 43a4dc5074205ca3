"""Judge throughput: verifications/s through Celery (2 worker processes, isolated children) vs in-process.

One run, same inputs, same machine (2 cores), its own redis-server. Inputs: DAPO-style groups of 16
completions (prose, then "Answer: ..." or a `\\boxed{}`; correct, equivalent, wrong and missing answers; integer
ground truths as in DAPO-Math-17k, plus fractions, radicals and pi in one group of four; 512 token ids +
logprobs per sample so the messages have realistic size). Measured, interleaved, best of
`--repeats` (the machine is shared; the load average is recorded with the figures):
  * inprocess_1: one process, math-verify called directly (ground truth parsed once per group, as the judge
    does), no isolation, no queue;
  * inprocess_2: the same in 2 processes (a fork pool over the 2 cores): the fair baseline for 2 workers;
  * fork_per_answer (reference, one core): NeMo Gym's isolation, a fresh fork per answer;
  * celery: `rlq worker judge --concurrency 2` (a Celery worker), every answer in a pre-forked child with a
    hard deadline, groups queued with `submit_groups` while the consumer is paused, then released; the clock
    stops at the last ScoredGroup in the scored stream.
The machine is shared with other work, so wall-clock rates swing between repeats; the CPU seconds the judge
side spends (worker main + pool processes + verifier children + redis-server) against the CPU seconds of the
in-process baseline for the same groups is reported too (`cpu_efficiency_vs_inprocess`, median): on 2
dedicated cores it is the throughput ratio both would reach, and other tenants barely move it.
Latency: per group, end to end (submit -> ScoredGroup in the stream) with one group in flight, vs the
in-process time to verify one group. Writes bench/results/judge.json.

    python bench/judge.py [--groups 200] [--repeats 4]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from broker.connection import connect  # noqa: E402
from broker.judge_queue import submit_group, submit_groups  # noqa: E402
from broker.keys import Keys  # noqa: E402
from broker.schemas import Array, Prompt, RolloutGroup, Sample  # noqa: E402
from broker.server import RedisServer  # noqa: E402
from workers.judge.app import make_app  # noqa: E402
from workers.judge.config import JudgeConfig  # noqa: E402
from workers.judge.isolation import warm_up  # noqa: E402
from workers.judge.verify import check, extract_answer, parse_gold  # noqa: E402

RULE = "last_box"
"""Every side scores extracted answers with the last-box rule, so all do the same work; the default rule
(nemo_gym) hands math-verify whole completions, which the in-process baselines here do not model."""

RESULT = Path(__file__).parent / "results" / "judge.json"
TARGET_RATIO = 0.80
SAMPLES, TOKENS = 16, 512
PROSE = "We compute step by step. First simplify the expression, then substitute the values and check the result. "


def answers_for(truth: tuple[str, list[str], list[str]], rng: random.Random) -> list[str]:
    """16 completions: mostly the DAPO format, some boxed, some equivalent forms, wrong ones, no answer."""
    gold, equivalents, wrongs = truth
    texts = []
    for _ in range(SAMPLES):
        roll = rng.random()
        answer = rng.choice(equivalents) if roll < 0.45 else rng.choice(wrongs) if roll < 0.9 else None
        body = PROSE * rng.randint(2, 8)
        if answer is None:
            texts.append(body + "I am not sure.")
        elif rng.random() < 0.7:
            texts.append(f"{body}\nAnswer: {answer}")
        else:
            texts.append(f"{body} So the answer is $\\boxed{{{answer}}}$.")
    return texts


FORMS = [
    ("\\frac{3}{4}", ["3/4", "0.75", "\\frac{3}{4}", "\\dfrac{6}{8}"], ["4/3", "0.7", "\\frac{1}{4}"]),
    ("\\frac{\\sqrt{2}}{2}", ["\\frac{\\sqrt2}{2}", "\\sqrt{2}/2"], ["\\sqrt{2}", "2"]),
    ("2\\pi", ["2\\pi", "2 \\pi"], ["\\pi", "4\\pi"]),
]
"""Non-integer ground truths, one group in four; DAPO-Math-17k's own answers are all integers."""


def truth_for(i: int, rng: random.Random) -> tuple[str, list[str], list[str]]:
    if i % 4 == 3:
        return FORMS[(i // 4) % len(FORMS)]
    n = rng.choice([rng.randint(-20, 100), rng.randint(100, 99_999)])
    return str(n), [str(n), f"{n:,}", f"${n}$", f"x = {n}"], [str(n + 1), str(n - 3), str(2 * n + 1)]


def make_groups(n: int, seed: int = 0) -> list[RolloutGroup]:
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    groups = []
    for i in range(n):
        truth = truth_for(i, rng)
        samples = [
            Sample(Array.from_numpy(nrng.integers(0, 151_000, TOKENS), "int32"),
                   Array.from_numpy(-nrng.random(TOKENS, dtype=np.float32), "float32"), "stop", text)
            for text in answers_for(truth, rng)
        ]  # fmt: skip
        prompt = Prompt(f"p{i}", Array.from_numpy(np.arange(128), "int32"), truth[0], text="Solve it.")
        groups.append(RolloutGroup(group_id=f"p{i}@{uuid.uuid4().hex[:6]}", batch_id="b", prompt=prompt,
                                   samples=samples, policy_version=0, worker_id="bench"))  # fmt: skip
    return groups


# In-process baseline ------------------------------------------------------------------------------------------


def verify_group_inprocess(group: tuple[str, list[str]]) -> int:
    """The judge's work with no isolation: extract, parse the gold once, check each answer. Returns #correct."""
    ground_truth, texts = group
    gold = parse_gold(ground_truth)
    answers = [extract_answer(t) for t in texts]
    return sum(check(gold, a, RULE) == "correct" for a in answers if a is not None)


def plain(groups: list[RolloutGroup]) -> list[tuple[str, list[str]]]:
    return [(g.prompt.ground_truth, [s.text for s in g.samples]) for g in groups]


def bench_inprocess_1(groups: list[RolloutGroup]) -> tuple[float, float, list[float], int]:
    """Wall seconds, CPU seconds, per-group latencies, #correct."""
    warm_up()
    latencies, correct = [], 0
    start, cpu = time.perf_counter(), time.process_time()
    for item in plain(groups):
        t0 = time.perf_counter()
        correct += verify_group_inprocess(item)
        latencies.append(time.perf_counter() - t0)
    return time.perf_counter() - start, time.process_time() - cpu, latencies, correct


def bench_inprocess_2(groups: list[RolloutGroup]) -> tuple[float, int]:
    items = plain(groups)
    with multiprocessing.get_context("fork").Pool(2, initializer=warm_up) as pool:
        pool.map(verify_group_inprocess, items[:4], chunksize=1)  # both processes warm before the clock starts
        start = time.perf_counter()
        correct = sum(pool.map(verify_group_inprocess, items, chunksize=8))
        return time.perf_counter() - start, correct


def _verify_one_and_exit(ground_truth: str, answer: str, conn: object) -> None:
    conn.send_bytes(check(parse_gold(ground_truth), answer, RULE).encode())  # type: ignore[attr-defined]


def bench_fork_per_answer(groups: list[RolloutGroup]) -> float:
    """Reference: NeMo Gym's isolation, a fresh fork per answer (one process at a time). Returns answers/s."""
    warm_up()
    context = multiprocessing.get_context("fork")
    answers = [(gt, a) for gt, texts in plain(groups) for a in map(extract_answer, texts) if a is not None]
    start = time.perf_counter()
    for ground_truth, answer in answers:
        parent, child = context.Pipe(duplex=False)
        process = context.Process(target=_verify_one_and_exit, args=(ground_truth, answer, child))
        process.start()
        child.close()
        parent.recv_bytes()
        process.join()
        parent.close()
    return len(answers) / (time.perf_counter() - start)


# Through Celery -----------------------------------------------------------------------------------------------


class CeleryJudge:
    def __init__(self, url: str, log_path: Path, redis_pid: int) -> None:
        self.redis_pid = redis_pid
        self.run = f"bench{uuid.uuid4().hex[:6]}"
        self.keys = Keys(self.run)
        cfg = JudgeConfig(answer_rule="last_box")  # the rule the in-process baselines run (RULE)
        self.app = make_app(url, self.run, cfg)
        self.r = connect(url)
        # The judge as `rlq train` starts it: `rlq worker judge --config` on a run config holding env.math.
        config = log_path.parent / f"judge-{self.run}.yaml"
        config.write_text(
            json.dumps(
                {
                    "run_name": self.run,
                    "broker": {"url": url},
                    "policy": {"model_name": "unused"},
                    "data": {"path": "unused"},
                    "env": {"math": cfg.model_dump(mode="json")},
                }
            )
        )
        argv = [sys.executable, "-m", "rlq", "worker", "judge", "--config", str(config), "--concurrency", "2"]
        self.log = log_path.open("ab")
        self.proc = subprocess.Popen(argv, cwd=_ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.node = f"judge-{self.run}-{self.proc.pid}@{socket.gethostname()}"  # the name rlq worker judge takes
        while not self.app.control.ping(destination=[self.node], timeout=0.5):
            if self.proc.poll() is not None:
                raise SystemExit(f"celery worker exited; see {log_path}")

    def wait_scored(self, count: int) -> float:
        while self.r.xlen(self.keys.scored) < count:
            time.sleep(0.005 if count - self.r.xlen(self.keys.scored) <= 1 else 0.05)
        return time.perf_counter()

    def cpu_s(self) -> float:
        """CPU seconds used so far by the judge side: worker main, pool processes, verifier children, Redis."""
        main = psutil.Process(self.proc.pid)
        procs = [main, *main.children(recursive=True), psutil.Process(self.redis_pid)]
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    def throughput(self, groups: list[RolloutGroup]) -> tuple[float, float]:
        """Wall and CPU seconds to score `groups`, queued in full first (consumer paused), so the clock sees the
        judges only."""
        before = self.r.xlen(self.keys.scored)
        self.app.control.cancel_consumer(self.keys.judge_queue, destination=[self.node], reply=True)
        submit_groups(self.app, self.run, groups)
        start, cpu = time.perf_counter(), self.cpu_s()
        self.app.control.add_consumer(self.keys.judge_queue, destination=[self.node], reply=True)
        return self.wait_scored(before + len(groups)) - start, self.cpu_s() - cpu

    def latencies(self, groups: list[RolloutGroup]) -> list[float]:
        out = []
        for group in groups:
            before = self.r.xlen(self.keys.scored)
            t0 = time.perf_counter()
            submit_group(self.app, self.run, group)
            out.append(self.wait_scored(before + 1) - t0)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--latency-groups", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    verifs = args.groups * SAMPLES
    best: dict[str, float] = {}
    ratios: list[float] = []
    cpu_ratios: list[float] = []  # in-process CPU / judge-side CPU for the same inputs: robust to other tenants
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, RedisServer(directory=Path(tmp)) as server:
        assert server.process is not None
        judge = CeleryJudge(server.url, Path(tmp) / "worker.log", server.process.pid)
        try:
            judge.throughput(make_groups(8, seed=99))  # warm: both pool processes fork their verifier child
            for repeat in range(args.repeats):
                groups = make_groups(args.groups, seed=repeat)
                seconds, in_cpu, in_latency, correct = bench_inprocess_1(groups)
                seconds2, correct2 = bench_inprocess_2(groups)
                seconds3, celery_cpu = judge.throughput(groups)
                cpu_ratios.append(in_cpu / celery_cpu)
                assert correct == correct2, "both baselines score the same inputs the same way"
                rates = {"inprocess_1": verifs / seconds, "inprocess_2": verifs / seconds2, "celery": verifs / seconds3}
                best = {k: max(best.get(k, 0.0), v) for k, v in rates.items()}
                ratios.append(rates["celery"] / rates["inprocess_2"])
                print(f"repeat {repeat}: " + ", ".join(f"{k} {v:.0f}/s" for k, v in rates.items()), flush=True)
            e2e = judge.latencies(make_groups(args.latency_groups, seed=7))
            fork_rate = bench_fork_per_answer(make_groups(20, seed=11))
        finally:
            judge.stop()
    figures = {
        "celery_2workers_verifications_per_s": round(best["celery"], 1),
        "inprocess_2procs_verifications_per_s": round(best["inprocess_2"], 1),
        "inprocess_1proc_verifications_per_s": round(best["inprocess_1"], 1),
        "fork_per_answer_1proc_verifications_per_s": round(fork_rate, 1),
        "ratio_vs_inprocess_2procs": round(best["celery"] / best["inprocess_2"], 3),
        "ratio_vs_inprocess_1proc": round(best["celery"] / best["inprocess_1"], 3),
        "celery_group_latency_p50_ms": round(pct(e2e, 50), 2),
        "celery_group_latency_p99_ms": round(pct(e2e, 99), 2),
        "inprocess_group_latency_p50_ms": round(pct(in_latency, 50), 2),
        "inprocess_group_latency_p99_ms": round(pct(in_latency, 99), 2),
        "ratio_per_repeat": [round(x, 3) for x in ratios],
        "cpu_efficiency_vs_inprocess": round(float(np.median(cpu_ratios)), 3),
        "cpu_efficiency_per_repeat": [round(x, 3) for x in cpu_ratios],
        "load_avg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "shape": f"{args.groups} groups x {SAMPLES} samples ({TOKENS} tokens each), best of {args.repeats}",
    }
    met = min(figures["ratio_vs_inprocess_2procs"], figures["cpu_efficiency_vs_inprocess"]) >= TARGET_RATIO
    result = {
        "bench": "judge",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "figures": figures,
        "targets": {
            "ratio_vs_inprocess_2procs": f">= {TARGET_RATIO}",
            "cpu_efficiency_vs_inprocess": f">= {TARGET_RATIO}",
        },
        "met": met,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
