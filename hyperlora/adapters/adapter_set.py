"""A set of P per-policy LoRA adapters stacked per module: what the eval adapter sources return, what
``hyperlora.adapters.functional.apply_lora`` applies per batch row, and what the policy reader hands out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

__all__ = ["AdapterSet"]


@dataclass
class AdapterSet:
    """P adapters on named Linear modules: name -> (A [P, R, d_in], B [P, d_out, R]); scale float or [P]."""

    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float | torch.Tensor = 1.0

    @property
    def count(self) -> int:
        return int(next(iter(self.modules.values()))[0].shape[0]) if self.modules else 0
