"""rlq/tracking.py's additions for the rollout log: a smoothed reward line, curves redrawn at each validation
pass, and sample completions as a W&B table (offline here)."""

from __future__ import annotations

import json

import pytest

from learner.config import GRPOConfig
from learner.rollout_log import ROLLOUT_DIR, RolloutLog
from learner.runtime_config import RolloutLogConfig
from rlq.tracking import MetricsFollower, WandbSettings, pick_samples, smooth
from tests.unit.test_rollout_log import make_group


def test_smooth_is_a_debiased_ema():
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0]), "no pull toward 0 at the start"
    values = smooth([0.0] * 5 + [1.0] * 50, weight=0.9)
    assert values[4] == 0.0 and 0.0 < values[5] < 0.3 and values[-1] == pytest.approx(1.0, abs=0.01)
    assert all(a <= b for a, b in zip(values, values[1:], strict=False)), "a step up is followed smoothly"


def test_pick_samples_takes_one_sample_of_each_of_the_first_trained_groups():
    rows = [{"step": s, "group_index": g, "sample_index": i, "dropped_reason": None} for s in (1, 2)
            for g in range(6) for i in range(3)]  # fmt: skip
    rows.append({"step": 1, "group_index": -1, "sample_index": 0, "dropped_reason": "stale"})
    picked = pick_samples(rows, 4)
    assert [(r["step"], r["group_index"], r["sample_index"]) for r in picked] == [
        (s, g, 0) for s in (1, 2) for g in range(4)
    ]


def test_curves_are_redrawn_at_each_validation_pass_not_only_at_the_end(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "rollout/reward_mean": s / 10}) + "\n" for s in range(1, 4)))
    follower = MetricsFollower(path, wandb=WandbSettings(enabled=False))
    follower.poll()
    assert not (tmp_path / "reward.png").exists(), "steps alone do not redraw"
    with open(path, "a") as fh:
        fh.write(json.dumps({"step": 3, "val/accuracy": 0.4, "val/policy_version": 3}) + "\n")
    follower.poll()
    first = (tmp_path / "reward.png").stat()
    assert first.st_size > 1000
    with open(path, "a") as fh:
        fh.write(json.dumps({"step": 4, "rollout/reward_mean": 0.5}) + "\n")
        fh.write(json.dumps({"step": 4, "val/accuracy": 0.5, "val/policy_version": 4}) + "\n")
    follower.poll()
    assert (tmp_path / "reward.png").stat().st_mtime_ns >= first.st_mtime_ns
    assert len(follower.records) == 6


def test_sample_rollouts_go_to_wandb_as_a_table_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "rollout/reward_mean": s / 10}) + "\n" for s in (1, 2)))
    log = RolloutLog(RolloutLogConfig(), tmp_path / ROLLOUT_DIR, GRPOConfig())
    for step in (1, 2):
        log.trained(step, [make_group(10 * step + k, version=step - 1) for k in range(6)])
    log.close()
    follower = MetricsFollower(path, wandb=WandbSettings(project="rlq-test"))
    follower.poll()
    follower.close()
    assert not follower._wandb_failed
    tables = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/rollouts/samples_*.table.json"))
    assert len(tables) == 1, list((tmp_path / "wandb").rglob("*"))
    table = json.loads(tables[0].read_text())
    assert table["columns"][:2] == ["step", "group_id"]
    assert [row[0] for row in table["data"]] == [1] * 4 + [2] * 4
