"""learner/optim.py: stochastic rounding is unbiased and exact on representable values, StochasticAdamW is torch's
AdamW in float32, and small bfloat16 updates survive in expectation where torch's AdamW drops them."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from learner.config import PolicyConfig
from learner.optim import StochasticAdamW, random_bits, stochastic_round


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values just below-or-at and just above `x` (float32, finite, positive and negative)."""
    low = (x.view(torch.int32) & -(1 << 16)).view(torch.float32)  # truncation: towards zero
    high = ((x.view(torch.int32) & -(1 << 16)) + (1 << 16)).view(torch.float32)  # one bf16 step away from zero
    return low, high


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    # magnitudes from 1e-6 to 1e3, both signs: the rounding works on the bit pattern, so every binade is alike
    x = torch.randn(2000) * torch.logspace(-6, 3, 2000)
    draws = torch.stack([stochastic_round(x, torch.bfloat16).float() for _ in range(4096)])  # [K, n]
    low, high = _neighbours(x)
    ulp = (high - low).abs()
    assert bool(((draws == low) | (draws == high)).all()), "only the two neighbours are ever chosen"
    error = (draws.mean(0) - x) / ulp  # in units of the gap; one draw's std is <= 0.5, the mean's <= 0.5/64
    assert float(error.abs().max()) < 0.05
    assert abs(float(error.mean())) < 0.003  # no drift in aggregate either
    # the probability of rounding away from zero is the distance covered: a value 1/4 of the way goes up 1/4
    quarter = low[:1] + (high[:1] - low[:1]) / 4
    ups = torch.stack([stochastic_round(quarter, torch.bfloat16).float() for _ in range(20000)]) == high[:1]
    assert float(ups.float().mean()) == pytest.approx(0.25, abs=0.015)


def test_one_draw_gives_three_independent_uniform_noises():
    torch.manual_seed(0)
    noises = torch.stack(random_bits(torch.empty(1 << 18), 3)).double()  # [3, n]
    assert float(noises.min()) == 0 and float(noises.max()) == (1 << 16) - 1
    assert float(noises.mean(1).sub(((1 << 16) - 1) / 2).abs().max()) < 150  # std of the mean: ~36
    corr = torch.corrcoef(noises)
    assert float((corr - torch.eye(3, dtype=corr.dtype)).abs().max()) < 0.01


def test_representable_values_stay_exact():
    special = [0.0, -0.0, 1.0, -2.5, 3.0e38, -3.0e38, 1e-40, float("inf"), float("-inf")]
    x = torch.cat([torch.randn(1000).to(torch.bfloat16).float(), torch.tensor(special).to(torch.bfloat16).float()])
    for _ in range(50):
        out = stochastic_round(x, torch.bfloat16)
        assert torch.equal(out.float().view(torch.int32), x.view(torch.int32)), "bit-exact, signed zeros included"
    nan = stochastic_round(torch.full((1000,), float("nan")), torch.bfloat16)
    assert bool(nan.isnan().all())
    assert stochastic_round(x, torch.float32) is x


def test_float32_parameters_follow_torch_adamw():
    torch.manual_seed(0)
    shapes = [(300, 7), (1000,), (5, 5)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    kw = {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}
    a, b = StochasticAdamW(ours, **kw), torch.optim.AdamW(theirs, foreach=False, **kw)
    for _ in range(4):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a.state[p][key], b.state[q][key], rtol=1e-6, atol=1e-9)
    assert float(a.state[ours[0]]["step"]) == 4.0


def test_small_bfloat16_updates_survive_in_expectation():
    """lr 1e-6 on weights in [0.5, 1) (a bfloat16 gap of 2^-8): torch's AdamW never moves them; ours moves the
    mean by what float32 AdamW does, within the rounding noise (~1 % of it over 2^20 weights and 5 steps)."""
    torch.manual_seed(0)
    n, steps = 1 << 20, 5
    w0 = (0.5 + torch.rand(n) / 2).to(torch.bfloat16)
    grads = [torch.randn(n) for _ in range(steps)]
    ref = w0.float().requires_grad_()
    plain, sr = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    kw = {"lr": 1e-6, "weight_decay": 0.01}
    opts = [torch.optim.AdamW([ref], **kw), torch.optim.AdamW([plain], **kw), StochasticAdamW([sr], **kw)]
    for g in grads:
        for p, opt in zip((ref, plain, sr), opts, strict=True):
            p.grad = g.to(p.dtype)
            opt.step()
    moved = (ref.detach() - w0.float()).abs().mean()
    direction = torch.sign(ref.detach() - w0.float())

    def progress(p: torch.Tensor) -> float:
        return float(((p.detach().float() - w0.float()) * direction).mean() / moved)

    assert torch.equal(plain.detach(), w0), "round-to-nearest drops every update below half a gap"
    assert progress(plain) == 0.0
    assert progress(sr) == pytest.approx(1.0, abs=0.05)
    # the second moment decays as in float32 too (round-to-nearest could never lower a bfloat16 0.999 * v)
    v_ref, v_sr = opts[0].state[ref]["exp_avg_sq"], opts[2].state[sr]["exp_avg_sq"]
    assert v_sr.dtype == torch.bfloat16
    assert float(v_sr.float().mean() / v_ref.mean()) == pytest.approx(1.0, abs=0.01)


def test_rounding_is_reproducible_per_step_and_leaves_the_callers_rng_alone():
    """Replicas with the same gradients round the same way (data parallel stays bit-identical), and a step does
    not move the global generator (the learner's other random streams)."""
    torch.manual_seed(0)
    w0, grads = torch.randn(4096).to(torch.bfloat16), [torch.randn(4096) for _ in range(3)]
    replicas = [w0.clone().requires_grad_() for _ in range(2)]
    opts = [StochasticAdamW([p], lr=1e-3) for p in replicas]
    other = StochasticAdamW([w1 := w0.clone().requires_grad_()], lr=1e-3, seed=1)
    for g in grads:
        for p, opt in zip((*replicas, w1), (*opts, other), strict=True):
            p.grad = g.to(torch.bfloat16)
            before = torch.get_rng_state()
            opt.step()
            assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(replicas[0], replicas[1])
    assert not torch.equal(replicas[0], w1), "another seed draws other bits"


def test_rejects_other_dtypes():
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        StochasticAdamW([torch.zeros(3, dtype=torch.float16, requires_grad=True)])


def test_master_weights_knob():
    policy = PolicyConfig(model_name="m", precision="bfloat16", master_weights="bfloat16")
    assert PolicyConfig(model_name="m").master_weights == "float32"
    assert PolicyConfig.model_validate(policy.model_dump()).master_weights == "bfloat16"
    with pytest.raises(ValidationError, match="needs policy.precision bfloat16"):
        PolicyConfig(model_name="m", master_weights="bfloat16")
