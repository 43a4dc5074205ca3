"""What one training step eats: the group filters (`admission`: duplicates, stale groups, DAPO dynamic
sampling), the samples of a group with their advantages, and the step's batch cut into rank shares. Pure: the
Redis side (the feeder and the collector on rank 0) is learner/rollout_io.py.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from broker.schemas import ScoredGroup
from learner.advantages import group_advantages, overlong_penalty
from learner.config import GRPOConfig

log = logging.getLogger(__name__)

DROP_REASONS = ("stale", "zero_variance", "duplicate")


@dataclass
class TrainSample:
    """One completion ready for the loss."""

    group_id: str
    input_ids: np.ndarray  # int64 [L]: prompt then completion, cut to policy.max_total_sequence_length
    prompt_len: int
    behaviour_logprobs: np.ndarray  # float32 [L - prompt_len]
    advantage: float
    trainable: bool = True  # False: overlong-filtered, in its group's baseline but out of the loss
    prox_logprobs: np.ndarray | None = None  # float32 [L - prompt_len], learner logprobs before the step
    temperature: float = 1.0  # the sampling temperature: the learner's logprobs are taken at it, as vLLM's are

    @property
    def completion_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


@dataclass
class Minibatch:
    """One rank's part of one optimizer update, with the update's global normalisers."""

    samples: list[TrainSample]
    num_tokens: float  # trainable completion tokens of the whole update, every rank
    num_sequences: float  # trainable sequences of the whole update, every rank


# --- pure pieces ---------------------------------------------------------------------------------------------


def admission(
    group_version: int, learner_version: int, rewards: np.ndarray, *, max_staleness: int, dynamic_sampling: bool
) -> str | None:
    """Why a group may not train at `learner_version`, or None when it may.

    A group from a version newer than the learner's (weights of a timeline a crash discarded) counts as fresh.
    """
    if learner_version - group_version > max_staleness:
        return "stale"
    if dynamic_sampling and len(rewards) > 1 and float(np.ptp(rewards)) == 0.0:
        return "zero_variance"
    return None


def shaped_rewards(group: ScoredGroup, cfg: GRPOConfig) -> np.ndarray:
    """The judge's rewards [N] plus the DAPO overlong penalty when enabled."""
    rewards = group.rewards.to_numpy().astype(np.float32)  # [N]
    shaping = cfg.reward_shaping
    if not shaping.enabled:
        return rewards
    lengths = torch.tensor([len(s.token_ids) for s in group.rollout.samples])  # [N]
    penalty = overlong_penalty(
        lengths,
        max_response_length=shaping.max_response_length,
        buffer_length=shaping.overlong_buffer_length,
        penalty=shaping.overlong_buffer_penalty,
    )
    return rewards + penalty.numpy()


def group_to_samples(group: ScoredGroup, cfg: GRPOConfig, max_total_len: int) -> list[TrainSample]:
    """Advantages for one group and its samples as `TrainSample`s (completions cut to the length budget)."""
    rewards = torch.from_numpy(shaped_rewards(group, cfg))  # [N]
    adv = group_advantages(rewards, leave_one_out=cfg.use_leave_one_out_baseline, normalize=cfg.normalize_rewards)
    prompt = group.rollout.prompt.token_ids.to_numpy().astype(np.int64)  # [P]
    if len(prompt) >= max_total_len:
        raise ValueError(f"prompt of {group.group_id} has {len(prompt)} tokens >= max_total_sequence_length")
    budget = max_total_len - len(prompt)
    out = []
    for sample, a in zip(group.rollout.samples, adv.tolist(), strict=True):
        completion = sample.token_ids.to_numpy().astype(np.int64)[:budget]  # [C]
        logprobs = sample.logprobs.to_numpy().astype(np.float32)[:budget]  # [C]
        truncated = sample.finish_reason == "length" or len(sample.token_ids) > budget
        out.append(
            TrainSample(
                group_id=group.group_id,
                input_ids=np.concatenate([prompt, completion]),
                prompt_len=len(prompt),
                behaviour_logprobs=logprobs,
                advantage=float(a),
                trainable=len(completion) > 0 and not (cfg.overlong_filtering and truncated),
                temperature=group.rollout.temperature,
            )
        )
    return out


def shard(samples: list[TrainSample], world_size: int) -> list[list[TrainSample]]:
    """Split samples over ranks balancing tokens (longest first onto the lightest rank); order-stable per rank."""
    loads = [0] * world_size
    parts: list[list[tuple[int, TrainSample]]] = [[] for _ in range(world_size)]
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))
    for i in order:
        rank = min(range(world_size), key=lambda r: (loads[r], len(parts[r])))
        loads[rank] += len(samples[i].input_ids)
        parts[rank].append((i, samples[i]))
    return [[s for _, s in sorted(part, key=lambda p: p[0])] for part in parts]


def assemble(
    samples: list[TrainSample], world_size: int, global_batch_size: int | None, *, skip_inert: bool = False
) -> list[list[Minibatch]]:
    """The step's samples as `[rank][update] -> Minibatch`, one optimizer update per `global_batch_size`.

    skip_inert: leave out samples whose gradient is zero (advantage exactly 0: every sample of a group whose
    rewards agree; or not trainable). Only exact when the loss has no advantage-free term (no KL penalty): the
    normalisers still count them, so the update is the same, without their forward and backward.
    """
    size = global_batch_size or len(samples)
    per_rank: list[list[Minibatch]] = [[] for _ in range(world_size)]
    for start in range(0, len(samples), size):
        chunk = samples[start : start + size]
        trainable = [s for s in chunk if s.trainable]
        tokens = float(sum(s.completion_len for s in trainable))
        kept = [s for s in trainable if s.advantage != 0.0] if skip_inert else chunk
        for rank, part in enumerate(shard(kept, world_size)):
            per_rank[rank].append(Minibatch(part, tokens, float(len(trainable))))
    return per_rank


def rollout_metrics(groups: list[ScoredGroup], learner_version: int) -> dict[str, float]:
    """rollout/* figures of the groups a step trains on."""
    rewards = np.concatenate([g.rewards.to_numpy() for g in groups]).astype(np.float64)
    lengths = np.array([len(s.token_ids) for g in groups for s in g.rollout.samples], dtype=np.float64)
    verdicts = Counter(v for g in groups for v in g.verdicts)
    staleness = Counter(max(0, learner_version - g.rollout.policy_version) for g in groups)
    out = {
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/reward_std": float(rewards.std()),
        "rollout/response_length_mean": float(lengths.mean()),
        "rollout/response_length_max": float(lengths.max()),
        "rollout/truncated_fraction": float(
            np.mean([s.finish_reason == "length" for g in groups for s in g.rollout.samples])
        ),
        "rollout/groups": float(len(groups)),
        "rollout/samples": float(len(rewards)),
        "rollout/staleness_mean": float(np.mean([max(0, learner_version - g.rollout.policy_version) for g in groups])),
    }
    out.update({f"rollout/verdict_{k}": float(v) for k, v in sorted(verdicts.items())})
    out.update({f"rollout/staleness_{k}": float(v) for k, v in sorted(staleness.items())})
    return out
