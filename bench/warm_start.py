"""The tiny policy's warm start: time and accuracy of a fresh `rlq build-policy`, and whether RL can climb from it.

Figures:
  * build: wall-clock seconds of a fresh build (tokenizer + model + supervised warm start + evaluation), greedy
    and temperature-1 accuracy on 400 held-out problems (from base_accuracy.json);
  * RL probe (the baseline is the warm-started policy itself, before RL): a plain in-process on-policy GRPO
    loop (transformers sampling, 16 prompts x 8 samples, group-mean baseline, AdamW lr 1e-4, one update per
    batch) on `rlq prepare-data --source arith` defaults for `--probe-seconds`; the sampled reward of the first
    5 and last 10 steps and the seconds until the 10-step mean first reaches 0.8. It shows that the task's
    difficulty leaves RL room to climb; the real pipeline's run is bench/learning.py.

    python bench/warm_start.py [--threads 1] [--probe-seconds 300]
Writes bench/results/warm_start.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

import torch  # noqa: E402

from rlq.data import ArithConfig, generate_arith  # noqa: E402
from rlq.tiny_policy import load_policy  # noqa: E402
from rlq.warm_start import ACCURACY_FILE, WarmStartConfig, build_policy, extracted_answer, prompt_ids  # noqa: E402

RESULT = _ROOT / "bench" / "results" / "warm_start.json"


def rl_probe(policy: Path, seconds: float, prompts: int = 16, group: int = 8) -> list[tuple[float, float]]:
    """[(elapsed s, mean sampled reward)] per on-policy GRPO step."""
    model, tok = load_policy(policy)
    train, _ = generate_arith(ArithConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    rng, start, history = random.Random(0), time.monotonic(), []
    torch.manual_seed(0)
    while time.monotonic() - start < seconds:
        batch = rng.sample(train, prompts)
        ids_list = [prompt_ids(tok, ex) for ex in batch for _ in range(group)]
        width = max(map(len, ids_list))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in ids_list])  # [P*G, W]
        mask = (ids != tok.pad_token_id).long()
        model.eval()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            )  # fmt: skip
        completion = out[:, width:]  # [P*G, C]
        texts = tok.batch_decode(completion, skip_special_tokens=True)
        reward = torch.tensor(
            [float(extracted_answer(t) == batch[i // group].ground_truth) for i, t in enumerate(texts)]
        )
        advantage = (reward.view(prompts, group) - reward.view(prompts, group).mean(1, keepdim=True)).view(-1)
        eos = completion == tok.eos_token_id
        keep = ((eos.cumsum(1) - eos.long()) == 0).float()  # [P*G, C] up to and including the first eos
        model.train()
        logits = model(input_ids=out, attention_mask=torch.cat([mask, keep.long()], 1)).logits[:, width - 1 : -1]
        logp = torch.log_softmax(logits, -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)  # [P*G, C]
        loss = -((logp * keep).sum(1) * advantage).sum() / keep.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append((time.monotonic() - start, reward.mean().item()))
    return history


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probe-seconds", type=float, default=300.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-warm-start-") as tmp:
        start = time.monotonic()
        policy = build_policy(Path(tmp) / "policy", WarmStartConfig(threads=args.threads))
        build_s = time.monotonic() - start
        acc = json.loads((policy / ACCURACY_FILE).read_text())
        torch.set_num_threads(args.threads)
        history = rl_probe(policy, args.probe_seconds) if args.probe_seconds > 0 else []
    means = [
        sum(r for _, r in history[max(0, i - 9) : i + 1]) / len(history[max(0, i - 9) : i + 1])
        for i in range(len(history))
    ]
    first5 = history[:5]
    reached = next((history[i][0] for i, m in enumerate(means) if i >= 9 and m >= 0.8), None)
    figures = {
        "build_seconds": round(build_s, 1), "train_seconds": acc["train_seconds"], "chosen_step": acc["chosen_step"],
        "greedy_accuracy": acc["greedy_accuracy"], "sampled_accuracy_t1": acc["sampled_accuracy_t1"],
        "n_problems": acc["n_problems"], "torch_threads": args.threads,
        "probe_steps": len(history), "probe_reward_first5": round(sum(r for _, r in first5) / max(len(first5), 1), 3),
        "probe_reward_last10": round(means[-1], 3) if means else None,
        "probe_seconds_to_0.8": round(reached, 1) if reached is not None else None,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }  # fmt: skip
    targets = {"build_seconds": "<= 300", "greedy_accuracy": "in [0.2, 0.5]", "sampled_accuracy_t1": "<= 0.5"}
    met = figures["build_seconds"] <= 300 and 0.2 <= acc["greedy_accuracy"] <= 0.5 and acc["sampled_accuracy_t1"] <= 0.5
    result = {
        "bench": "warm_start", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "figures": figures, "targets": targets, "met": met,
    }  # fmt: skip
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
