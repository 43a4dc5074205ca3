"""Checkpoints: bfloat16 saves that resume into float32 master weights, and the best `keep_top_k` by the in-run
validation metric kept beside `keep_last` and the latest (a real learner under torchrun, stand-in rollouts)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open

from learner.checkpoint import save_checkpoint
from learner.checkpoint_select import VAL_METRICS_FILE, Retention, steps_to_keep
from tests.integration.learner_support import StandInRollouts, read_jsonl, start_learner, write_config, write_prompts


def saved_dtypes(policy_dir) -> set[torch.dtype]:
    dtypes = set()
    for path in policy_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as fh:
            dtypes |= {fh.get_tensor(name).dtype for name in fh.keys()}  # noqa: SIM118 (safe_open is no dict)
    return dtypes


def test_bfloat16_save_halves_the_policy_and_loads_back_into_float32(tmp_path, tiny_model_dir):
    from learner.train import load_model

    model = load_model(tiny_model_dir, "float32", torch.device("cpu"))
    args = (model, None, {"state": {}, "param_groups": []}, {"version": 1}, b"")
    full = save_checkpoint(tmp_path / "fp32", 1, *args)
    half = save_checkpoint(tmp_path / "bf16", 1, *args, save_dtype="bfloat16")
    assert saved_dtypes(full / "policy") == {torch.float32} and saved_dtypes(half / "policy") == {torch.bfloat16}
    size = {p: sum(f.stat().st_size for f in (p / "policy").glob("*.safetensors")) for p in (full, half)}
    assert size[half] < 0.55 * size[full]
    assert json.loads((half / "policy" / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    resumed = load_model(half / "policy", "float32", torch.device("cpu"))  # what build_trainer does on resume
    original = dict(model.named_parameters())
    for name, param in resumed.named_parameters():
        assert param.dtype == torch.float32
        assert torch.equal(param, original[name].detach().to(torch.bfloat16).float()), name
    assert resumed.get_output_embeddings().weight.data_ptr() == resumed.get_input_embeddings().weight.data_ptr()


STEPS, VAL_PERIOD, SAVE_PERIOD, PROMPTS = 6, 2, 3, 4


def test_learner_keeps_the_best_by_validation_and_resumes_from_bfloat16(tmp_path, tiny_model_dir, redis_url, run_name):
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "learner.yaml", model=tiny_model_dir, data=write_prompts(tmp_path / "prompts.jsonl"), run=run_name,
        redis_url=redis_url, run_dir=run_dir, max_num_steps=STEPS, num_prompts_per_step=PROMPTS, max_staleness=1,
        val_period=VAL_PERIOD, max_val_samples=4, num_val_generations_per_prompt=4,
    )  # fmt: skip
    overrides = (
        f"++data.validation_path={write_prompts(tmp_path / 'val.jsonl', n=4)}",
        f"checkpointing.save_period={SAVE_PERIOD}", "checkpointing.keep_last=1", "++checkpointing.keep_top_k=1",
        "++checkpointing.save_dtype=bfloat16",
    )  # fmt: skip
    ckpt = run_dir / "ckpt"
    rollouts = StandInRollouts(tiny_model_dir, redis_url, run_name)
    rollouts.allow(None)
    rollouts.start()
    try:
        first = start_learner(config, 1, tmp_path / "learner-1.log", *overrides)
        assert first.wait(timeout=400) == 0, (tmp_path / "learner-1.log").read_text()[-3000:]
        validated = {int(r["val/policy_version"]): r["val/accuracy"] for r in read_jsonl(run_dir / "metrics.jsonl")
                     if "val/accuracy" in r}  # fmt: skip
        assert sorted(validated) == [2, 4, 6]
        kept = sorted(int(p.name.split("_")[1]) for p in ckpt.glob("step_*"))
        best = max(validated, key=lambda s: (validated[s], s))
        assert kept == sorted({STEPS, best})  # the latest, and the best of the validated versions
        assert steps_to_keep([2, 3, 4, 6], validated, Retention(keep_last=1, keep_top_k=1)) == set(kept)
        for step in kept:
            recorded = json.loads((ckpt / f"step_{step}" / VAL_METRICS_FILE).read_text())
            assert recorded["val/accuracy"] == pytest.approx(validated[step])
            assert saved_dtypes(ckpt / f"step_{step}" / "policy") == {torch.bfloat16}
        assert (ckpt / "latest").read_text() == f"step_{STEPS}"

        time.sleep(0.5)
        second = start_learner(config, 1, tmp_path / "learner-2.log", *overrides, f"grpo.max_num_steps={STEPS + 2}")
        assert second.wait(timeout=400) == 0, (tmp_path / "learner-2.log").read_text()[-3000:]
    finally:
        rollouts.stop.set()
    log2 = (tmp_path / "learner-2.log").read_text()
    assert f"resumed at version {STEPS}" in log2
    assert [r["step"] for r in read_jsonl(run_dir / "ledger.jsonl")] == list(range(1, STEPS + 3))
    assert (ckpt / "latest").read_text() == f"step_{STEPS + 2}"
    assert rollouts.error is None
