"""The per-step learning rate (learner/lr_schedule.py) and its config's bounds."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from learner.config import LRScheduleConfig
from learner.lr_schedule import lr_factor


def factors(total: int, **kwargs) -> list[float]:
    cfg = LRScheduleConfig(**kwargs)
    return [round(lr_factor(v, total, cfg), 6) for v in range(total + 1)]


def test_constant_is_one_after_warmup_and_warmup_ramps_up_to_it():
    assert factors(4) == [1.0] * 5
    assert factors(6, warmup_steps=4) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]


def test_linear_and_cosine_fall_from_one_to_the_final_ratio_at_the_last_step():
    assert factors(4, kind="linear") == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert factors(4, kind="linear", final_ratio=0.2) == [1.0, 0.8, 0.6, 0.4, 0.2]
    assert factors(4, kind="cosine") == [1.0, 0.853553, 0.5, 0.146447, 0.0]
    assert factors(6, kind="linear", warmup_steps=2) == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_factor(50, 10, LRScheduleConfig(kind="cosine", final_ratio=0.1)) == pytest.approx(0.1)  # past the end


def test_a_schedule_out_of_bounds_is_rejected():
    with pytest.raises(ValidationError):
        LRScheduleConfig(final_ratio=1.5)
    with pytest.raises(ValidationError):
        LRScheduleConfig(warmup_steps=-1)
    with pytest.raises(ValidationError):
        LRScheduleConfig(kind="step")


def test_the_trainer_applies_the_rate_to_every_parameter_group():
    from learner.step import Trainer

    trainer = Trainer.__new__(Trainer)  # set_lr only touches the optimizer
    first, second = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)
    trainer.optimizer = torch.optim.AdamW([{"params": [first]}, {"params": [second], "lr": 5.0}], lr=1.0)
    trainer.set_lr(0.25)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.25, 0.25]
