"""What one read becomes: the batches' prompts sampled in as few engine calls as possible, then rollout groups.

A read of several PromptBatches (capacity-aware pulls, workers/generate/pull.py) goes through one engine call per
distinct sample count (training and validation batches ask for different `n`), so a fast worker that takes four
small messages samples them as one large batch.
"""

from __future__ import annotations

from broker.schemas import Array, PromptBatch, RolloutGroup, Sample
from workers.generate.engines import Completion, Engine, request_seed


def generate_batches(engine: Engine, batches: list[PromptBatch], seed: int) -> list[list[list[Completion]]]:
    """Completions [batch][prompt][sample]: one engine call for all the batches that ask for the same n."""
    out: list[list[list[Completion]]] = [[] for _ in batches]
    for n in sorted({b.n_samples for b in batches}):
        keys = [(i, p) for i, b in enumerate(batches) if b.n_samples == n for p in b.prompts]
        seeds = [request_seed(seed, f"{p.prompt_id}@{batches[i].batch_id}") for i, p in keys]
        prompts = [p.token_ids.to_numpy().tolist() for _, p in keys]
        for (i, _), comps in zip(keys, engine.generate(prompts, n, seeds), strict=True):
            out[i].append(comps)
    return out


def build_groups(
    batch: PromptBatch, completions: list[list[Completion]], version: int, worker_id: str, temperature: float
) -> list[RolloutGroup]:
    groups = []
    for prompt, comps in zip(batch.prompts, completions, strict=True):
        samples = [
            Sample(
                token_ids=Array.from_numpy(c.token_ids, "int32"),
                logprobs=Array.from_numpy(c.logprobs, "float32"),
                finish_reason=c.finish_reason,
                text=c.text,
            )
            for c in comps
        ]
        groups.append(
            RolloutGroup(
                group_id=f"{prompt.prompt_id}@{batch.batch_id}", batch_id=batch.batch_id, prompt=prompt,
                samples=samples, policy_version=version, worker_id=worker_id, temperature=temperature,
                purpose=batch.purpose,
            )
        )  # fmt: skip
    return groups
