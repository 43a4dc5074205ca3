"""`rlq eval` standalone: sample a checkpoint on a prepared file with the workers' own engine, score with the judges'.

The pieces are the run's: the engine class a generation worker would build from `policy.generation`
(workers/generate/factory.py: vLLM or transformers), the prompt template the learner's feeder applies
(learner/data_source.py `prompt_from_row`), per-request seeds as the workers derive them, and the judge's rule and
hard deadline (`env.math.answer_rule`, workers/judge/verify.py in the pre-forked `VerifierChild`). Greedy is the
same engine with top_k=1 (the arg-max token; the configs refuse temperature 0). The figures are rlq/eval.py.

Rows read: prepared rows (broker/prepared.py), DAPO-schema rows (`prompt` a list of messages and
`reward_model.ground_truth`: DAPO-Math-17k and the AIME-2024 copy in the same schema; a bare problem gets the
tutorial template, as `rlq prepare-data --source dapo` does), and plain rows with `problem`/`question` (templated
the same way) or `prompt` (as written, as the feeder takes it) beside `answer`/`expected_answer`/`ground_truth`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from broker.errors import UserError
from broker.prepared import VALIDATION_FILE, Example, jsonl_lines
from broker.typed import StrictModel
from rlq.eval import ESTIMATOR, ProblemResult, summarize
from workers.generate.config import GenerationConfig
from workers.judge.config import JudgeConfig

log = logging.getLogger(__name__)

ANSWER_KEYS = ("ground_truth", "answer", "expected_answer")
PROBLEM_KEYS = ("problem", "question")


class EvalSettings(StrictModel):
    """One `rlq eval`: what to evaluate, on what, how many samples; engine and judge are the run config's."""

    model: str = Field(..., min_length=1, description="A checkpoint (step_<N>, its policy/, a checkpoint_dir: its "
                       "latest), a Hugging Face model directory or a hub id.")  # fmt: skip
    data: Path = Field(..., description="A prepared JSONL file, or a prepared directory (its validation.jsonl).")
    samples: int = Field(8, ge=0, le=4096, description="Samples per problem (n of pass@k, k of mean@k); 0: none.")
    ks: list[int] | None = Field(None, description="k of pass@k to report; null: 1, 2, 4, ... and n.")
    greedy: bool = Field(True, description="Also one greedy completion per problem (greedy accuracy).")
    max_new_tokens: int | None = Field(None, ge=1, description="Completion budget; null: policy.generation's.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first this many problems.")
    batch_prompts: int = Field(
        100, ge=1, le=100_000, description="Prompts per engine call (bench/learning.py's greedy pass uses 100)."
    )
    seed: int = Field(0, description="Base of the per-request sampling seeds (one per problem, by prompt id).")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="policy.generation.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="env.math.")


def run_sections(config: Path | None, overrides: list[str]) -> tuple[GenerationConfig, JudgeConfig]:
    """(policy.generation, env.math) of the run config `config` (None: the defaults), overrides applied."""
    from rlq.config import EnvConfig, load_run_config
    from rlq.overrides import apply_overrides

    if config is not None:
        cfg = load_run_config(config, overrides)
        return cfg.policy.generation, cfg.env.math
    tree = {"policy": {"generation": GenerationConfig().model_dump(mode="json")},
            "env": EnvConfig().model_dump(mode="json")}  # fmt: skip
    tree = apply_overrides(tree, overrides)
    return GenerationConfig.model_validate(tree["policy"]["generation"]), EnvConfig.model_validate(tree["env"]).math


def resolve_policy(name: str) -> str:
    """The model directory `name` stands for: a checkpoint directory's `policy/` (a checkpoint_dir: its latest
    step's), else `rlq.models.resolve_model` (a local model directory or a hub id)."""
    from broker.policy import CHECKPOINT_POLICY_DIR
    from rlq.models import resolve_model

    path = Path(name).expanduser()
    if (path / "latest").is_file():
        from broker.policy import latest_checkpoint

        path = latest_checkpoint(path) or path
    if (path / CHECKPOINT_POLICY_DIR / "config.json").is_file():
        return str(path / CHECKPOINT_POLICY_DIR)
    return resolve_model(name)


def data_file(path: Path) -> Path:
    return Path(path) / VALIDATION_FILE if Path(path).is_dir() else Path(path)


def load_examples(path: Path) -> list[Example]:
    """Every row of `path` as an Example (see the module docstring for the schemas read).

    Raises:
        UserError: a missing or unreadable file, or a row that is none of the schemas (naming its line).
    """
    import json

    examples = []
    for number, line in jsonl_lines(path):
        try:
            examples.append(example_from_row(json.loads(line), number))
        except (ValueError, KeyError, TypeError) as exc:  # JSON, pydantic and shape errors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}:{number}: not an evaluation row ({first})") from None
    if not examples:
        raise UserError(f"{path} has no rows")
    return examples


def example_from_row(row: dict[str, Any], number: int) -> Example:
    """One row as an Example; KeyError/ValueError when it is none of the schemas read."""
    from rlq.data import DAPO_TEMPLATE
    from rlq.data_dapo import SkipRow, dapo_example

    if isinstance(row.get("prompt"), list):  # the DAPO schema
        try:
            return dapo_example(row)
        except SkipRow as skip:
            raise ValueError(f"DAPO-schema row skipped: {skip.reason}") from None
    answer = next((row[k] for k in ANSWER_KEYS if row.get(k) is not None), None)
    if answer is None and isinstance(row.get("reward_model"), dict):
        answer = row["reward_model"].get("ground_truth")
    if answer is None:
        raise KeyError(f"no answer: none of {', '.join(ANSWER_KEYS)} or reward_model.ground_truth")
    truth = str(answer).strip()
    if "messages" in row:
        messages = row["messages"]
    elif any(isinstance(row.get(k), str) for k in PROBLEM_KEYS):
        problem = next(row[k] for k in PROBLEM_KEYS if isinstance(row.get(k), str))
        messages = [{"role": "user", "content": DAPO_TEMPLATE.format(problem=problem.strip())}]
    else:
        messages = [{"role": "user", "content": str(row["prompt"])}]
    return Example(
        prompt_id=str(row.get("prompt_id") or row.get("id") or f"row-{number:07d}"),
        messages=messages,
        ground_truth=truth,
        verifier=str(row.get("verifier") or "math"),
        data_source=str(row.get("data_source") or "eval"),
        reward_model={"ground_truth": truth, "style": "rule"},
        extra_info=row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {},
    )


def evaluate(settings: EvalSettings) -> dict[str, Any]:
    """Sample, judge and summarise; returns the report `rlq eval` prints and writes."""
    from workers.judge.isolation import VerifierChild

    started = time.monotonic()
    path = data_file(settings.data)
    examples = load_examples(path)[: settings.limit]
    model_path = resolve_policy(settings.model)
    if settings.judge.llm_judge.enabled:
        log.warning("rlq eval scores with the library judge only: env.math.llm_judge is ignored")
    child = VerifierChild(memory_mb=settings.judge.child_memory_mb, rule=settings.judge.answer_rule)
    child.start()  # fork before the engine starts its threads
    try:
        prompts, kept, skipped = tokenized(model_path, examples, settings)
        results = sample_and_judge(settings, model_path, prompts, kept, child)
    finally:
        child.close()
    return {
        "model": settings.model,
        "model_path": model_path,
        "data": str(path),
        "figures": summarize(results, settings.ks),
        "estimator": ESTIMATOR,
        "settings": settings_record(settings),
        "skipped_too_long": skipped,
        "seconds": time.monotonic() - started,
        "per_problem": [per_problem(r) for r in results],
    }


def tokenized(
    model_path: str, examples: list[Example], settings: EvalSettings
) -> tuple[list[list[int]], list[Example], int]:
    """(prompt token ids, their examples, prompts left out because the engine's context cannot hold them)."""
    from transformers import AutoTokenizer

    from learner.data_source import prompt_from_row

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    limit = settings.generation.vllm_cfg.max_model_len if settings.generation.backend == "vllm" else None
    prompts, kept = [], []
    for index, ex in enumerate(examples):
        ids = prompt_from_row(ex.model_dump(), index, tokenizer).token_ids.to_numpy().tolist()
        if limit is None or len(ids) < limit:
            prompts.append(ids)
            kept.append(ex)
    if len(kept) < len(examples):
        log.warning("%d prompts have >= %d tokens (vllm_cfg.max_model_len): left out", len(examples) - len(kept), limit)
    return prompts, kept, len(examples) - len(kept)


def sample_and_judge(
    settings: EvalSettings, model_path: str, prompts: list[list[int]], examples: list[Example], child
) -> list[ProblemResult]:
    from workers.generate.engines import request_seed
    from workers.generate.factory import make_engine

    sampling, greedy = engine_configs(settings)
    engine = make_engine(sampling, "rlq-eval", model_path)
    seeds = [request_seed(settings.seed, ex.prompt_id) for ex in examples]
    results = [ProblemResult(ex.prompt_id, ex.ground_truth) for ex in examples]
    try:
        if settings.samples:
            outs = _generate(engine, sampling, prompts, settings.samples, seeds, settings.batch_prompts)
            for result, ex, completions in zip(results, examples, outs, strict=True):
                result.sampled = _judge(child, settings.judge, ex.ground_truth, [c.text for c in completions])
                result.sampled_lengths = [len(c.token_ids) for c in completions]
                result.sampled_truncated = sum(c.finish_reason == "length" for c in completions)
        if settings.greedy:
            outs = _generate(engine, greedy, prompts, 1, seeds, settings.batch_prompts)
            for result, ex, (completion,) in zip(results, examples, outs, strict=True):
                (result.greedy,) = _judge(child, settings.judge, ex.ground_truth, [completion.text])
                result.greedy_text = completion.text
    finally:
        engine.close()
    return results


def engine_configs(settings: EvalSettings) -> tuple[GenerationConfig, GenerationConfig]:
    """(sampling, greedy) settings of the engine: the run's, with the eval's budget; greedy is top_k=1."""
    budget = settings.max_new_tokens or settings.generation.max_new_tokens
    sampling = settings.generation.model_copy(update={"max_new_tokens": budget})
    return sampling, sampling.model_copy(update={"temperature": 1.0, "top_p": 1.0, "top_k": 1})


def _generate(engine, cfg: GenerationConfig, prompts: list[list[int]], n: int, seeds: list[int], batch: int) -> list:
    engine.cfg = cfg  # both engines read their sampling settings at each call
    out: list = []
    for lo in range(0, len(prompts), batch):
        out += engine.generate(prompts[lo : lo + batch], n, seeds[lo : lo + batch])
    return out


def _judge(child, judge: JudgeConfig, ground_truth: str, texts: list[str]) -> list[str]:
    from workers.judge.verify import prediction

    answers = [prediction(text, judge.answer_rule) for text in texts]
    return list(child.verify_answers(ground_truth, answers, answer_timeout_s=judge.answer_timeout_s,
                                     group_timeout_s=judge.group_timeout_s))  # fmt: skip


def settings_record(settings: EvalSettings) -> dict[str, Any]:
    sampling, _ = engine_configs(settings)
    return {
        "samples": settings.samples, "greedy": settings.greedy, "greedy_sampling": "top_k=1 (arg-max)",
        "backend": sampling.backend, "temperature": sampling.temperature, "top_p": sampling.top_p,
        "top_k": sampling.top_k, "max_new_tokens": sampling.max_new_tokens, "seed": settings.seed,
        "answer_rule": settings.judge.answer_rule, "answer_timeout_s": settings.judge.answer_timeout_s,
        "limit": settings.limit, "batch_prompts": settings.batch_prompts,
    }  # fmt: skip


def per_problem(result: ProblemResult) -> dict[str, Any]:
    return {
        "prompt_id": result.prompt_id, "ground_truth": result.ground_truth, "correct": result.correct,
        "samples": len(result.sampled), "greedy": result.greedy, "greedy_text": result.greedy_text[:2000],
    }  # fmt: skip
