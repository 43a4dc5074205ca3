import json

from rlq.tracking import MetricsFollower, WandbSettings, draw_curves, wandb_mode


def test_follower_reads_only_complete_lines_and_draws_curves(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "rollout/reward_mean": 0.2}) + "\n" + '{"step": 2, "rollout/rew')
    follower = MetricsFollower(path, wandb=WandbSettings(enabled=False))
    assert [r["step"] for r in follower.poll()] == [1]
    with open(path, "a") as fh:
        fh.write('ard_mean": 0.5, "sync/broadcast_s": 0.01}\n')
    assert [r["step"] for r in follower.poll()] == [2]
    follower.close()
    assert (tmp_path / "reward.png").stat().st_size > 1000
    assert (tmp_path / "sync_time.png").exists()
    assert not (tmp_path / "staleness.png").exists(), "no staleness data, no empty plot"


def test_wandb_mode_follows_the_api_key(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(WandbSettings()) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(WandbSettings()) == "online"
    assert wandb_mode(WandbSettings(enabled=False)) == "disabled"


def test_offline_wandb_logs_locally_without_network(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "rollout/reward_mean": s / 10}) + "\n" for s in range(3)))
    follower = MetricsFollower(path, wandb=WandbSettings(project="rlq-test"))
    follower.poll()
    follower.close()
    assert not follower._wandb_failed
    assert list((tmp_path / "wandb").glob("offline-run-*")), "an offline run directory that `wandb sync` can upload"


def test_draw_curves_without_records_writes_nothing(tmp_path):
    assert draw_curves([], tmp_path) == []
