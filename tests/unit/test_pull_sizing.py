"""Capacity-aware pulls (workers/generate/pull.py): the pure sizing and the sizer's use of its inputs."""

from __future__ import annotations

import pytest

from workers.generate.config import GenerateRuntime, PullConfig
from workers.generate.pull import PullSizer, fleet_share, pull_count


def test_share_is_throughput_over_the_fleet() -> None:
    assert fleet_share(300.0, [100.0]) == pytest.approx(0.75)
    assert fleet_share(100.0, [300.0]) == pytest.approx(0.25)
    assert fleet_share(50.0, []) == 1.0


def test_unmeasured_workers_count_as_the_mean() -> None:
    assert fleet_share(0.0, [100.0, 300.0]) == pytest.approx(1 / 3)  # a new worker: the mean, 200
    assert fleet_share(100.0, [0.0]) == pytest.approx(0.5)
    assert fleet_share(0.0, [0.0, 0.0]) == pytest.approx(1 / 3)  # nobody measured: equal shares


def test_count_is_the_share_of_what_waits_rounded_up_within_bounds() -> None:
    assert pull_count(0.75, 4, min_messages=1, max_messages=16) == 3
    assert pull_count(0.25, 4, min_messages=1, max_messages=16) == 1
    assert pull_count(0.25, 1, min_messages=1, max_messages=16) == 1
    assert pull_count(1.0, 40, min_messages=1, max_messages=16) == 16
    assert pull_count(0.5, 0, min_messages=2, max_messages=16) == 2  # nothing waits: block for the bound
    assert pull_count(0.5, 4, min_messages=1, max_messages=16) == 2  # exact products do not round up


def test_fast_and_slow_workers_take_time_proportional_reads() -> None:
    """A worker 3x faster takes 3x the messages, so both reads of the fleet end together."""
    fast = pull_count(fleet_share(300.0, [100.0]), 4, min_messages=1, max_messages=16)
    slow = pull_count(fleet_share(100.0, [300.0]), 4 - fast, min_messages=1, max_messages=16)
    assert (fast, slow) == (3, 1)
    assert fast / 300.0 == pytest.approx(slow / 100.0)


def _sizer(cfg: PullConfig, fleet: list[tuple[str, float]], waiting: int, calls: list[str]) -> PullSizer:
    def read_fleet() -> list[tuple[str, float]]:
        calls.append("fleet")
        return fleet

    return PullSizer(cfg, "me", read_fleet, lambda: waiting)


def test_sizer_reads_the_fleet_at_most_every_refresh_and_ignores_itself() -> None:
    calls: list[str] = []
    sizer = _sizer(PullConfig(fleet_refresh_s=60), [("me", 1.0), ("other", 100.0)], 8, calls)
    assert sizer.count(300.0) == 6  # own figure is the live one, not the heartbeat's 1.0: share 0.75 of 8
    assert sizer.count(300.0) == 6
    assert calls == ["fleet"]
    assert sizer.share == pytest.approx(0.75)


def test_sizer_tops_up_a_read_to_its_share_of_everything_that_arrived() -> None:
    sizer = _sizer(PullConfig(), [("other", 100.0)], 3, [])
    assert sizer.count(300.0, taken=1) == 2  # 0.75 of (1 taken + 3 waiting) = 3: two more


def test_fixed_pulls_take_min_messages_and_never_top_up() -> None:
    sizer = _sizer(PullConfig(capacity_aware=False, min_messages=2), [("other", 100.0)], 50, [])
    assert sizer.count(300.0) == 2
    assert sizer.count(300.0, taken=2) == 0


def test_config_bounds() -> None:
    with pytest.raises(ValueError, match="min_messages"):
        PullConfig(min_messages=5, max_messages=4)
    with pytest.raises(ValueError):
        GenerateRuntime(injected_delay_per_token_s=-1)
    assert GenerateRuntime().pull.capacity_aware and GenerateRuntime().injected_delay_per_token_s == 0
