"""bfloat16 master weights on a real tiny Qwen3 (`policy.master_weights`, learner/optim.py): at lr 1e-6 torch's AdamW
leaves the weights where they are while StochasticAdamW follows float32 AdamW in expectation; the knob reaches
the learner from a run config and survives a checkpoint; the compiled update agrees with the eager one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learner.batch import assemble
from learner.checkpoint import load_checkpoint, save_checkpoint
from learner.distributed import DistInfo
from learner.optim import StochasticAdamW
from learner.train import build_trainer, load_model
from rlq.config import load_run_config
from tests.integration.learner_support import random_train_samples

REPO = Path(__file__).resolve().parents[2]
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def lm_gradients(model: torch.nn.Module, seed: int = 0) -> list[torch.Tensor]:
    """Gradients of a language-model loss on random tokens: a real, unevenly scaled gradient for every weight."""
    ids = torch.randint(3, 300, (4, 24), generator=torch.Generator().manual_seed(seed))
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def test_stochastic_adamw_follows_float32_adamw_where_torch_adamw_stalls(tiny_model_dir):
    """Five steps at lr 1e-6 with the same gradients: float32 AdamW (the reference trajectory), torch's AdamW on
    bfloat16 weights, ours on bfloat16 weights. Progress = mean displacement along the reference's, over ~0.85M
    weights (1.0 = the reference's; the rounding noise is ~1 % of it)."""
    torch.manual_seed(0)
    model = load_model(tiny_model_dir, "bfloat16", torch.device("cpu"))
    grads = lm_gradients(model)
    w0 = [p.detach().float().clone() for p in model.parameters()]
    ref = [w.clone().requires_grad_() for w in w0]
    plain = [p.detach().clone().requires_grad_() for p in model.parameters()]
    sr = [p.detach().clone().requires_grad_() for p in model.parameters()]
    kw = {"lr": 1e-6, "weight_decay": 0.01}
    runs = [(ref, torch.optim.AdamW(ref, **kw)), (plain, torch.optim.AdamW(plain, **kw)),
            (sr, StochasticAdamW(sr, **kw))]  # fmt: skip
    changed_after_one = {}
    for step in range(5):
        for params, opt in runs:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.to(p.dtype)
            opt.step()
            if step == 0:
                changed_after_one[id(params)] = sum(int((p != w).sum()) for p, w in zip(params, w0, strict=True))
    total = sum(w.numel() for w in w0)
    delta_ref = [r.detach() - w for r, w in zip(ref, w0, strict=True)]
    moved = sum(float(d.abs().sum()) for d in delta_ref)

    def progress(params: list[torch.Tensor]) -> float:
        along = sum(float(((p.detach().float() - w) * torch.sign(d)).sum())
                    for p, w, d in zip(params, w0, delta_ref, strict=True))  # fmt: skip
        return along / moved

    assert changed_after_one[id(ref)] > 0.99 * total
    assert changed_after_one[id(plain)] < 0.1 * total, "bfloat16 round-to-nearest drops nearly every update"
    assert progress(plain) < 0.1
    assert progress(sr) == pytest.approx(1.0, abs=0.05)


def _config(tmp_path: Path, model_dir: Path, *overrides: str):
    run = load_run_config(
        REPO / "configs" / "tiny_arith_cpu.yaml",
        [f"policy.model_name={model_dir}", "policy.precision=bfloat16", "broker.url=redis://127.0.0.1:1/0",
         f"data.path={tmp_path}", "policy.optimizer.kwargs.lr=1e-3", "policy.train_micro_batch_size=4", *overrides],
    )  # fmt: skip
    return run.learner_config()


def test_master_weights_knob_reaches_the_learner_and_survives_a_checkpoint(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, "policy.master_weights=bfloat16")
    assert cfg.policy.master_weights == "bfloat16"
    trainer, tokenizer = build_trainer(cfg, CPU, None)
    assert isinstance(trainer.optimizer, StochasticAdamW)
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters())
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train(assemble(random_train_samples(), 1, None)[0])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    path = save_checkpoint(tmp_path / "ckpt", 1, trainer.model, tokenizer, trainer.optimizer_state(),
                           {"version": 1, "collector": {}}, b"")  # fmt: skip

    resumed, _ = build_trainer(cfg, CPU, path)
    _, _, optimizer_state = load_checkpoint(path)
    resumed.load_optimizer_state(optimizer_state)
    for p, q in zip(trainer.model.parameters(), resumed.model.parameters(), strict=True):
        assert q.dtype == torch.bfloat16 and torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            saved, restored = trainer.optimizer.state[p][key], resumed.optimizer.state[q][key]
            assert restored.dtype == torch.bfloat16 and torch.equal(saved, restored)
        assert float(resumed.optimizer.state[q]["step"]) == 1.0
    resumed.train(assemble(random_train_samples(seed=1), 1, None)[0])  # and it trains on
    assert float(resumed.optimizer.state[next(resumed.model.parameters())]["step"]) == 2.0

    default = _config(tmp_path, tiny_model_dir)  # float32 master weights stay the default
    trainer32, _ = build_trainer(default, CPU, None)
    assert isinstance(trainer32.optimizer, torch.optim.AdamW)
    assert all(p.dtype == torch.float32 for p in trainer32.model.parameters())


@pytest.mark.slow
def test_compiled_update_matches_the_eager_one(tiny_model_dir):
    """torch.compile of the per-tensor update (what CUDA runs) on CPU: float32 weights (no rounding) equal the
    eager result, bfloat16 weights move the same way in expectation."""
    model = load_model(tiny_model_dir, "float32", torch.device("cpu"))
    grads = lm_gradients(model)
    for dtype, check in ((torch.float32, "exact"), (torch.bfloat16, "mean")):
        w0 = [p.detach().to(dtype) for p in model.parameters()]
        eager, compiled = ([w.clone().requires_grad_() for w in w0] for _ in range(2))
        opts = [StochasticAdamW(eager, lr=1e-5, compile=False), StochasticAdamW(compiled, lr=1e-5, compile=True)]
        for _ in range(3):
            for params, opt in zip((eager, compiled), opts, strict=True):
                for p, g in zip(params, grads, strict=True):
                    p.grad = g.to(dtype)
                opt.step()
        if check == "exact":
            for a, b in zip(eager, compiled, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
            continue
        mean_move = [sum(float((p.detach().float() - w.float()).sum()) for p, w in zip(ps, w0, strict=True))
                     for ps in (eager, compiled)]  # fmt: skip
        scale = sum(float((p.detach().float() - w.float()).abs().sum()) for p, w in zip(eager, w0, strict=True))
        assert abs(mean_move[0] - mean_move[1]) < 0.05 * scale
