"""The CI plan (`make test`, `.ci/run`): every test, the slow tier included, inside a wall-clock budget.

Loaded with `-p tests.ci_plan` (the Makefile does); a plain `pytest` run is not affected. From `tests/ci_plan.json`:
- the slow tier runs after everything else, fastest first (seconds measured on the 2-core CI machine), so a slow
  suite that overruns costs the least coverage;
- each slow test gets its own time limit (`timeout_s`, pytest-timeout) instead of the global one, so one stuck
  test fails alone and cannot take the run's budget with it;
- the tests that cannot fit are skipped with the reason written there (pytest's -ra lists them);
- a slow test that would end past `RLQ_CI_BUDGET_S` seconds of the pytest run (default: the file's `budget_s`,
  what the CI limit leaves after the install) is skipped with that reason, rather than running past the limit.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import pytest

PLAN_FILE = Path(__file__).with_name("ci_plan.json")
BUDGET_ENV = "RLQ_CI_BUDGET_S"
_started = time.monotonic()


@functools.cache
def load_plan() -> dict:
    return json.loads(PLAN_FILE.read_text())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    plan = load_plan()
    measured: dict[str, dict] = plan["slow"]
    excluded: dict[str, str] = plan["excluded"]
    slow = [item for item in items if item.get_closest_marker("slow")]
    rest = [item for item in items if not item.get_closest_marker("slow")]
    unknown = sorted(item.nodeid for item in slow if item.nodeid not in measured and item.nodeid not in excluded)
    if unknown:  # a new slow test must be measured and planned, not silently appended
        raise pytest.UsageError(f"slow tests missing from {PLAN_FILE.name}: {', '.join(unknown)}")
    for item in slow:
        if item.nodeid in excluded:
            item.add_marker(pytest.mark.skip(reason=f"not in CI: {excluded[item.nodeid]}"))
        else:
            item.add_marker(pytest.mark.timeout(measured[item.nodeid]["timeout_s"]))
    slow.sort(key=lambda item: measured.get(item.nodeid, {}).get("seconds", float("inf")))
    items[:] = rest + slow


def pytest_runtest_setup(item: pytest.Item) -> None:
    if not item.get_closest_marker("slow"):
        return
    plan = load_plan()
    budget = float(os.environ.get(BUDGET_ENV) or plan["budget_s"])
    expected = plan["slow"].get(item.nodeid, {}).get("seconds", 0.0)
    used = time.monotonic() - _started
    if used + expected > budget:
        pytest.skip(f"CI time budget: {used:.0f} s used, this test takes ~{expected:.0f} s, budget {budget:.0f} s")
