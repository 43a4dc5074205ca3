"""learner/validation.py: which versions are validated, what a pass publishes, how its groups become metrics."""

from __future__ import annotations

import numpy as np
import pytest

from broker.errors import UserError
from broker.schemas import Array, Prompt, PromptBatch, RolloutGroup, Sample, ScoredGroup, decode, encode
from learner.config import GRPOConfig
from learner.validation import Validator, pass_metrics, validation_batch_id, version_of_batch


def prompts(n: int) -> list[Prompt]:
    return [Prompt(prompt_id=f"v{i}", token_ids=Array.from_numpy([1, 2, i], "int32"), ground_truth=str(i))
            for i in range(n)]  # fmt: skip


def scored(batch: PromptBatch, prompt: Prompt, rewards: list[float], version: int) -> ScoredGroup:
    samples = [Sample(token_ids=Array.from_numpy([5] * (k + 1), "int32"),
                      logprobs=Array.from_numpy([-0.5] * (k + 1), "float32"), finish_reason="stop")
               for k in range(len(rewards))]  # fmt: skip
    rollout = RolloutGroup(group_id=f"{prompt.prompt_id}@{batch.batch_id}", batch_id=batch.batch_id, prompt=prompt,
                           samples=samples, policy_version=version, worker_id="w", purpose=batch.purpose)  # fmt: skip
    verdicts = ["correct" if r == 1.0 else "incorrect" for r in rewards]
    return ScoredGroup(rollout=rollout, rewards=Array.from_numpy(rewards, "float32"), verdicts=verdicts)


class Published:
    def __init__(self) -> None:
        self.batches: dict[str, PromptBatch] = {}

    def __call__(self, key: str, message: PromptBatch) -> bool:
        if key in self.batches:
            return False
        self.batches[key] = decode(encode(message), PromptBatch)  # as a worker would read it
        return True


@pytest.mark.parametrize(
    ("at_start", "period", "due"),
    [(False, 0, []), (True, 0, [0]), (False, 2, [2, 4, 5]), (True, 3, [0, 3, 5])],
)
def test_due_versions(at_start, period, due):
    cfg = GRPOConfig(val_at_start=at_start, val_period=period, max_num_steps=5)
    validator = Validator(Published(), prompts(1), cfg, run="r")
    assert [v for v in range(6) if validator.due(v, last=v == 5)] == due


def test_a_pass_publishes_val_batches_and_logs_when_every_group_is_in():
    cfg = GRPOConfig(val_period=2, prompts_per_message=2, num_val_generations_per_prompt=2)
    published = Published()
    validator = Validator(published, prompts(3), cfg, run="r")
    validator.start(4)
    validator.start(4)  # idempotent
    assert sorted(published.batches) == [validation_batch_id("r", 4, 0), validation_batch_id("r", 4, 1)]
    batches = list(published.batches.values())
    assert all(b.purpose == "val" and b.min_policy_version == 4 and b.n_samples == 2 for b in batches)
    assert [len(b.prompts) for b in batches] == [2, 1]

    groups = [scored(b, p, [1.0, 0.0] if p.prompt_id == "v0" else [1.0, 1.0], version=5)
              for b in batches for p in b.prompts]  # fmt: skip
    for group in groups[:2]:
        validator.accept(group)
    validator.accept(groups[0])  # a redelivery counts once
    assert validator.finished() == [] and validator.outstanding == [4]
    validator.accept(groups[2])
    ((version, metrics),) = validator.finished()
    assert version == 4 and validator.outstanding == []
    assert metrics["val/accuracy"] == pytest.approx(5 / 6)
    assert metrics["val/prompts"] == 3 and metrics["val/samples"] == 6
    assert metrics["val/policy_version"] == 4 and metrics["val/sampled_version_mean"] == 5
    assert metrics["val/response_length_mean"] == pytest.approx(1.5)


def test_groups_of_an_unknown_pass_are_ignored():
    cfg = GRPOConfig(val_period=1)
    published = Published()
    validator = Validator(published, prompts(1), cfg, run="r")
    other = Validator(Published(), prompts(1), cfg, run="r")
    other.start(7)  # e.g. started by the learner before a restart
    (batch,) = other.publish_once.batches.values()
    validator.accept(scored(batch, batch.prompts[0], [1.0], version=7))
    assert validator.finished() == [] and validator.outstanding == []


def test_batch_ids_name_their_version_and_nothing_else_matches():
    assert version_of_batch(validation_batch_id("run-1", 12, 3)) == 12
    assert version_of_batch("run-1-b000000012") is None


def test_pass_metrics_count_truncations():
    batch = PromptBatch(batch_id=validation_batch_id("r", 0, 0), prompts=prompts(1), n_samples=1, purpose="val")
    group = scored(batch, batch.prompts[0], [0.0], version=0)
    group.rollout.samples[0].finish_reason = "length"
    metrics = pass_metrics([group], 0, 1.5)
    assert metrics["val/truncated_fraction"] == 1.0 and metrics["val/accuracy"] == 0.0
    assert np.isclose(metrics["val/seconds"], 1.5)


class CharTokenizer:
    """One token per character: enough for prompt lengths."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [ord(c) % 97 for c in text]}


def test_validation_prompts_come_from_the_prepared_split_and_leave_out_prompts_with_no_room(tmp_path):
    import json

    from learner.config import LearnerConfig
    from learner.data_source import validation_prompts

    rows = [{"id": f"q{i}", "prompt": "x" * length, "ground_truth": "1"} for i, length in enumerate([5, 50, 7, 9])]
    (tmp_path / "train.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = LearnerConfig.model_validate({
        "policy": {"model_name": "m", "max_total_sequence_length": 20},
        "data": {"path": str(tmp_path)}, "grpo": {"val_period": 5, "max_val_samples": 3},
    })  # fmt: skip
    assert [p.prompt_id for p in validation_prompts(cfg, CharTokenizer())] == ["q0", "q2"]  # q1: too long

    (tmp_path / "validation.jsonl").unlink()
    with pytest.raises(UserError, match="no validation file at"):
        validation_prompts(cfg, CharTokenizer())


def test_rlq_train_refuses_a_run_without_its_validation_file_before_starting_anything(tmp_path):
    from pathlib import Path

    from rlq.config import load_run_config
    from rlq.launch import train

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("{}\n")
    config = Path(__file__).resolve().parents[2] / "configs" / "tiny_arith_cpu.yaml"
    cfg = load_run_config(config, [f"data.path={data}", f"logger.log_dir={tmp_path / 'run'}", "grpo.val_period=5"])
    with pytest.raises(UserError, match="no validation file at .*validation.jsonl"):
        train(cfg)
    assert not (tmp_path / "run" / "redis").exists() and not (tmp_path / "run" / "logs").exists()
