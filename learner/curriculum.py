"""Retiring solved prompts (`grpo.retire_solved_after`): the feeder stops sending a prompt whose latest groups
were answered right in every sample.

Why: with a group baseline (GRPO, RLOO) a group whose samples all get the same reward has zero advantage and
adds no gradient, yet it costs a full generation and judging. Late in a run most such groups are all right: on
the tiny arithmetic run about 80 % of the groups had no signal by step 800, while the vLLM call stayed the
step's floor. Leaving solved prompts out spends those samples on prompts the policy still gets wrong
(the same idea as DAPO's dynamic sampling, applied before generation instead of after it; Kimi k1.5 and
Polaris drop easy prompts the same way). Groups that are all wrong stay in the pool: a later policy may solve
them. Held-out evaluation is untouched: it never draws from the training pool.
"""

from __future__ import annotations

import logging

from broker.schemas import ScoredGroup

log = logging.getLogger(__name__)


def all_correct(group: ScoredGroup) -> bool:
    """Every sample judged correct (the verdict, not the reward: shaping and scales vary between judges)."""
    return all(v == "correct" for v in group.verdicts)


class SolvedPrompts:
    """Per prompt, how many of its latest training groups in a row were all correct; retired at `after`.

    `after` 0 switches retiring off (every prompt stays). At most `max_fraction` of the prompts are retired at
    once: past that, the one retired longest ago returns (a pool of only the hardest prompts gives a few rare
    right answers huge normalised advantages; on the tiny run that pulled the policy away, docs/data.md). With
    `max_fraction` 1 the pool may empty: then every prompt comes back (`reset`), so a run that solves its whole
    training set keeps training.
    """

    def __init__(self, after: int, num_examples: int, max_fraction: float = 1.0) -> None:
        self.after = after
        self.num_examples = num_examples
        self.cap = max(1, int(max_fraction * num_examples))  # retired at once
        self.streaks: dict[str, int] = {}  # prompt_id -> all-correct groups in a row (only nonzero kept)
        self.retired: dict[str, None] = {}  # in the order they were retired (an ordered set)
        self.resets = 0
        self.returned = 0  # retired prompts put back to stay under the cap

    def observe(self, group: ScoredGroup) -> None:
        if self.after <= 0 or group.rollout.purpose != "train":
            return
        prompt_id = group.rollout.prompt.prompt_id
        if not all_correct(group):
            self.streaks.pop(prompt_id, None)
            return
        streak = self.streaks.get(prompt_id, 0) + 1
        self.streaks[prompt_id] = streak
        if streak < self.after or prompt_id in self.retired:
            return
        self.retired[prompt_id] = None
        if len(self.retired) >= self.num_examples:
            self.reset()
        elif len(self.retired) > self.cap:
            oldest = next(iter(self.retired))
            del self.retired[oldest]
            self.streaks.pop(oldest, None)
            self.returned += 1

    def is_retired(self, prompt_id: str) -> bool:
        return prompt_id in self.retired

    def reset(self) -> None:
        """Every prompt back in the pool (the policy solved them all), streaks forgotten."""
        log.info("all %d training prompts were solved; putting them all back", len(self.retired))
        self.retired.clear()
        self.streaks.clear()
        self.resets += 1

    def metrics(self) -> dict[str, float]:
        return {
            "data/retired_prompts": float(len(self.retired)),
            "data/retire_resets": float(self.resets),
            "data/retired_returned": float(self.returned),
        }

    def state(self) -> dict:
        return {"streaks": dict(self.streaks), "retired": list(self.retired), "resets": self.resets,
                "returned": self.returned}  # fmt: skip

    def restore(self, state: dict | None) -> None:
        """From `state()`; None (a checkpoint from before retiring existed) leaves every prompt in."""
        if not state:
            return
        self.streaks = {str(k): int(v) for k, v in state.get("streaks", {}).items()}
        self.retired = dict.fromkeys(str(p) for p in state.get("retired", []))
        self.resets = int(state.get("resets", 0))
        self.returned = int(state.get("returned", 0))
