"""Whether bfloat16 autocast pays on a device.

On a CPU without native bfloat16 instructions (no AVX512-BF16 / AMX-BF16), autocast emulates bf16 and runs ~4x
*slower* than float32 (measured on the 2-core dev box, docs/TOOLCHAIN.md); on such CPUs every default that says
"bf16" falls back to float32. GPUs use bf16 where torch says the device supports it.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True if /proc/cpuinfo lists avx512_bf16 or amx_bf16 (False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16(device: torch.device | str) -> bool:
    """True if bfloat16 autocast is native (fast) on ``device``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        return cpu_has_native_bf16()
    return False


def use_bf16(requested: bool | None, device: torch.device | str) -> bool:
    """``requested`` if it is a bool (the user's explicit choice), else whether the device runs bf16 natively."""
    return native_bf16(device) if requested is None else bool(requested)
