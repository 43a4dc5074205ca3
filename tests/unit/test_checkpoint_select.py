"""Which checkpoints stay: keep_last, keep_top_k by a validation metric, the latest, and awaited passes."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from broker.errors import UserError
from learner.checkpoint_select import (
    VAL_METRICS_FILE,
    Retention,
    best_checkpoint,
    prune,
    record_validation,
    retention,
    steps_to_keep,
)
from learner.config import CheckpointConfig


def test_without_top_k_only_the_newest_stay():
    assert steps_to_keep([10, 20, 30, 40], {20: 0.9}, Retention(keep_last=2)) == {30, 40}
    assert steps_to_keep([], {}, Retention()) == set()


def test_top_k_keeps_the_best_besides_the_newest_and_the_latest():
    metrics = {10: 0.5, 20: 0.9, 30: 0.7, 40: 0.1}
    policy = Retention(keep_last=1, keep_top_k=2)
    assert steps_to_keep([10, 20, 30, 40, 50], metrics, policy) == {50, 20, 30}
    lower = Retention(keep_last=1, keep_top_k=2, higher_is_better=False)
    assert steps_to_keep([10, 20, 30, 40, 50], metrics, lower) == {50, 40, 10}


def test_the_latest_stays_even_when_it_ranks_last():
    policy = Retention(keep_last=1, keep_top_k=1)
    assert steps_to_keep([10, 20], {10: 0.9, 20: 0.1}, policy) == {10, 20}


def test_ties_rank_the_newer_first_and_nan_does_not_rank():
    policy = Retention(keep_last=1, keep_top_k=1)
    assert steps_to_keep([10, 20, 30], {10: 0.5, 20: 0.5}, policy) == {20, 30}
    assert steps_to_keep([10, 20, 30], {10: 0.5, 20: float("nan")}, policy) == {10, 30}


def test_a_checkpoint_awaiting_its_validation_stays():
    policy = Retention(keep_last=1, keep_top_k=1, awaiting=frozenset({20}))
    assert steps_to_keep([10, 20, 30], {10: 0.5}, policy) == {10, 20, 30}
    assert steps_to_keep([10, 30], {10: 0.5}, policy) == {10, 30}  # an awaited step that is not on disk


def make_steps(root, steps):
    for step in steps:
        (root / f"step_{step}" / "policy").mkdir(parents=True)


def test_prune_and_record_on_disk(tmp_path):
    make_steps(tmp_path, [2, 4, 6])
    (tmp_path / ".step_8.tmp-1").mkdir()  # a save in progress is not a checkpoint
    policy = Retention(keep_last=1, keep_top_k=1, awaiting=frozenset({4}))
    assert record_validation(tmp_path, 2, {"val/accuracy": 0.3}, policy)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_2", "step_4", "step_6"]
    done = Retention(keep_last=1, keep_top_k=1)
    assert record_validation(tmp_path, 4, {"val/accuracy": 0.6}, done)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_4", "step_6"]  # 2 was beaten
    assert json.loads((tmp_path / "step_4" / VAL_METRICS_FILE).read_text()) == {"val/accuracy": 0.6}
    assert not record_validation(tmp_path, 5, {"val/accuracy": 1.0}, done)  # no checkpoint of version 5
    assert (tmp_path / ".step_8.tmp-1").is_dir()
    assert best_checkpoint(tmp_path) == tmp_path / "step_4"
    assert prune(tmp_path, Retention(keep_last=1)) == [4]


def test_best_checkpoint_needs_a_recorded_metric(tmp_path):
    make_steps(tmp_path, [1])
    with pytest.raises(UserError, match="no checkpoint"):
        best_checkpoint(tmp_path)


def test_config_fields_bounds_and_nemo_spelling():
    cfg = CheckpointConfig(keep_top_k=3, metric_name="val:accuracy", save_dtype="bfloat16")
    assert cfg.metric_name == "val/accuracy" and cfg.higher_is_better
    assert CheckpointConfig().keep_top_k is None and CheckpointConfig().save_dtype is None
    policy = retention(cfg, [5])
    assert policy == Retention(3, 3, "val/accuracy", True, frozenset({5}))
    for bad in ({"keep_top_k": 0}, {"save_dtype": "float16"}, {"metric_name": ""}):
        with pytest.raises(ValidationError):
            CheckpointConfig(**bad)
