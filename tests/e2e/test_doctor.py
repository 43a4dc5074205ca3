"""`rlq doctor` as a user runs it: every check passes on a healthy machine, and a broken model is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlq.data import ArithConfig, prepare_arith

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.vllm


def _doctor(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    data_dir = tmp_path / "arith"
    prepare_arith(data_dir, ArithConfig(n_train=50, n_val=5, seed=1))
    argv = [sys.executable, "-m", "rlq", "doctor", "--config", str(REPO / "configs" / "tiny_arith_cpu.yaml"),
            f"data.path={data_dir}", *overrides]  # fmt: skip
    return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=1200)


def test_doctor_passes_every_check(tmp_path, tiny_model_dir):
    result = _doctor(tmp_path, f"policy.model_name={tiny_model_dir}")
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert [line.split()[1] for line in lines] == ["gpus", "redis", "judge", "model", "loop"]
    assert all(line.startswith("ok") for line in lines)
    assert "reached 1 worker(s)" in lines[-1]


def test_doctor_names_a_missing_model(tmp_path):
    result = _doctor(tmp_path, f"policy.model_name={tmp_path / 'no-model'}")
    assert result.returncode == 1
    verdicts = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert verdicts[-1].startswith("FAIL model"), verdicts
    assert len(verdicts) == 4, "the doctor stops at the first failure"
