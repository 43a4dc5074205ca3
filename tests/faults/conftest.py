"""Fixtures of the fault-injection suite; the harness and the ledger are in harness.py."""

from __future__ import annotations

import pytest

from tests.faults.harness import LoopRun


@pytest.fixture
def loop(tmp_path, tiny_model_dir):
    run = LoopRun(tmp_path, tiny_model_dir)
    yield run
    run.stop()
