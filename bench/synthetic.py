"""Synthetic scored rollout groups for the learner benches (bench/learner.py, bench/gpu_learner.py)."""

from __future__ import annotations

import numpy as np

from broker.schemas import Array, Prompt, RolloutGroup, Sample, ScoredGroup


def scored_groups(
    prompts: int, generations: int, prompt_len: int, completion_len: int, vocab: int, *,
    shortest: float, logprob_scale: float,
) -> list[ScoredGroup]:  # fmt: skip
    """`prompts` groups of `generations` samples: random ids, completions uniform in
    [completion_len * shortest, completion_len], logprobs in (-logprob_scale, 0], rewards 0/1. Seeded: the same
    arguments give the same groups."""
    rng = np.random.default_rng(0)
    groups = []
    for p in range(prompts):
        prompt = Prompt(f"p{p}", Array.from_numpy(rng.integers(0, vocab, prompt_len), "int32"), "1")
        samples = []
        for _ in range(generations):
            n = int(rng.integers(int(completion_len * shortest), completion_len + 1))
            ids, logprobs = rng.integers(0, vocab, n), -rng.random(n) * logprob_scale
            samples.append(Sample(Array.from_numpy(ids, "int32"), Array.from_numpy(logprobs, "float32"), "stop"))
        rollout = RolloutGroup(group_id=f"p{p}@b", batch_id="b", prompt=prompt, samples=samples, policy_version=0,
                               worker_id="bench")  # fmt: skip
        rewards = Array.from_numpy(rng.integers(0, 2, generations), "float32")
        groups.append(ScoredGroup(rollout=rollout, rewards=rewards, verdicts=["correct"] * generations))
    return groups
