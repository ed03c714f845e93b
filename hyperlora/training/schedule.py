"""The training loops' schedule helpers: the warmup + cosine learning rate, and the wall-clock budget.

Every trainer of ``hyperlora train`` (sft, reconstruct, reader, multitask_lora) and the oracle LoRA
(``training/oracle.py``) takes its learning rate from `warmup_cosine_lr`; sft, reconstruct, reader and
multitask_lora stop on a `TimeBudget`.
"""
from __future__ import annotations

import math
import time
from typing import Callable

__all__ = ["warmup_cosine_lr", "TimeBudget"]


def warmup_cosine_lr(step: int, base: float, steps: int, warmup: int, *, floor: float = 0.1,
                     overlap: bool = False, angle_pi_step_first: bool = False) -> float:
    """The learning rate of 0-based `step` of `steps`: a linear warmup over `warmup` steps, then a cosine
    from `base` down to `floor * base`.

    overlap=False (sft, reconstruct, multitask_lora): the warmup ramps ``base * (step + 1) / warmup`` and the
    cosine runs over the steps after it. overlap=True (reader, oracle LoRA): the warmup factor
    ``min(1, (step + 1) / warmup)`` multiplies a cosine that runs over all `steps` from step 0.
    angle_pi_step_first (oracle LoRA only): the cosine's angle is rounded as ``(pi * step) / steps`` instead of
    ``pi * (step / steps)``; the two differ in the last bit for some steps, and the oracle always used the former.
    The arithmetic of each form is the one its trainers always used (bit-identical learning rates).
    """
    if steps <= 0:
        raise ValueError(f"warmup_cosine_lr needs steps > 0, got {steps}")
    if warmup < 0:
        raise ValueError(f"warmup_cosine_lr needs warmup >= 0, got {warmup}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"warmup_cosine_lr needs floor in [0, 1], got {floor}")
    if overlap:
        ramp = min(1.0, (step + 1) / max(1, warmup))
        angle = math.pi * min(step, steps) / steps if angle_pi_step_first else math.pi * min(1.0, step / steps)
        return base * (ramp * (floor + (1.0 - floor) * 0.5 * (1 + math.cos(angle))))
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return base * (floor + (1.0 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


class TimeBudget:
    """Wall-clock training budget. ``elapsed_s``: seconds already trained (a resumed run's), counted against it.

    `exhausted()` is True once more than `budget_s` seconds have been trained (never with budget_s None or 0).
    `elapsed()` is the seconds trained so far, resumed time included (what checkpoints record)."""

    def __init__(self, budget_s: float | None, elapsed_s: float = 0.0, clock: Callable[[], float] = time.time):
        if budget_s is not None and budget_s < 0:
            raise ValueError(f"time_budget_s must be >= 0 or null, got {budget_s}")
        self.budget_s = budget_s
        self._clock = clock
        self._start = clock() - float(elapsed_s)

    def elapsed(self) -> float:
        """Seconds trained so far (including the resumed run's)."""
        return self._clock() - self._start

    def exhausted(self) -> bool:
        """Whether the budget is spent (False without a budget)."""
        return bool(self.budget_s) and self.elapsed() > self.budget_s  # type: ignore[operator]
