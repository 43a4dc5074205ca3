"""The policy hash through broker/policy.py, against a real redis-server: every field the roles share."""

from __future__ import annotations

import json

from broker.connection import connect
from broker.keys import Keys
from broker.policy import CHECKPOINT_STATE_FILE, PolicyHash, checkpoint_model_dir, checkpoint_version
from broker.schemas import JoinRequest, SharedBucket, SharedWeights, WeightAnnouncement


def _announcement(version: int, shared: SharedWeights | None = None) -> WeightAnnouncement:
    return WeightAnnouncement(version=version, epoch=1, backend="gloo", master_addr="h", master_port=1, world_size=1,
                              members=[], buckets=[], shared=shared)  # fmt: skip


def test_announcement_version_checkpoint_joins_and_synced_marks(redis_url, run_name, tmp_path):
    policy = PolicyHash(connect(redis_url), Keys(run_name))
    assert policy.announcement() is None and policy.checkpoint() == "" and policy.shared_seq() == -1
    policy.set_version(3, at=12.5)
    policy.announce(_announcement(3, SharedWeights(node="n", device="cpu", seq=4, buckets=[SharedBucket(path="/p")])))
    ann = policy.announcement()
    assert ann is not None and ann.version == 3 and policy.shared_seq() == 4, "announce moves the seqlock with it"
    policy.begin_shared_write(5)
    assert policy.shared_seq() == 5
    policy.set_checkpoint(tmp_path / "step_3")
    assert policy.checkpoint() == str((tmp_path / "step_3").resolve())
    policy.ask_to_join(JoinRequest(worker_id="w1", device="GPU-1"))
    policy.ask_to_join(JoinRequest(worker_id="w2"))
    policy.forget("w2")
    joins = policy.take_join_requests()
    assert list(joins) == ["w1"] and policy.take_join_requests() == {}, "taking them removes them"
    policy.mark_synced("w1", 3)
    assert policy.synced("w1") == 3 and policy.synced("w9") is None
    policy.withdraw()
    assert policy.announcement() is None


def test_a_malformed_announcement_reads_as_none(redis_url, run_name):
    r = connect(redis_url)
    r.hset(Keys(run_name).policy, "announcement", b"\x00not msgpack")
    assert PolicyHash(r, Keys(run_name)).announcement() is None


def test_the_checkpoint_layout(tmp_path):
    step = tmp_path / "step_7"
    (step / "policy").mkdir(parents=True)
    (step / CHECKPOINT_STATE_FILE).write_text(json.dumps({"version": 7}))
    assert checkpoint_model_dir(step) == str(step / "policy")
    assert checkpoint_version(checkpoint_model_dir(step)) == 7
    assert checkpoint_model_dir(tmp_path) == str(tmp_path) and checkpoint_version(tmp_path) == 0
