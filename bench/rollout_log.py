"""The rollout log's cost on the learner's step (learner/rollout_log.py), side by side in one run.

The learner's step on the tiny config's shape (16 prompts x 8 samples, prompts ~40 tokens, completions <= 48, the
tiny policy's dimensions and vocabulary, micro-batch 32): scored groups -> samples -> rank shares
(`group_to_samples`, `assemble`) -> `Trainer.train`, then `RolloutLog.trained` as the coordinator calls it.
Blocks of steps with and without the log alternate in one process; a block with the log ends by waiting for its
writer to finish (`drain`), so all of the writer's work is charged to the steps that logged. The process is pinned
to one CPU (as `rlq train` pins the tiny learner) so the writer thread competes for the learner's own core instead
of hiding on a free one.

Two figures. `overhead_fraction` (the target's): what the log takes from that core per step, the writer thread's
CPU time (`time.thread_time`, `RolloutLog.writer_cpu_s`) plus the enqueue on the training thread, over the step's
time without the log; on one core that is the time the step loses. `wall_overhead_fraction`: the median over block
pairs of (wall time with - without) / without, the same cost seen from outside, but on a machine shared with
other work its noise (+-20 % between blocks on the 2-core development machine) is far above 3 %.
Writes bench/results/rollout_log.json.

    python bench/rollout_log.py [--pairs 8] [--steps-per-block 10] [--cpu 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.gpu_common import write_result  # noqa: E402
from bench.synthetic import scored_groups  # noqa: E402
from broker.schemas import Array  # noqa: E402
from learner.batch import assemble, group_to_samples  # noqa: E402
from learner.config import GRPOConfig  # noqa: E402
from learner.loss import LossSettings  # noqa: E402
from learner.rollout_log import RolloutLog  # noqa: E402
from learner.runtime_config import RolloutLogConfig  # noqa: E402
from learner.step import Trainer  # noqa: E402
from rlq.tiny_policy import MODEL_DIMS, VOCAB_SIZE  # noqa: E402

TARGET = 0.03
"""The issue's bound: the log costs at most 3 % of step time."""
TEXT = "Let me work it out: 37 + 48 = 85, then 85 * 2 = 170. The answer is \\boxed{170}."
"""A completion's text of the tiny run's typical length, so text columns cost what they cost there."""


def make_trainer(micro: int) -> Trainer:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB_SIZE, **MODEL_DIMS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    return Trainer(model, optimizer, LossSettings(), world_size=1, micro_batch_size=micro, max_grad_norm=1.0,
                   device=torch.device("cpu"))  # fmt: skip


def make_steps(args, count: int = 8) -> list[list]:
    """`count` different steps of groups (distinct ids and tokens, so compression sees no repeats across steps)."""
    rng, steps = np.random.default_rng(1), []
    for k in range(count):
        groups = scored_groups(args.prompts, args.generations, args.prompt_len, args.completion_len, VOCAB_SIZE,
                               shortest=0.3, logprob_scale=3)  # fmt: skip
        for g in groups:
            g.rollout.group_id = f"{g.rollout.group_id}{k}"
            g.rollout.prompt.text = "What is 37 + 48, times 2? Put the answer in \\boxed{}."
            for s in g.rollout.samples:
                n = len(s.token_ids.to_numpy())
                s.token_ids = Array.from_numpy(rng.integers(0, VOCAB_SIZE, n), "int32")
                s.logprobs = Array.from_numpy(-rng.random(n) * 3, "float32")
                s.text = TEXT
        steps.append(groups)
    return steps


def block(trainer: Trainer, pool, cfg: GRPOConfig, steps: range, log: RolloutLog | None) -> tuple[float, float]:
    """Seconds for `steps` learner steps (and, with the log, its writer's backlog); seconds spent enqueueing."""
    enqueue_s = 0.0
    started = time.perf_counter()
    for step in steps:
        groups = pool[step % len(pool)]
        samples = [s for g in groups for s in group_to_samples(g, cfg, 160)]
        trainer.train(assemble(samples, 1, None, skip_inert=True)[0])
        if log is not None:
            t0 = time.perf_counter()
            log.trained(step, groups)
            enqueue_s += time.perf_counter() - t0
    if log is not None:
        log.drain()
    return time.perf_counter() - started, enqueue_s


def measure(args) -> dict:
    trainer, groups = make_trainer(args.micro), make_steps(args)
    cfg = GRPOConfig(num_prompts_per_step=args.prompts, num_generations_per_prompt=args.generations)
    with tempfile.TemporaryDirectory() as tmp:
        log = RolloutLog(RolloutLogConfig(flush_steps=args.steps_per_block), Path(tmp) / "rollouts", cfg)
        block(trainer, groups, cfg, range(1, 3), None)  # warm-up, not counted
        n, ratios, with_s, without_s, enqueue = args.steps_per_block, [], [], [], []
        for pair in range(args.pairs):
            first = range(1 + 2 * pair * n, 1 + (2 * pair + 1) * n)
            second = range(first.stop, first.stop + n)
            on_first = pair % 2 == 0  # alternate which half logs, against drifts within a pair
            a_s, a_q = block(trainer, groups, cfg, first, log if on_first else None)
            b_s, b_q = block(trainer, groups, cfg, second, None if on_first else log)
            logged, plain = (a_s, b_s) if on_first else (b_s, a_s)
            ratios.append((logged - plain) / plain)
            with_s.append(logged / n)
            without_s.append(plain / n)
            enqueue.append((a_q + b_q) / n)
            print(f"pair {pair}: with {logged / n:.3f} s/step, without {plain / n:.3f} s/step, "
                  f"{100 * ratios[-1]:+.2f} %")  # fmt: skip
        log.close()
        size = sum(p.stat().st_size for p in (Path(tmp) / "rollouts").glob("part-*"))
    logged_steps = args.pairs * n
    rows = logged_steps * args.prompts * args.generations
    step_s, writer_s = statistics.median(without_s), log.writer_cpu_s / logged_steps
    return {
        "overhead_fraction": round((writer_s + statistics.median(enqueue)) / step_s, 4),
        "writer_cpu_s_per_step": round(writer_s, 5),
        "enqueue_s_per_step": round(statistics.median(enqueue), 6),
        "step_s_without_log": round(step_s, 4),
        "step_s_with_log": round(statistics.median(with_s), 4),
        "wall_overhead_fraction": round(statistics.median(ratios), 4),
        "wall_overhead_fraction_min_max": [round(min(ratios), 4), round(max(ratios), 4)],
        "rows_written": log.rows_written,
        "rows_lost": log.rows_lost,
        "bytes_per_sample": round(size / max(rows, 1), 1),
        "steps": 2 * args.pairs * n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=40)
    parser.add_argument("--completion-len", type=int, default=48)
    parser.add_argument("--micro", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=8, help="Block pairs (one block with the log, one without).")
    parser.add_argument("--steps-per-block", type=int, default=10, help="Also the log's flush_steps.")
    parser.add_argument("--cpu", type=int, default=1, help="The CPU to pin to (-1: no pinning).")
    args = parser.parse_args()
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    torch.set_num_threads(1)
    figures: dict = {
        "shape": f"{args.prompts}x{args.generations} samples, prompt {args.prompt_len}, completion <= "
        f"{args.completion_len}, micro {args.micro}, tiny-policy dims, 1 thread pinned to cpu {args.cpu}, "
        f"{args.pairs} pairs of {args.steps_per_block}-step blocks, text kept",
        **measure(args),
    }
    for k, v in figures.items():
        print(f"{k:28s} {v}")
    met = figures["overhead_fraction"] <= TARGET and figures["rows_lost"] == 0
    path = write_result("rollout_log", figures, {"overhead_fraction": f"<= {TARGET}"}, met)
    print(f"target overhead <= {TARGET}: {'met' if met else 'NOT met'}; wrote {path}")


if __name__ == "__main__":
    main()
