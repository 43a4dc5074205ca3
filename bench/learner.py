"""Learner throughput: training tokens/s and a step-time breakdown on a tiny Qwen3, against a naive baseline.

One run, interleaved, best of `--repeats`, on the same batches and the same initial weights:
  * project: `learner.step.Trainer` (LM head on completion positions only, global-normalised token-level
    DAPO loss, micro-batches) plus the rest of a step: scored groups -> samples -> rank shares
    (`group_to_samples`, `assemble`), a safetensors checkpoint (`save_checkpoint`) and a filesystem weight
    broadcast (`FilesystemBroadcast`);
  * baseline: the textbook loop (full-sequence logits, log_softmax over every position, masked mean per
    micro-batch), same optimizer, same micro-batch size.
Tokens are prompt + completion tokens of the step. Prints the figures and writes bench/results/learner.json.

The model has the tiny policy's dimensions (rlq/tiny_policy.py) with its vocabulary (640) and, to show where
the completion-only LM head matters, a 32k vocabulary as well.

    python bench/learner.py [--prompts 8] [--generations 8] [--prompt-len 64] [--completion-len 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.synthetic import scored_groups  # noqa: E402
from broker.schemas import ScoredGroup  # noqa: E402
from learner.batch import assemble, group_to_samples  # noqa: E402
from learner.checkpoint import save_checkpoint  # noqa: E402
from learner.config import GRPOConfig  # noqa: E402
from learner.loss import LossSettings  # noqa: E402
from learner.step import Trainer  # noqa: E402
from rlq.tiny_policy import MODEL_DIMS, VOCAB_SIZE  # noqa: E402

RESULT = Path(__file__).parent / "results" / "learner.json"
TARGETS = {"speedup": 0.95, "speedup_vocab32000": 1.2}
"""At the tiny policy's 640-token vocabulary the LM head is cheap, so the project must merely not be slower;
at a 32k vocabulary (any real tokenizer) the completion-only head must pay off."""


def make_model(vocab: int) -> torch.nn.Module:
    """A Qwen3 of the tiny policy's dimensions (rlq.tiny_policy.MODEL_DIMS) with `vocab` entries."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, **MODEL_DIMS))


def make_groups(args, vocab: int) -> list[ScoredGroup]:
    return scored_groups(args.prompts, args.generations, args.prompt_len, args.completion_len, vocab,
                         shortest=0.5, logprob_scale=5)  # fmt: skip


def project_step(trainer: Trainer, groups, cfg: GRPOConfig, max_len: int, tmp: Path, step: int, broadcast):
    t0 = time.perf_counter()
    samples = [s for g in groups for s in group_to_samples(g, cfg, max_len)]
    shares = assemble(samples, 1, None)[0]
    t1 = time.perf_counter()
    _, timings = trainer.train(shares)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    t2 = time.perf_counter()
    broadcast.broadcast(trainer.model, step)
    t3 = time.perf_counter()
    state = trainer.optimizer_state()
    save_checkpoint(tmp / "ckpt", step, trainer.model, None, state, {"version": step}, b"", keep_last=1)
    t4 = time.perf_counter()
    tokens = sum(len(s.input_ids) for s in samples)
    return tokens, {
        "assemble_s": t1 - t0,
        "fwd_bwd_s": timings["fwd_bwd_s"],
        "optimizer_s": timings["optimizer_s"],
        "weight_sync_fs_s": t3 - t2,
        "checkpoint_s": t4 - t3,
        "step_s": t4 - t0,
        "train_s": t2 - t1,
    }


def baseline_step(model, optimizer, groups, micro: int, device: torch.device) -> tuple[int, float]:
    """Full logits over every position, per-micro-batch masked mean, one optimizer step."""
    rows = []
    for g in groups:
        rewards = g.rewards.to_numpy()
        adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
        prompt = g.rollout.prompt.token_ids.to_numpy()
        for s, a in zip(g.rollout.samples, adv, strict=True):
            rows.append((np.concatenate([prompt, s.token_ids.to_numpy()]), len(prompt), float(a)))
    t0 = time.perf_counter()
    n_micro = (len(rows) + micro - 1) // micro
    for start in range(0, len(rows), micro):
        chunk = rows[start : start + micro]
        width = max(len(r[0]) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attn = torch.zeros_like(ids)
        mask = torch.zeros(len(chunk), width - 1)
        for i, (seq, plen, _) in enumerate(chunk):
            ids[i, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
            attn[i, : len(seq)] = 1
            mask[i, plen - 1 : len(seq) - 1] = 1
        ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
        adv = torch.tensor([r[2] for r in chunk], device=device)[:, None]
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        ratio = (logp - logp.detach()).exp()
        loss = (-(adv * ratio) * mask).sum() / mask.sum() / n_micro
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sum(len(r[0]) for r in rows), time.perf_counter() - t0


class _NoRedis:
    """The announcement is one Redis transaction (HSET); this benchmark times the weight file write only."""

    def hset(self, *a, **k):
        return 1

    def pipeline(self, *a, **k):
        return self

    def execute(self):
        return []

    def hget(self, *a, **k):
        return None


def measure(args, vocab: int) -> dict:
    """Interleaved rounds of project and baseline on one model shape; the best round of each."""
    from broker.keys import Keys
    from learner.weight_transport import FilesystemBroadcast

    groups = make_groups(args, vocab)
    cfg = GRPOConfig(num_prompts_per_step=args.prompts, num_generations_per_prompt=args.generations)
    max_len = args.prompt_len + args.completion_len + 1
    device = torch.device(args.device)
    model_p, model_b = make_model(vocab).to(device), make_model(vocab).to(device)
    model_b.load_state_dict(model_p.state_dict())
    opt_p = torch.optim.AdamW(model_p.parameters(), lr=1e-5, foreach=True)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-5, foreach=True)
    trainer = Trainer(model_p, opt_p, LossSettings(), world_size=1, micro_batch_size=args.micro, max_grad_norm=1.0,
                      device=device)  # fmt: skip
    project, baseline = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        broadcast = FilesystemBroadcast(_NoRedis(), Keys("bench"), tmp / "weights")  # type: ignore[arg-type]
        for step in range(args.repeats + 1):  # the first round warms up both and is not counted
            tokens, parts = project_step(trainer, groups, cfg, max_len, tmp, step, broadcast)
            b_tokens, b_s = baseline_step(model_b, opt_b, groups, args.micro, device)
            if step:
                project.append((tokens / parts["train_s"], parts))
                baseline.append(b_tokens / b_s)
            print(f"vocab {vocab} round {step}: project {tokens / parts['train_s']:.0f} tok/s, "
                  f"baseline {b_tokens / b_s:.0f} tok/s")  # fmt: skip
    best_tps, best_parts = max(project, key=lambda p: p[0])
    return {
        "project_train_tokens_per_s": round(best_tps, 1),
        "baseline_train_tokens_per_s": round(max(baseline), 1),
        "speedup": round(best_tps / max(baseline), 3),
        "project_step_tokens_per_s": round(tokens / best_parts["step_s"], 1),
        **{f"step_{k}": round(v, 4) for k, v in best_parts.items()},
        "tokens_per_step": tokens,
        "model_params": sum(p.numel() for p in model_p.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=128)
    vocab_help = "Vocabulary sizes: the first is the tiny policy's, the others' figures get a suffix."
    parser.add_argument("--vocab", type=int, nargs="+", default=[VOCAB_SIZE, 32_000], help=vocab_help)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU run.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures: dict = {
        "shape": f"{args.prompts}x{args.generations} samples, prompt {args.prompt_len}, completion <= "
        f"{args.completion_len}, micro {args.micro}, tiny-policy dims, vocab {args.vocab}, {args.device}, "
        f"{args.threads} threads",
    }
    for index, vocab in enumerate(args.vocab):
        suffix = "" if index == 0 else f"_vocab{vocab}"
        figures.update({f"{k}{suffix}": v for k, v in measure(args, vocab).items()})
    for k, v in figures.items():
        print(f"{k:42s} {v}")
    targets = {k: f">= {v}" for k, v in TARGETS.items() if k in figures}
    met = all(figures[k] >= v for k, v in TARGETS.items() if k in figures)
    result = {
        "bench": "learner",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "figures": figures,
        "targets": targets,
        "met": met,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"targets {targets}: {'met' if met else 'NOT met'}; wrote {RESULT}")


if __name__ == "__main__":
    main()
