"""Every role resolves `policy.model_name` the same way: a local directory, else the HF cache (offline-safe)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlq.errors import UserError
from rlq.models import hub_cache_dir, place_in_hf_cache, resolve_model

REPO = Path(__file__).resolve().parents[2]
HUB_ID = "Qwen/Qwen3-4B-Instruct-2507"
RLQ = Path(sys.executable).parent / "rlq"


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF home of this test's own, offline, as on an air-gapped node."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home / "hub"


@pytest.fixture
def config_only_model(tmp_path: Path) -> Path:
    """A model directory with just a tiny Qwen3 config.json: enough for resolution."""
    from transformers import Qwen3Config

    out = tmp_path / "config-only"
    Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, vocab_size=128).save_pretrained(out)  # fmt: skip
    return out


def test_the_cache_follows_the_environment_at_call_time(offline_cache: Path, monkeypatch, tmp_path) -> None:
    assert hub_cache_dir() == offline_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub_cache_dir() == tmp_path / "elsewhere"


def test_a_cached_hub_id_resolves_to_its_snapshot(offline_cache: Path, config_only_model: Path) -> None:
    from transformers import AutoConfig

    snapshot = place_in_hf_cache(config_only_model, HUB_ID, offline_cache)
    repo = offline_cache / "models--Qwen--Qwen3-4B-Instruct-2507"
    assert snapshot.parent == repo / "snapshots" and len(snapshot.name) == 40
    assert (repo / "refs" / "main").read_text() == snapshot.name
    assert (snapshot / "config.json").is_symlink() and (snapshot / "config.json").resolve().parent == repo / "blobs"
    resolved = resolve_model(HUB_ID)
    assert Path(resolved) == snapshot.resolve()
    config = AutoConfig.from_pretrained(resolved)
    assert config.model_type == "qwen3" and config.num_hidden_layers == 2
    # the same files placed again give the same snapshot
    assert place_in_hf_cache(config_only_model, HUB_ID, offline_cache) == snapshot


def test_real_weights_load_from_the_cache(offline_cache: Path, tiny_model_dir: Path) -> None:
    """The learner's and tools' loading path (rlq.tiny_policy.load_policy) takes a hub id, offline."""
    import torch

    from rlq.tiny_policy import load_policy

    place_in_hf_cache(tiny_model_dir, HUB_ID, offline_cache)
    model, tokenizer = load_policy(HUB_ID)
    reference, _ = load_policy(tiny_model_dir)
    assert tokenizer.chat_template is not None
    for (name, got), (_, want) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(got, want), name


def test_a_missing_hub_id_offline_is_one_line_naming_id_and_cache(offline_cache: Path) -> None:
    with pytest.raises(UserError) as info:
        resolve_model("Org/missing-model")
    message = str(info.value)
    assert "\n" not in message
    assert "Org/missing-model" in message and str(offline_cache) in message and "HF_HUB_OFFLINE" in message


def test_an_invalid_hub_id_is_one_line(offline_cache: Path) -> None:
    with pytest.raises(UserError) as info:
        resolve_model("not/a/hub id")
    assert "\n" not in str(info.value) and "not/a/hub id" in str(info.value)


def test_a_missing_local_path_is_not_taken_for_a_hub_id(offline_cache: Path, tmp_path: Path) -> None:
    for name in (str(tmp_path / "no-model"), "./no-model", "~/no-such-rlq-model"):
        with pytest.raises(UserError, match="does not exist"):
            resolve_model(name)


def test_a_local_directory_is_returned_unchanged(offline_cache: Path, config_only_model: Path, monkeypatch) -> None:
    assert resolve_model(str(config_only_model)) == str(config_only_model)
    monkeypatch.chdir(config_only_model.parent)
    assert resolve_model("config-only") == "config-only"  # a relative directory wins over the hub id reading


def test_doctor_model_check_names_id_and_snapshot(offline_cache: Path, tiny_model_dir: Path) -> None:
    from rlq.config import load_run_config
    from rlq.doctor import _check_model

    snapshot = place_in_hf_cache(tiny_model_dir, HUB_ID, offline_cache)
    cfg = load_run_config(REPO / "configs" / "tiny_arith_cpu.yaml", [f"policy.model_name={HUB_ID}"])
    detail = _check_model(cfg)
    assert detail.startswith(f"{HUB_ID} (") and str(snapshot.resolve()) in detail and "qwen3" in detail


def _cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "RLQ_BROKER_URL": "redis://127.0.0.1:1/0"}  # fmt: skip
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "RLQ_DEBUG"):
        env.pop(key, None)
    config = REPO / "configs" / "tiny_arith_cpu.yaml"
    return subprocess.run([str(RLQ), *argv, "--config", str(config), f"data.path={tmp_path / 'arith'}",
                           "policy.model_name=Org/missing-model"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.parametrize("role", [["worker", "generate"], ["learner"]])
def test_cli_role_with_a_missing_hub_id_offline_fails_in_one_line(tmp_path: Path, role: list[str]) -> None:
    result = _cli(tmp_path, *role)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("rlq:")]
    assert len(errors) == 1 and "Org/missing-model" in errors[0] and "HF cache" in errors[0], result.stderr
