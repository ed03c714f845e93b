"""training/schedule.py: the one warmup + cosine learning rate (bit-identical to each trainer's former formula)
and the time budget."""
from __future__ import annotations

import math

import pytest
import torch

from hyperlora.training.schedule import TimeBudget, warmup_cosine_lr

GRID = [(lr, steps, warmup) for lr in (1e-3, 3e-4, 2e-3, 7.7e-4) for steps in (1, 7, 60, 400)
        for warmup in (0, 1, 5, 20, 50)]


def _former_sft(step, lr, steps, warmup):  # sft._lr_at (also reconstruct and multitask_lora), as it was
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _former_reader(step, lr, steps, warmup):  # reader_train._lr_factor times the group's base rate
    f = min(1.0, (step + 1) / max(1, warmup)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps))))
    return lr * f


@pytest.mark.parametrize("lr,steps,warmup", GRID)
def test_both_forms_are_bit_identical_to_the_former_formulas(lr, steps, warmup):
    for s in range(steps):
        assert warmup_cosine_lr(s, lr, steps, warmup) == _former_sft(s, lr, steps, warmup), s
        assert warmup_cosine_lr(s, lr, steps, warmup, overlap=True) == _former_reader(s, lr, steps, warmup), s


@pytest.mark.parametrize("lr,steps", [(2e-3, 60), (1e-3, 60), (2e-2, 40), (1e-3, 7), (5e-4, 400)])
def test_oracle_form_is_bit_identical_to_its_former_lambda_scheduler(lr, steps):
    """train_policy_lora used LambdaLR(min(1, (s+1)/5) * 0.5 * (1 + cos(pi * s / steps))): same floats."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 5) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    for s in range(steps):
        assert warmup_cosine_lr(s, lr, steps, 5, floor=0.0, overlap=True, angle_pi_step_first=True) \
            == opt.param_groups[0]["lr"], s
        opt.step()
        sched.step()


def test_shape_warmup_peak_and_floor():
    lrs = [warmup_cosine_lr(s, 1.0, 100, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear ramp to the peak
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then never rising
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)  # to the floor
    assert warmup_cosine_lr(500, 1.0, 100, 10) == pytest.approx(0.1)  # past the end: stays at the floor


@pytest.mark.parametrize("kw,match", [({"steps": 0}, "steps > 0"), ({"warmup": -1}, "warmup >= 0"),
                                      ({"floor": 1.5}, "floor in")])
def test_bad_arguments_are_clear_errors(kw, match):
    args = {"step": 0, "base": 1e-3, "steps": 10, "warmup": 2, **kw}
    floor = args.pop("floor", 0.1)
    with pytest.raises(ValueError, match=match):
        warmup_cosine_lr(args["step"], args["base"], args["steps"], args["warmup"], floor=floor)


def test_time_budget_counts_resumed_seconds_and_none_never_ends():
    now = [100.0]
    clock = lambda: now[0]  # noqa: E731
    b = TimeBudget(10.0, elapsed_s=4.0, clock=clock)
    assert b.elapsed() == 4.0 and not b.exhausted()
    now[0] = 106.0
    assert b.elapsed() == 10.0 and not b.exhausted()  # "more than" the budget ends it
    now[0] = 106.5
    assert b.exhausted()
    for off in (None, 0):
        nb = TimeBudget(off, clock=clock)
        now[0] += 1e6
        assert not nb.exhausted()
    with pytest.raises(ValueError, match="time_budget_s"):
        TimeBudget(-1.0)
