"""Worker registry over a real redis-server: heartbeats with a TTL, liveness, removal and pruning."""

from __future__ import annotations

import time

import pytest

from broker.connection import connect
from broker.keys import Keys
from broker.registry import Registry
from broker.schemas import WorkerHeartbeat


@pytest.fixture
def registry(redis_url: str, run_name: str):
    client = connect(redis_url)
    yield Registry(client, Keys(run_name))
    client.close()


def test_heartbeat_is_listed_with_its_details(registry: Registry) -> None:
    beat = WorkerHeartbeat(worker_id="gen-0", role="generate", accelerator="cuda:NVIDIA H100", capacity=16)
    registry.heartbeat(beat, ttl_s=30)
    ((got, age_s, alive),) = registry.workers()
    assert got == beat
    assert alive and 0 <= age_s < 30
    assert registry.alive("generate") == [beat] and registry.alive("judge") == []


def test_a_worker_that_stops_beating_is_dead_then_pruned(registry: Registry) -> None:
    registry.heartbeat(WorkerHeartbeat(worker_id="gen-0", role="generate"), ttl_s=30)
    registry.heartbeat(WorkerHeartbeat(worker_id="gen-1", role="generate", sent_at=time.time() - 60), ttl_s=0.01)
    time.sleep(0.05)
    states = {s.heartbeat.worker_id: s for s in registry.workers()}
    assert states["gen-0"].alive and not states["gen-1"].alive
    assert registry.prune(older_than_s=3600) == [], "dead but recent: still listed"
    assert registry.prune(older_than_s=30) == ["gen-1"]
    assert [s.heartbeat.worker_id for s in registry.workers()] == ["gen-0"]


def test_a_new_heartbeat_replaces_the_old_one(registry: Registry) -> None:
    registry.heartbeat(WorkerHeartbeat(worker_id="gen-0", role="generate", status="starting"))
    registry.heartbeat(WorkerHeartbeat(worker_id="gen-0", role="generate", status="busy", policy_version=3))
    ((beat, _, _),) = registry.workers()
    assert (beat.status, beat.policy_version) == ("busy", 3)


def test_remove_forgets_the_worker(registry: Registry) -> None:
    registry.heartbeat(WorkerHeartbeat(worker_id="judge-0", role="judge"))
    assert registry.remove("judge-0") is True
    assert registry.workers() == []
    assert registry.remove("judge-0") is False


def test_a_corrupt_entry_is_skipped(registry: Registry) -> None:
    registry.r.hset(registry.keys.workers, "junk", b"\xc1")
    registry.heartbeat(WorkerHeartbeat(worker_id="gen-0", role="generate"))
    assert [s.heartbeat.worker_id for s in registry.workers()] == ["gen-0"]


def test_ttl_must_be_positive(registry: Registry) -> None:
    with pytest.raises(ValueError):
        registry.heartbeat(WorkerHeartbeat(worker_id="gen-0", role="generate"), ttl_s=0)
