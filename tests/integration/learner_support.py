"""Helpers of the learner integration tests: a tiny policy, a prompt file, a config, and a stand-in for the
generation workers + judges.

The learner-only tests do not start vLLM or Celery: `StandInRollouts` reads the real prompts stream through a
real consumer group, samples completions from the tiny model with transformers `generate()` (behaviour
logprobs included) and scores them with a simple function, then writes real `ScoredGroup`s to the scored stream
with `publish_once`, exactly as the judges do. It always samples with the *initial* weights and labels each
group with the batch's `min_policy_version` (it does not receive weight broadcasts): enough to exercise the
learner's staleness, ledger and resume logic, not a test of learning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import torch
import yaml

from broker.connection import connect
from broker.keys import Keys
from broker.schemas import Array, PromptBatch, RolloutGroup, Sample, ScoredGroup
from broker.streams import StreamConsumer, publish_once

REPO = Path(__file__).resolve().parents[2]


def random_train_samples(n: int = 8, seed: int = 0) -> list:
    """`n` TrainSamples of random ids (vocab 3..39), groups of 4, one of them (index 5) not trainable."""
    from learner.batch import TrainSample

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt_len, completion_len = int(rng.integers(2, 6)), int(rng.integers(1, 9))
        ids = rng.integers(3, 40, size=prompt_len + completion_len)
        behaviour = np.full(completion_len, -3.5, np.float32)
        out.append(TrainSample(f"g{i // 4}", ids, prompt_len, behaviour, float(rng.normal()), trainable=i != 5))
    return out


def write_prompts(path: Path, n: int = 40) -> Path:
    """`n` arithmetic problems as prepared JSONL rows (the `rlq.data.Example` contract the feeder reads)."""
    from rlq.data import ArithConfig, generate_arith

    train, _ = generate_arith(ArithConfig(n_train=n, n_val=0, seed=0))
    path.write_text("".join(example.model_dump_json() + "\n" for example in train))
    return path


def write_config(path: Path, *, model: Path, data: Path, run: str, redis_url: str, run_dir: Path, **grpo) -> Path:
    cfg = {
        "grpo": {"num_prompts_per_step": 4, "num_generations_per_prompt": 4, "max_num_steps": 3,
                 "prompts_per_message": 2, **grpo},
        "loss_fn": {"ratio_clip_max": 0.28},
        "policy": {"model_name": str(model), "max_total_sequence_length": 64, "train_micro_batch_size": 4,
                   "optimizer": {"kwargs": {"lr": 1e-3}}},
        "checkpointing": {"checkpoint_dir": str(run_dir / "ckpt"), "save_period": 2},
        "data": {"path": str(data)},
        "learner": {"run": run, "broker_url": redis_url, "run_dir": str(run_dir),
                    "weight_sync": {"transport": {"kind": "none"}}, "check_replicas_every": 1, "read_block_ms": 200,
                    "data_timeout_s": 120},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_learner(config: Path, nproc: int, log_path: Path, *overrides: str) -> subprocess.Popen:
    """`torchrun --nproc-per-node N -m rlq learner --config C` in its own session (so it can be killed whole)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "rlq", "learner", "--config", str(config), *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as sink:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def reward_of(token_ids: list[int]) -> float:
    """Fraction of completion tokens with an even id: cheap, learnable, and varied whatever the model emits, so
    every group has samples with a gradient (an untrained model's text rarely shares a character with the answer,
    and all-zero rewards give the learner nothing to train on)."""
    return sum(t % 2 == 0 for t in token_ids) / max(len(token_ids), 1)


class StandInRollouts(threading.Thread):
    """Generation workers + judges in one thread (see the module docstring)."""

    def __init__(self, model_dir: Path, redis_url: str, run: str, *, max_new_tokens: int = 8) -> None:
        super().__init__(daemon=True)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.redis = connect(redis_url)
        self.keys = Keys(run)
        self.max_new_tokens = max_new_tokens
        self.eos, self.pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        self.stop = threading.Event()
        self.published: list[str] = []
        self.error: BaseException | None = None
        self.budget: int | None = None  # groups it may still produce; None: unlimited
        self._budget_changed = threading.Condition()

    def allow(self, groups: int | None) -> None:
        """Let it produce `groups` more groups (None: any number)."""
        with self._budget_changed:
            self.budget = None if groups is None else (self.budget or 0) + groups
            self._budget_changed.notify_all()

    def _take(self, n: int) -> bool:
        with self._budget_changed:
            while self.budget is not None and self.budget < n and not self.stop.is_set():
                self._budget_changed.wait(0.1)
            if self.stop.is_set():
                return False
            if self.budget is not None:
                self.budget -= n
            return True

    def run(self) -> None:
        try:
            consumer = StreamConsumer(self.redis, self.keys.prompts, "generate", "standin", expected=PromptBatch,
                                      dead_stream=self.keys.dead, block_ms=200)  # fmt: skip
            consumer.ensure_group()
            while not self.stop.is_set():
                for delivery in consumer.read(count=1):
                    if not self._take(len(delivery.message.prompts)):
                        return
                    for group in self.rollouts(delivery.message):
                        if publish_once(self.redis, self.keys.scored, group.group_id, group):
                            self.published.append(group.group_id)
                    consumer.ack([delivery.entry_id])
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    @torch.no_grad()
    def rollouts(self, batch: PromptBatch) -> list[ScoredGroup]:
        out = []
        torch.set_num_threads(1)
        for prompt in batch.prompts:
            ids = torch.from_numpy(prompt.token_ids.to_numpy().astype(np.int64))[None].repeat(batch.n_samples, 1)
            gen = self.model.generate(
                ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=self.max_new_tokens,
                output_scores=True, return_dict_in_generate=True, pad_token_id=self.pad, eos_token_id=self.eos,
            )  # fmt: skip
            completion = gen.sequences[:, ids.shape[1] :]
            logprobs = torch.stack(gen.scores, 1).log_softmax(-1).gather(-1, completion[..., None])[..., 0]
            samples, rewards = [], []
            for row, lp in zip(completion.tolist(), logprobs.tolist(), strict=True):
                n = row.index(self.eos) + 1 if self.eos in row else len(row)
                text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
                samples.append(
                    Sample(
                        token_ids=Array.from_numpy(row[:n], "int32"),
                        logprobs=Array.from_numpy(lp[:n], "float32"),
                        finish_reason="stop" if 1 in row else "length",
                        text=text,
                    )  # fmt: skip
                )
                rewards.append(reward_of(row[:n]))
            rollout = RolloutGroup(
                group_id=f"{prompt.prompt_id}@{batch.batch_id}", batch_id=batch.batch_id, prompt=prompt,
                samples=samples, policy_version=batch.min_policy_version, worker_id="standin", purpose=batch.purpose,
            )  # fmt: skip
            verdicts = ["correct" if r == 1.0 else "incorrect" for r in rewards]
            out.append(ScoredGroup(rollout=rollout, rewards=Array.from_numpy(rewards, "float32"), verdicts=verdicts))
        return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
