"""Typed configuration of the judge role (`env.math` in the run config; NeMo Gym's `math_with_judge` server).

The timing knobs nest: an answer gets `answer_timeout_s`, a group `group_timeout_s`, the Celery task a hard
`task_time_limit_s`, and the broker redelivers a task held by a dead worker after `visibility_timeout_s`.
Each must fit inside the next, so a task is never redelivered while it still runs and never killed by Celery
while its own deadlines would have ended it cleanly. No torch, vLLM or Celery import here.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from broker.typed import StrictModel
from workers.judge.verify import DEFAULT_RULE, AnswerRule

TIME_LIMIT_MARGIN_S = 5.0
"""Slack between the group deadline and Celery's hard kill: decode, publish and one child respawn fit in it."""


class LLMJudgeConfig(StrictModel):
    """Optional second opinion from an OpenAI-compatible chat endpoint, asked only when the library says
    "incorrect" (an equivalent answer math-verify cannot parse). Off by default, as in the tutorial."""

    enabled: bool = Field(False, description="Ask the LLM judge about answers the library scored incorrect.")
    base_url: str = Field("http://localhost:8000/v1", description="OpenAI-compatible API root (a vLLM server).")
    model: str = Field("", description="Model name sent in the request; required when enabled.")
    api_key_env: str = Field("RLQ_LLM_JUDGE_API_KEY", description="Environment variable holding the API key.")
    timeout_s: float = Field(30.0, gt=0, le=600, description="Per-request timeout; on expiry the verdict stays.")
    max_tokens: int = Field(512, ge=1, description="Completion budget of one judge request.")
    both_orders: bool = Field(
        True, description="Ask again with the answers swapped and require both to agree (positional bias)."
    )

    @model_validator(mode="after")
    def _check(self) -> LLMJudgeConfig:
        if self.enabled and not self.model:
            raise ValueError("llm_judge.model must be set when llm_judge.enabled is true")
        return self


class JudgeConfig(StrictModel):
    """The judge workers: math-verify in a pre-forked child with hard deadlines, behind a Celery queue."""

    answer_timeout_s: float = Field(
        10.0, gt=0, le=600, description="Hard deadline per answer; the child is SIGKILLed and the verdict is timeout."
    )
    group_timeout_s: float = Field(
        60.0, gt=0, description="Deadline per group; answers not started by then are scored timeout untried."
    )
    task_time_limit_s: float = Field(
        90.0, gt=0, description="Celery hard time limit per task (a backstop: the deadlines above end it first)."
    )
    visibility_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Broker visibility timeout: a task held by a killed worker process is redelivered after this "
        "(plus restore_interval_s). Must exceed task_time_limit_s, or a running task is handed out twice.",
    )
    restore_interval_s: float = Field(
        2.0, gt=0, le=60, description="How often each worker sweeps the broker for tasks of dead workers."
    )
    max_deliveries: int = Field(
        3, ge=1, le=100, description="Runs of one group (worker crashes included) before it is dead-lettered."
    )
    child_memory_mb: int = Field(
        4096, ge=0, description="Address-space limit of the verifier child (MiB); 0: no limit."
    )
    answer_rule: AnswerRule = Field(
        DEFAULT_RULE,
        description="Which part of a completion math-verify judges. 'nemo_gym' (the tutorial's reward, NeMo Gym's "
        "library judge): the whole completion, math-verify finds the answer (several boxes form one set, "
        "'Final answer:' anchors it). 'last_box': rlq's earlier rule, the last 'Answer:' line, else the last "
        "\\boxed{}.",
    )
    llm_judge: LLMJudgeConfig = Field(default_factory=LLMJudgeConfig)
    injected_delay_per_group_s: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Bench and test only: sleep this long after verifying each group, inside its timed part, so a "
        "judge scores at a known, steady rate below generation (bench/judge_backpressure.py). Leave 0 in real runs.",
    )

    @model_validator(mode="after")
    def _check(self) -> JudgeConfig:
        if self.group_timeout_s < self.answer_timeout_s:
            raise ValueError("group_timeout_s must be >= answer_timeout_s")
        if self.injected_delay_per_group_s >= self.group_timeout_s:
            raise ValueError("injected_delay_per_group_s must be below group_timeout_s")
        if self.task_time_limit_s < self.group_timeout_s + TIME_LIMIT_MARGIN_S:
            raise ValueError(f"task_time_limit_s must be >= group_timeout_s + {TIME_LIMIT_MARGIN_S:g}")
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError("visibility_timeout_s must exceed task_time_limit_s")
        return self

    @property
    def redelivery_bound_s(self) -> float:
        """Worst-case seconds before a task held by a SIGKILLed worker main process runs again elsewhere."""
        return self.visibility_timeout_s + self.restore_interval_s
