"""Weight sync over a real gloo group and a real redis-server, without vLLM: join, broadcast, evict, watchdog.

Workers run as threads of the test process here (each with its own gloo group object, exactly as a worker
process would hold it); the vLLM path is covered by test_generate.py.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from broker.connection import connect
from broker.errors import WeightSyncError
from broker.keys import POLICY_JOIN_PREFIX, Keys
from broker.policy import PolicyHash
from learner.broadcast import CollectiveBroadcast
from workers.generate.weights import WeightReceiver

TIMEOUT_S = 5.0


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _ask_to_join(r, keys: Keys, worker_id: str) -> None:
    r.set(keys.worker_alive(worker_id), "1", ex=60)
    r.hset(keys.policy, POLICY_JOIN_PREFIX + worker_id, time.time())


def _worker(r, keys: Keys, worker_id: str, version: int, out: dict) -> None:
    """A worker's sync loop: wait for an announcement naming it, receive; re-join on failure."""
    receiver = out.setdefault(("receiver", worker_id), WeightReceiver(worker_id))  # kept across versions
    deadline = time.monotonic() + 30
    handled = None
    while time.monotonic() < deadline:
        ann = PolicyHash(r, keys).announcement()
        if ann is not None and worker_id in ann.members and (ann.epoch, ann.version) != handled:
            handled = (ann.epoch, ann.version)
            try:
                out[worker_id] = dict(receiver.receive(ann))
                if ann.version >= version:
                    return
            except WeightSyncError as exc:
                out.setdefault("errors", []).append(str(exc))
        time.sleep(0.05)


@pytest.fixture
def sync(redis_url: str, run_name: str):
    r = connect(redis_url)
    keys = Keys(run_name)
    bc = CollectiveBroadcast(r, keys, master_addr="127.0.0.1", bucket_bytes=256, timeout_s=TIMEOUT_S)
    yield r, keys, bc
    bc.close()


def test_workers_receive_every_parameter_in_buckets(sync) -> None:
    r, keys, bc = sync
    model = _model()
    for w in ("w1", "w2"):
        _ask_to_join(r, keys, w)
    out: dict = {}
    threads = [threading.Thread(target=_worker, args=(r, keys, w, 1, out)) for w in ("w1", "w2")]
    for t in threads:
        t.start()
    report = bc.broadcast(model, version=1)
    for t in threads:
        t.join(30)
    assert report.members == ["w1", "w2"] and not report.evicted
    ann = PolicyHash(r, keys).announcement()
    assert ann is not None and ann.version == 1 and ann.world_size == 3 and len(ann.buckets) > 1
    for w in ("w1", "w2"):
        assert out[w].keys() == dict(model.named_parameters()).keys()
        assert all(torch.equal(out[w][n], p.detach()) for n, p in model.named_parameters())
    # Same members next time: same epoch, the group is reused.
    epoch = report.epoch
    threads = [threading.Thread(target=_worker, args=(r, keys, w, 2, out)) for w in ("w1", "w2")]
    for t in threads:
        t.start()
    assert bc.broadcast(model, version=2).epoch == epoch
    for t in threads:
        t.join(30)


def test_a_flattening_sender_sends_its_parameters_in_place(redis_url: str, run_name: str) -> None:
    from broker.schemas import BucketSpec
    from weightsync.flat import bucket_view

    r = connect(redis_url)
    keys = Keys(run_name)
    bc = CollectiveBroadcast(r, keys, master_addr="127.0.0.1", bucket_bytes=256, timeout_s=TIMEOUT_S, flatten=True)
    model = _model()
    first = {n: p.detach().clone() for n, p in model.named_parameters()}
    _ask_to_join(r, keys, "w1")
    out: dict = {}
    for version in (1, 2):
        worker = threading.Thread(target=_worker, args=(r, keys, "w1", version, out))
        worker.start()
        bc.broadcast(model, version=version)
        worker.join(30)
        params = dict(model.named_parameters())
        ann = PolicyHash(r, keys).announcement()
        assert all(bucket_view(params, BucketSpec(**{f: getattr(b, f) for f in b.__struct_fields__})) is not None
                   for b in ann.buckets)  # fmt: skip
        assert all(torch.equal(out["w1"][n], p.detach()) for n, p in params.items())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # an optimizer step writes into the bucket views
    assert all(torch.allclose(first[n] + 2.0, p.detach()) for n, p in model.named_parameters())
    bc.close()


def test_a_member_that_never_comes_is_evicted_and_the_rest_are_served(sync) -> None:
    r, keys, bc = sync
    model = _model()
    _ask_to_join(r, keys, "w1")
    _ask_to_join(r, keys, "ghost")  # alive in the registry, never joins the group
    out: dict = {}
    worker = threading.Thread(target=_worker, args=(r, keys, "w1", 1, out))
    worker.start()
    report = bc.broadcast(model, version=1)
    worker.join(60)
    assert report.evicted == ["ghost"] and report.members == ["w1"] and report.attempts == 2
    assert torch.equal(out["w1"]["0.weight"], model[0].weight.detach())
    assert "ghost" not in PolicyHash(r, keys).announcement().members


def test_a_stalled_learner_ends_the_update_with_an_error_within_its_timeout(sync) -> None:
    r, keys, bc = sync
    _ask_to_join(r, keys, "w1")
    bc._update_membership()
    ann = bc._announcement(1, "gloo", [])
    ann = type(ann)(**{**{f: getattr(ann, f) for f in ann.__struct_fields__}, "buckets": _model_buckets()})
    # The learner forms the group but never sends a byte (a hung learner step).
    former = threading.Thread(target=bc._form_group, args=("gloo",))
    former.start()
    receiver = WeightReceiver("w1")
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="v1 epoch"):
        receiver.receive(ann)
    assert time.monotonic() - t0 < TIMEOUT_S * 3
    assert receiver.pg is None  # left the group: the next epoch is joined afresh
    former.join(30)


def _model_buckets():
    from learner.weight_transport import plan_buckets

    return plan_buckets(list(_model().named_parameters()), 1 << 20)
