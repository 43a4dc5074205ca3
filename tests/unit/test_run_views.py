"""Pure parts of the live views and the metrics endpoint: file readers, rendering, exposure rules, kombu's names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from kombu.transport.redis import PRIORITY_STEPS as KOMBU_STEPS
from kombu.transport.redis import Channel
from prometheus_client.core import Metric

from broker.celery_inspect import PRIORITY_SEP, PRIORITY_STEPS, UNACKED_INDEX_KEY, UNACKED_KEY, priority_keys
from rlq.errors import UserError
from rlq.metrics_server import STEP_SERIES, credentials, families, is_loopback, metrics_role_argv
from rlq.run_state import private_broker_url, read_metrics_tail, restart_counts
from rlq.views import headline, judge_queue_line, worker_rows


def test_the_judge_queue_keys_are_kombus() -> None:
    assert (Channel.sep, Channel.unacked_key, Channel.unacked_index_key) == (
        PRIORITY_SEP,
        UNACKED_KEY,
        UNACKED_INDEX_KEY,
    )
    assert tuple(KOMBU_STEPS) == PRIORITY_STEPS
    assert priority_keys("q")[:2] == ["q", "q\x06\x163"]


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_metrics_tail_finds_the_last_step_and_validation(tmp_path: Path) -> None:
    records = [{"step": s, "time": 100.0 + 30 * s, "rollout/reward_mean": s / 10} for s in range(1, 6)]
    records.insert(3, {"step": 3, "time": 195.0, "val/accuracy": 0.5})
    _write(tmp_path / "m.jsonl", records)
    with open(tmp_path / "m.jsonl", "a") as fh:
        fh.write('{"step": 6, "time": 3')  # a line the learner is still writing
    tail = read_metrics_tail(tmp_path / "m.jsonl")
    assert tail.step is not None and tail.step["step"] == 5 and tail.step["rollout/reward_mean"] == 0.5
    assert tail.validation == {"step": 3, "time": 195.0, "val/accuracy": 0.5}
    assert tail.steps_per_min == pytest.approx(2.0)
    cut = read_metrics_tail(tmp_path / "m.jsonl", max_bytes=120)  # only the tail: the cut first line is skipped
    assert cut.step is not None and cut.step["step"] == 5
    assert read_metrics_tail(tmp_path / "absent.jsonl").step is None


def test_restarts_are_counted_per_role(tmp_path: Path) -> None:
    events = [{"time": 1.0, "role": r, "cause": "killed by SIGKILL", "restart": i, "backoff_s": 1.0}
              for i, r in enumerate(["generate-0", "generate-0", "judge"])]  # fmt: skip
    _write(tmp_path / "events.jsonl", events)
    with open(tmp_path / "events.jsonl", "a") as fh:
        fh.write("not json\n")
    assert restart_counts(tmp_path / "events.jsonl") == {"generate-0": 2, "judge": 1}
    assert restart_counts(tmp_path / "none.jsonl") == {}


def test_the_run_directory_names_its_broker(tmp_path: Path) -> None:
    (tmp_path / "broker_url").write_text("redis://127.0.0.1:41234/0\n")  # what rlq train and the Slurm scripts write
    assert private_broker_url(tmp_path) == "redis://127.0.0.1:41234/0"
    assert private_broker_url(tmp_path / "elsewhere") is None


WORKER = {"worker_id": "g0", "role": "generate", "node": "n1", "accelerator": "cpu", "policy_version": 4,
          "throughput": 812.34, "heartbeat_age_s": 1.25, "alive": True, "status": "busy"}  # fmt: skip


def test_worker_rows_and_states() -> None:
    dead = {**WORKER, "worker_id": "j0", "role": "judge", "alive": False, "policy_version": -1, "throughput": 3.0}
    assert worker_rows([WORKER, dead]) == [
        ["g0", "generate", "n1", "cpu", "4", "812.3 tok/s", "1.2s ago", "busy"],
        ["j0", "judge", "n1", "cpu", "-", "3.0 ans/s", "1.2s ago", "dead"],
    ]


def test_judge_queue_line() -> None:
    jq = {"queue": "rlq.r.judge", "depth": 5, "unacked": 2, "unacked_exact": True, "oldest_unacked_age_s": 3.0,
          "consumers": 1, "consumer_names": ["judge-1"], "consumers_source": "registry"}  # fmt: skip
    assert judge_queue_line(jq) == (
        "judge queue rlq.r.judge: 5 waiting, 2 unacked (oldest 3.0s), 1 consumers (judge-1) [registry]"
    )


def _snap(**extra: object) -> dict:
    step = {"step": 7, "time": 1000.0, "rollout/reward_mean": 0.4567, "rollout/staleness_mean": 0.5,
            "rollout/staleness_max": 1.0, "sync/broadcast_s": 0.25, "perf/step_s": 2.0}  # fmt: skip
    metrics = {"step": step, "validation": {"val/accuracy": 0.75}, "steps_per_min": 12.0}
    return {"run": "r", "policy_version": 7, "dead_letters": 2, "workers": [dict(WORKER)], "restarts": {"judge": 1},
            "metrics": metrics, **extra}  # fmt: skip


def test_headline_figures() -> None:
    pairs = dict(headline(_snap(), now=1010.0))
    assert pairs["step"] == "7" and pairs["reward"] == "0.457" and pairs["staleness"] == "0.50 max 1"
    assert pairs["refit"] == "0.250s" and pairs["generation"] == "812 tok/s" and pairs["val accuracy"] == "0.750"
    assert pairs["metrics age"] == "10.0s" and pairs["restarts"] == "judge 1" and pairs["dead letters"] == "2"


def _samples(metrics: list[Metric]) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in metrics for s in m.samples}


def test_without_the_broker_only_the_file_series_are_exported() -> None:
    got = _samples(families(_snap(), broker_up=False))
    assert got[("rlq_broker_up", (("run", "r"),))] == 0.0
    assert got[("rlq_reward_mean", (("run", "r"),))] == pytest.approx(0.4567)
    assert got[("rlq_refit_seconds", (("run", "r"),))] == 0.25
    assert got[("rlq_restarts_total", (("role", "judge"), ("run", "r")))] == 1
    assert got[("rlq_step_metric", (("name", "perf/step_s"), ("run", "r")))] == 2.0
    assert not any(name.startswith(("rlq_stream", "rlq_worker", "rlq_judge")) for name, _ in got)


def test_exposure_needs_credentials_off_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("node7")
    assert credentials("127.0.0.1", {}) is None
    with pytest.raises(UserError, match="RLQ_METRICS_AUTH=user:password"):
        credentials("0.0.0.0", {})
    with pytest.raises(UserError, match="must be user:password"):
        credentials("0.0.0.0", {"RLQ_METRICS_AUTH": "no-colon"})
    assert credentials("0.0.0.0", {"RLQ_METRICS_AUTH": "prom:s3:cret"}) == ("prom", "s3:cret")


def test_metrics_role_argv() -> None:
    argv = metrics_role_argv(Path("/runs/x/config.yaml"), 9400)
    assert argv[1:] == ["-m", "rlq", "metrics-server", "--config", "/runs/x/config.yaml", "--port", "9400",
                        "--addr", "127.0.0.1"]  # fmt: skip


def test_the_dashboard_uses_only_exported_series() -> None:
    group = {"group": "learner", "pending": 1, "lag": 0, "oldest_pending_idle_ms": 20, "max_deliveries": 1}
    jq = {"depth": 1, "unacked": 0, "oldest_unacked_age_s": None, "consumers": 1}
    snap = _snap(policy_version=7, streams=[{"name": "scored", "length": 3, "groups": [group]}], judge_queue=jq)
    snap["metrics"]["step"].update({key: 1.0 for key in STEP_SERIES})  # a step record with every named figure
    exported = {s.name for m in families(snap, broker_up=True) for s in m.samples}
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "docs" / "grafana" / "rlq.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\brlq_[a-z_]+", expr)}
    assert used and used <= exported, used - exported
    assert all('run="$run"' in expr for expr in exprs)
