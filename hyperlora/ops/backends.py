"""Which kernel backends exist here, and which one an op should use.

Backends: "torch" (reference, runs anywhere), "triton" (GPU, or the CPU under TRITON_INTERPRET=1),
"cuda" (the compiled extension hyperlora._C, GPU only). Auto-selection prefers cuda > triton > torch
for CUDA tensors and torch for CPU tensors. HYPERLORA_BACKEND forces one for every op.
"""
from __future__ import annotations

import functools
import os
from typing import Any

BACKENDS = ("torch", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run here; the message says why and how to get it."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip() in {"1", "true", "True"}


@functools.lru_cache(maxsize=None)
def triton_status() -> dict[str, Any]:
    """{"available", "version", "interpreter", "reason"} for the Triton backend."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return {"available": False, "version": None, "interpreter": False,
                "reason": f"triton is not importable ({exc}); install it with `pip install triton`"}
    import torch

    interp = triton_interpreting()
    if torch.cuda.is_available():
        return {"available": True, "version": triton.__version__, "interpreter": interp, "reason": ""}
    if interp:
        return {"available": True, "version": triton.__version__, "interpreter": True,
                "reason": "no GPU: kernels run in Triton's CPU interpreter (slow; for tests)"}
    return {"available": False, "version": triton.__version__, "interpreter": False,
            "reason": "no CUDA GPU is visible; Triton kernels need one (or TRITON_INTERPRET=1, set before "
                      "import, to run them slowly on the CPU for tests)"}


@functools.lru_cache(maxsize=None)
def cuda_status() -> dict[str, Any]:
    """{"built", "available", "archs", "reason", ...} for the compiled CUDA extension."""
    try:
        from hyperlora import _C  # type: ignore[attr-defined]  # optional: the compiled CUDA extension
    except ImportError as exc:
        return {"built": False, "available": False, "archs": [], "reason":
                f"the CUDA extension hyperlora._C is not built ({exc}); reinstall with nvcc on PATH or "
                "CUDA_HOME set, and without HYPERLORA_SKIP_CUDA_BUILD: `pip install --no-build-isolation .`"}
    archs = [a for a in str(getattr(_C, "cuda_archs", "")).split(";") if a]
    count, err = _C.device_count()
    import torch

    status = {"built": True, "archs": archs, "cuda_runtime_version": int(_C.cuda_runtime_version),
              "devices": int(count), "file": getattr(_C, "__file__", None)}
    if count == 0 or not torch.cuda.is_available():
        why = err or "torch sees no CUDA device"
        status.update(available=False, reason=f"extension built but no usable GPU: {why}")
    else:
        status.update(available=True, reason="")
    return status


def torch_status() -> dict[str, Any]:
    import torch

    return {"available": True, "version": torch.__version__, "reason": ""}


def available_backends() -> dict[str, dict[str, Any]]:
    """Status of every backend, as `hyperlora info` prints it."""
    return {"torch": torch_status(), "triton": triton_status(), "cuda": cuda_status()}


def require_backend(name: str) -> None:
    """Raise BackendUnavailableError (naming why and how to fix) unless `name` can run here."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    status = available_backends()[name]
    if not status["available"]:
        raise BackendUnavailableError(f"backend {name!r} is not available: {status['reason']}")


def resolve_backend(requested: str | None, device: Any, supported: tuple[str, ...] = BACKENDS) -> str:
    """The backend an op runs with: `requested`, else HYPERLORA_BACKEND, else the best for `device`.

    `supported` lists the backends the op implements; a forced one outside it raises ValueError.
    """
    forced = requested or os.environ.get("HYPERLORA_BACKEND") or None
    if forced is not None:
        forced = forced.strip().lower()
        if forced not in supported:
            raise ValueError(f"backend {forced!r} is not implemented for this op; choose from {supported}")
        require_backend(forced)
        if forced == "cuda" and getattr(device, "type", str(device)) != "cuda":
            raise BackendUnavailableError("backend 'cuda' needs CUDA tensors; these are on " + str(device))
        return forced
    if getattr(device, "type", str(device)) == "cuda":
        for name in ("cuda", "triton"):
            if name in supported and available_backends()[name]["available"]:
                return name
    return "torch"
