"""The learner under torchrun with 2 gloo ranks on CPU: real steps, identical replicas, metrics, ledger, checkpoints.

Generation workers and judges are replaced by `StandInRollouts` (see learner_support.py): real streams, real
ScoredGroups, tiny-model samples, a simple reward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from broker.connection import connect
from broker.keys import Keys
from broker.schemas import WeightAnnouncement, decode
from tests.integration.learner_support import (
    StandInRollouts,
    read_jsonl,
    start_learner,
    write_config,
    write_prompts,
)


def run_learner(tmp_path, model_dir, redis_url: str, run_name: str, nproc: int, *overrides: str) -> tuple[Path, str]:
    """3 steps of the learner under torchrun (`nproc` gloo ranks) beside StandInRollouts; it must succeed.

    Returns the run directory and the learner's log.
    """
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "learner.yaml", model=model_dir, data=write_prompts(tmp_path / "prompts.jsonl"),
        run=run_name, redis_url=redis_url, run_dir=run_dir, max_num_steps=3, max_staleness=1,
    )  # fmt: skip
    rollouts = StandInRollouts(model_dir, redis_url, run_name)
    rollouts.start()
    learner = start_learner(config, nproc, tmp_path / "learner.log", *overrides)
    try:
        rc = learner.wait(timeout=300)
    finally:
        rollouts.stop.set()
        if learner.poll() is None:
            learner.kill()
    log = (tmp_path / "learner.log").read_text()
    assert rc == 0, log[-3000:]
    assert rollouts.error is None
    return run_dir, log


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2", "ddp-bf16", "fsdp2-bf16"])
def test_two_gloo_ranks_take_real_steps_and_stay_identical(tmp_path, tiny_model_dir, redis_url, run_name, parallel):
    """`-bf16`: bfloat16 master weights (learner/optim.py): stochastic rounding draws the same bits on both ranks,
    so DDP replicas stay bit-identical; FSDP2 rounds its DTensor shards."""
    fsdp = f"++policy.dtensor_cfg.enabled={parallel.startswith('fsdp2')}"
    bf16 = ["++policy.precision=bfloat16", "++policy.master_weights=bfloat16"] if parallel.endswith("bf16") else []
    run_dir, _ = run_learner(tmp_path, tiny_model_dir, redis_url, run_name, 2,
                             "learner.weight_sync.transport.kind=filesystem", fsdp, *bf16)  # fmt: skip

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        if parallel.startswith("ddp"):  # both ranks hold bit-identical weights after every step (FSDP2: one copy)
            assert m["sync/replica_spread"] == 0.0
        assert m["loss/trained_tokens"] > 0 and m["perf/updates"] == 1
        assert m["rollout/groups"] == 4 and m["rollout/samples"] == 16
        assert 0.0 <= m["rollout/reward_mean"] <= 1.0
        assert m["loss/token_mult_prob_error"] >= 1.0
        for key in ("queue/wait_s", "perf/fwd_bwd_s", "perf/optimizer_s", "sync/broadcast_s", "loss/entropy"):
            assert key in m

    ledger = read_jsonl(run_dir / "ledger.jsonl")
    trained = [g for rec in ledger for g in rec["trained"]]
    assert [rec["step"] for rec in ledger] == [1, 2, 3]
    assert len(trained) == 12 and len(set(trained)) == 12
    assert not any(rec["dropped"] for rec in ledger)  # backpressure: nothing generated only to go stale

    # Real steps: the final checkpoint's weights differ from the initial ones; transformers loads it directly.
    final = run_dir / "ckpt" / "step_3"
    assert (run_dir / "ckpt" / "latest").read_text() == "step_3"
    before, after = (
        load_file(str(tiny_model_dir / "model.safetensors")),
        load_file(str(final / "policy/model.safetensors")),
    )
    assert any(not torch.equal(before[k].to(after[k].dtype), after[k]) for k in before)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(final / "policy")) is not None
    state = json.loads((final / "learner_state.json").read_text())
    assert state["version"] == 3
    r = connect(redis_url)
    assert int(r.hget(Keys(run_name).policy, "version")) == 3
    # Weights went out after every step through learner/broadcast.py (filesystem transport), announced in Redis.
    announcement = decode(r.hget(Keys(run_name).policy, "announcement"), WeightAnnouncement)
    assert announcement.version == 3 and announcement.backend == "filesystem"
    sent = load_file(announcement.checkpoint_path)
    assert all(torch.equal(sent[k], after[k]) for k in after)
    assert all(m["sync/failed"] == 0.0 and m["sync/bytes"] > 0 for m in metrics)
    # Every ack trimmed: what is left of the scored stream is pending (kept for a checkpoint) or not yet read.
    (group,) = r.xinfo_groups(Keys(run_name).scored)
    pending = {row["message_id"] for row in r.xpending_range(Keys(run_name).scored, group["name"], "-", "+", 1000)}
    left = [entry_id for entry_id, _ in r.xrange(Keys(run_name).scored)]
    assert all(i in pending or _id(i) > _id(group["last-delivered-id"]) for i in left), (len(left), len(pending))
    assert len(left) < len(trained)


def _id(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.decode().partition("-")
    return int(ms), int(seq)


def test_validation_passes_are_scored_and_logged_apart_from_training(tmp_path, tiny_model_dir, redis_url, run_name):
    """`grpo.val_at_start` + `val_period=2` over 3 steps: passes of versions 0, 2 and 3 (the last), each logged
    once all its groups are in; none of their groups is trained on or counted as a training group."""
    val_file = write_prompts(tmp_path / "validation.jsonl", n=5)
    validation = ["++grpo.val_at_start=true", "++grpo.val_period=2", "++grpo.num_val_generations_per_prompt=2",
                  f"++data.validation_path={val_file}"]  # fmt: skip
    run_dir, log = run_learner(tmp_path, tiny_model_dir, redis_url, run_name, 1, *validation)

    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = [m for m in records if "loss/total" in m]
    passes = [m for m in records if "val/accuracy" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all(m["rollout/groups"] == 4 for m in steps)  # validation groups never join a training step
    assert sorted(m["val/policy_version"] for m in passes) == [0, 2, 3]
    for m in passes:
        assert m["val/prompts"] == 5 and m["val/samples"] == 10
        assert 0.0 <= m["val/accuracy"] <= 1.0 and m["val/sampled_version_mean"] >= m["val/policy_version"]
    trained = [g for rec in read_jsonl(run_dir / "ledger.jsonl") for g in rec["trained"]]
    assert trained and not any("-val" in g for g in trained)
    assert "validation of version 3: accuracy" in log
