"""The scaling request (broker/scaling.py) on a real redis-server: validated before anything is written, read back
as the launcher reads it, a bad entry written by hand ignored. `rlq scale` against a live run is
tests/e2e/test_supervise.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis

from broker.keys import Keys
from broker.scaling import check_request, desired_counts, request_scale


def test_requests_are_checked_then_read_back(redis_url, run_name):
    r, keys = redis.Redis.from_url(redis_url), Keys(run_name)
    request_scale(r, keys, {"generate": 3, "judge": 2})
    assert desired_counts(r, keys) == {"generate": 3, "judge": 2}
    for role, count, message in [("learner", 2, "cannot scale 'learner'"), ("generate", 0, "1 to 256"),
                                 ("judge", 257, "1 to 256")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            request_scale(r, keys, {"generate": 5, role: count})
    assert desired_counts(r, keys) == {"generate": 3, "judge": 2}, "a refused request writes nothing"
    r.hset(keys.scale, mapping={"generate": "many", "learner": "4"})  # written by hand, not through rlq scale
    assert desired_counts(r, keys) == {"judge": 2}


def test_check_request_accepts_the_bounds():
    check_request("generate", 1)
    check_request("judge", 256)


def test_rlq_scale_without_a_launcher_says_so_in_one_line(redis_url, run_name):
    result = subprocess.run([sys.executable, "-m", "rlq", "scale", "--broker", redis_url, "--run", run_name],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode != 0 and "has no launcher that scales" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
