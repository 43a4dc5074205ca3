"""`rlq train` end to end, as a user runs it: a subprocess with a private Redis, a real Celery judge, a real
vLLM CPU generation worker and a torchrun learner. Short (3 steps, untrained policy): it checks the plumbing
(versions advance, groups are scored, weights reach the worker), not learning; bench/learning.py does that.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.tiny_run import tiny_train_argv

pytestmark = pytest.mark.vllm


def _train(tmp_path: Path, model_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    argv = tiny_train_argv(tmp_path, model_dir, *overrides)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def test_three_steps_advance_versions_score_groups_and_sync_weights(tmp_path, tiny_model_dir):
    result = _train(tmp_path, tiny_model_dir, "grpo.max_num_steps=3", "grpo.val_period=3", "grpo.max_val_samples=8",
                    "policy.optimizer.schedule.kind=linear", "policy.optimizer.schedule.warmup_steps=1",
                    "policy.optimizer.schedule.final_ratio=0")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    everything = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in everything if "loss/total" in r]
    assert [r["step"] for r in records] == [1, 2, 3], "one metrics record per step, versions advancing"
    lrs = [r["train/lr"] for r in records]  # one warmup step at the full rate, then linear decay to 0 at step 3
    assert lrs[0] == lrs[1] > 0 and lrs[2] == pytest.approx(lrs[0] / 2)
    # Validation passes (the config's val_at_start, and the final version) went through the same worker and judge;
    # the last one was waited for.
    passes = {r["val/policy_version"]: r for r in everything if "val/accuracy" in r}
    assert sorted(passes) == [0, 3]
    for version, validation in passes.items():
        assert validation["val/prompts"] == 8 and validation["val/samples"] == 8
        assert 0.0 <= validation["val/accuracy"] <= 1.0 and validation["val/sampled_version_mean"] >= version
    for record in records:
        assert record["rollout/groups"] == 8 and record["rollout/samples"] == 32, "every group scored by the judge"
        assert sum(v for k, v in record.items() if k.startswith("rollout/verdict_")) == 32
        assert record["sync/members"] >= 1 and record["sync/failed"] == 0, "weights reached the generation worker"
        assert record["sync/bytes"] > 0
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    trained = [g for entry in ledger for g in entry["trained"]]
    assert len(trained) == len(set(trained)) == 24, "no group trained twice"
    assert max(r["rollout/staleness_max"] for r in records) <= 1, "max_staleness honoured"
    assert (run_dir / "ckpt" / "step_3").is_dir(), "final checkpoint"
    assert (run_dir / "config.yaml").exists() and (run_dir / "reward.png").exists()
    assert "step 3/3" in result.stderr and "validation of version 3: accuracy" in result.stderr

    # The same command again (`make train` twice): the checkpoint says the run is done. One line, nothing starts
    # (before, every role started and the learner waited 300 s on a validation no worker could serve).
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    again = _train(tmp_path, tiny_model_dir, "grpo.max_num_steps=3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "holds a finished run (version 3, grpo.max_num_steps reached): nothing to train" in again.stderr
    assert "started learner" not in again.stderr and (run_dir / "metrics.jsonl").read_text() == metrics_before


def test_a_failing_role_is_named_in_one_line(tmp_path, tiny_model_dir):
    not_a_model = tmp_path / "not-a-model"  # a directory, so it passes the launcher's check; the worker fails on it
    not_a_model.mkdir()
    result = _train(tmp_path, tiny_model_dir, "grpo.max_num_steps=2", f"++policy.generation.model_name={not_a_model}")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("rlq: generate-0 "), last


def test_a_missing_model_is_one_line_before_anything_starts(tmp_path, tiny_model_dir):
    result = _train(tmp_path, tiny_model_dir, "grpo.max_num_steps=2", "++policy.generation.model_name=/nonexistent")
    assert result.returncode == 2
    assert result.stderr.strip() == "rlq: model directory /nonexistent does not exist"
    assert not (tmp_path / "run" / "logs").exists(), "no role was started"


def test_bad_override_is_one_line_and_starts_nothing(tmp_path, tiny_model_dir):
    result = _train(tmp_path, tiny_model_dir, "grpo.max_num_stepz=2")
    assert result.returncode == 2
    assert (
        result.stderr.strip() == "rlq: override 'grpo.max_num_stepz=2': unknown key grpo.max_num_stepz "
        "(use ++grpo.max_num_stepz=... to add a key)"
    )
    assert not (tmp_path / "run").exists()


def test_the_worker_reads_the_weights_from_shared_memory_when_the_run_asks(tmp_path, tiny_model_dir):
    """weight_sync.transport.share_memory=host: the CPU worker on the learner's host maps the learner's /dev/shm
    buffers (on a GPU the same path carries CUDA IPC handles for a colocated worker); no gloo group is formed."""
    result = _train(tmp_path, tiny_model_dir, "grpo.max_num_steps=3", "grpo.val_at_start=false",
                    "weight_sync.transport.share_memory=host")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss/total" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["sync/members"] == 1 and r["sync/failed"] == 0 for r in records)
    learner_log = (run_dir / "logs" / "learner.log").read_text()
    assert "-> 0 workers + 1 through shared buffers" in learner_log and "joined weight group" not in learner_log
    worker_log = (run_dir / "logs" / "generate-0.log").read_text()
    assert "weights v3 loaded" in worker_log and "joined weight group" not in worker_log
    assert not list(Path("/dev/shm").glob("rlq-weights-*")), "the learner removes its buffers when it stops"
