"""The learning rate of each update: linear warmup, then constant, linear or cosine decay to a floor.

A pure function of the learner version (the number of steps already trained), not a stateful torch scheduler:
a resumed run gets the same rate from its checkpoint's version with nothing more to save, and every rank
computes the same value. All updates of one step (`policy.train_global_batch_size` below the step) share it.
"""

from __future__ import annotations

import math

from learner.config import LRScheduleConfig


def lr_factor(version: int, total_steps: int, cfg: LRScheduleConfig) -> float:
    """Multiplier of the base lr for the step that trains version `version` -> `version + 1`.

    Warmup ramps (version + 1) / warmup_steps up to 1; after it, "linear" and "cosine" fall from 1 at the end of
    warmup to `final_ratio` at `total_steps` (and stay there); "constant" stays at 1.
    """
    if cfg.warmup_steps and version < cfg.warmup_steps:
        return (version + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(version - cfg.warmup_steps, 0) / span, 1.0)  # 0 -> 1 over the decay
    shape = 1.0 - progress if cfg.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.final_ratio + (1.0 - cfg.final_ratio) * shape
