"""Keep an enclosing torch.autocast region from recasting the ops' internal matmuls.

The ops fix their own precision (inputs' dtype, float32 accumulation); under autocast a torch matmul inside
them would return bfloat16 and break in-place accumulation into a float32 output.
"""
from __future__ import annotations

import contextlib

import torch


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """autocast disabled for `device_type` if it is on, else a no-op context (the common, cheap case)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
