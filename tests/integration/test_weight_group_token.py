"""#22: the weight group's rendezvous listens only where the run says and admits only members holding the run's
token (real gloo group, real redis-server; workers as threads, as tests/integration/test_generate_sync.py)."""

from __future__ import annotations

import threading

import psutil
import pytest
import torch

from broker.acl import GENERATE, LEARNER, WEIGHT_GROUP, password_for, role_env
from broker.connection import connect
from broker.errors import WeightSyncError
from broker.keys import WEIGHT_TOKEN_ENV, Keys
from learner.broadcast import CollectiveBroadcast
from tests.integration.test_generate_sync import TIMEOUT_S, _ask_to_join, _model, _worker
from workers.generate.weights import WeightReceiver


def test_a_member_without_the_runs_token_is_refused_and_one_with_it_gets_the_weights(redis_url, run_name, monkeypatch):
    r, keys = connect(redis_url), Keys(run_name)
    learner = CollectiveBroadcast(r, keys, master_addr="127.0.0.1", bucket_bytes=256, timeout_s=TIMEOUT_S,
                                  token="run-token")  # fmt: skip
    out: dict = {}
    try:
        monkeypatch.setenv(WEIGHT_TOKEN_ENV, "run-token")
        out[("receiver", "member")] = WeightReceiver("member")
        monkeypatch.setenv(WEIGHT_TOKEN_ENV, "a-guess")
        out[("receiver", "intruder")] = WeightReceiver("intruder")
        for worker in ("member", "intruder"):
            _ask_to_join(r, keys, worker)  # both pass the Redis side: only the token tells them apart
        threads = [threading.Thread(target=_worker, args=(r, keys, w, 1, out)) for w in ("member", "intruder")]
        for thread in threads:
            thread.start()
        model = _model()
        report = learner.broadcast(model, version=1)
        for thread in threads:
            thread.join(60)
    finally:
        learner.close()
    assert report.members == ["member"] and report.evicted == ["intruder"], report
    assert all(torch.equal(out["member"][n], p.detach()) for n, p in model.named_parameters())
    assert "intruder" not in out and out["errors"], "the intruder received nothing"


def test_the_store_listens_only_on_the_address_the_run_names(redis_url, run_name):
    learner = CollectiveBroadcast(connect(redis_url), Keys(run_name), master_addr="127.0.0.1", timeout_s=TIMEOUT_S)
    try:
        listening = [c.laddr for c in psutil.Process().net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == learner.master_port]  # fmt: skip
    finally:
        learner.close()
    assert [addr.ip for addr in listening] == ["127.0.0.1"], listening


def test_an_address_not_of_this_host_is_one_line(redis_url, run_name):
    with pytest.raises(WeightSyncError, match="weight_sync.transport.addr") as info:
        CollectiveBroadcast(connect(redis_url), Keys(run_name), master_addr="203.0.113.7", timeout_s=TIMEOUT_S)
    assert "\n" not in str(info.value)


def test_the_token_reaches_both_ends_of_the_weight_sync_and_no_one_else():
    token = password_for("s", WEIGHT_GROUP)
    assert role_env("s", GENERATE)[WEIGHT_TOKEN_ENV] == role_env("s", LEARNER)[WEIGHT_TOKEN_ENV] == token
    assert WEIGHT_TOKEN_ENV not in role_env("s", "rlq-judge") and WEIGHT_TOKEN_ENV not in role_env("s", "rlq-inspect")
