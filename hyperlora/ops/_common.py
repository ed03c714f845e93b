"""Helpers the ops share (one copy each): accumulation dtype, graph-capture test, backend choice.

    acc_dtype(x.dtype)          float64 for float64 inputs, float32 for every other (half, bfloat16, float32...)
    capturing()                 True while torch.compile traces or a CUDA graph captures: no host syncs then
    pick_backend(None, device)  the backend an op runs with (auto on a GPU: triton > cuda > torch)
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from hyperlora.ops.backends import BACKENDS, available_backends, resolve_backend

__all__ = ["acc_dtype", "capturing", "pick_backend", "AUTO_GPU_ORDER"]

# Automatic choice on a GPU: Triton first. Its semantics are verified in the interpreter on every CI run, and
# its kernels use tensor cores; the CUDA kernels are compiled in CI but have not yet been executed on a GPU
# (see docs/KERNELS.md). Forcing backend="cuda" or HYPERLORA_BACKEND=cuda still selects them.
AUTO_GPU_ORDER = ("triton", "cuda")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype LoRA products accumulate in: float64 for float64 inputs, else float32 (half, bfloat16 and any
    narrower float accumulate in float32, never in their own dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def capturing() -> bool:
    """True while torch.compile traces or the current CUDA stream captures a graph: ops must not read device
    values on the host (no validation syncs, no measured timings) then."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def pick_backend(requested: Optional[str], device: Any, supported: tuple[str, ...] = BACKENDS) -> str:
    """`resolve_backend`, except that automatic selection on a GPU tries `AUTO_GPU_ORDER` (Triton before the
    CUDA extension), then torch. A requested backend, or HYPERLORA_BACKEND, is taken as `resolve_backend`
    takes it (validated, ValueError / BackendUnavailableError naming the problem)."""
    if requested is None and not os.environ.get("HYPERLORA_BACKEND") and getattr(device, "type", str(device)) == "cuda":
        status = available_backends()
        for name in AUTO_GPU_ORDER:
            if name in supported and status[name]["available"]:
                return name
        return "torch"
    return resolve_backend(requested, device, supported)
