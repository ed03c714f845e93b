"""Glue to the CPU kernel extension `hyperlora._cpu` (csrc/cpu/): add_lora for decode-like batches.

The extension is a batched GEMV that streams each used adapter once (see csrc/cpu/add_lora_cpu.cpp);
the torch backend of `add_lora` calls it where it beats torch's ops (CPU tensors, float32/float16/
bfloat16, unit inner strides, few tokens per adapter) and keeps its torch paths everywhere else and
when the extension is not built. HYPERLORA_CPU_KERNEL=0 (read at import) or `set_enabled(False)`
turns it off, e.g. to time the torch paths against it.

Threads: one by default. HYPERLORA_CPU_KERNEL_THREADS=N (or `set_threads(N)`; 0 = torch.get_num_threads())
splits the segments over N std::threads, at most one per MIN_BYTES_PER_THREAD of adapters. It is opt-in
because on the shared 2-core machine it was measured here it did not help (float32, 64 adapters, d=4096:
1.62 ms on 2 threads vs 1.55 on one) and hurt badly when the second core was busy (bfloat16 d=1024:
3.5 ms vs 0.45: the join waits for a descheduled thread), as torch's own threads do there.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Optional, Sequence

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/cpu/add_lora_cpu.h: DType

# At least this many bytes of adapters per thread (starting a thread costs tens of µs).
MIN_BYTES_PER_THREAD = 2 << 20


def _env_threads() -> int:
    raw = os.environ.get("HYPERLORA_CPU_KERNEL_THREADS", "").strip() or "1"
    if not raw.isdigit():
        raise ValueError(f"HYPERLORA_CPU_KERNEL_THREADS must be an integer >= 0 (0 = torch.get_num_threads()), "
                         f"got {raw!r}")
    return int(raw)


_threads = _env_threads()

_enabled = os.environ.get("HYPERLORA_CPU_KERNEL", "1").strip().lower() not in {"0", "false", "no", "off"}


@functools.lru_cache(maxsize=None)
def status() -> dict[str, Any]:
    """{"built", "isa", "reason"} of the CPU kernel extension."""
    try:
        from hyperlora import _cpu  # type: ignore[attr-defined]  # optional: the compiled CPU kernel
    except ImportError as exc:
        return {"built": False, "isa": None, "reason":
                f"the CPU kernel extension hyperlora._cpu is not built ({exc}); add_lora uses torch ops on the "
                "CPU. Build it with a C++ compiler: `pip install --no-build-isolation -e .`"}
    return {"built": True, "isa": _cpu.isa(), "reason": "", "file": getattr(_cpu, "__file__", None)}


def available() -> bool:
    """True when the extension is built and enabled."""
    return _enabled and status()["built"]


def isa() -> str:
    """Which build of the kernel runs now: "avx2" or "generic" (call `available()` first)."""
    from hyperlora import _cpu  # type: ignore[attr-defined]  # optional: the compiled CPU kernel

    return _cpu.isa()


def set_enabled(flag: bool) -> bool:
    """Turn the kernel on or off for this process (the torch paths run instead); returns the old value."""
    global _enabled
    old, _enabled = _enabled, bool(flag)
    return old


def set_threads(n: int) -> int:
    """Threads for the kernel (1 = single-threaded, the default; 0 = torch.get_num_threads()); returns the
    old value."""
    global _threads
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"threads must be an int >= 0 (0 = torch.get_num_threads()), got {n!r}")
    old, _threads = _threads, n
    return old


def supports(x: torch.Tensor, ys: Sequence[torch.Tensor], as_: Sequence[torch.Tensor],
             bs: Sequence[torch.Tensor]) -> bool:
    """Whether the kernel can run on these (already validated) tensors: CPU, a supported dtype and inner
    strides 1 (row and slot strides, storage offsets and alignment are free)."""
    if not available() or x.device.type != "cpu" or x.dtype not in DTYPE_CODES:
        return False
    if x.shape[1] > 1 and x.stride(1) != 1:
        return False
    for y, a, b in zip(ys, as_, bs):
        if (y.shape[1] > 1 and y.stride(1) != 1) or (a.shape[2] > 1 and a.stride(2) != 1) or \
                (b.shape[2] > 1 and b.stride(2) != 1):
            return False
    return True


def add_lora_cpu(ys: Sequence[torch.Tensor], x: torch.Tensor, as_: Sequence[torch.Tensor],
                 bs: Sequence[torch.Tensor], scales: Optional[torch.Tensor], ranks: Optional[torch.Tensor],
                 token_ids: torch.Tensor, seg_slots: torch.Tensor, seg_starts: torch.Tensor,
                 seg_counts: torch.Tensor, num_segments: int) -> None:
    """In place, per slice: ys[i][t] += scale * (x[t] A_i[s,:r]^T) B_i[s,:,:r]^T over the first
    `num_segments` segments of build_meta's metadata (int32 CPU tensors). Call `supports` first.
    Runs on up to `set_threads`'s number of threads, one per >= MIN_BYTES_PER_THREAD of adapters."""
    from hyperlora import _cpu  # type: ignore[attr-defined]  # optional: the compiled CPU kernel

    code = DTYPE_CODES[x.dtype]
    sc = None if scales is None else scales.to(torch.float32).contiguous()
    rk = None if ranks is None else ranks.to(torch.int32).contiguous()
    meta = [t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()
            for t in (token_ids, seg_slots, seg_starts, seg_counts)]
    t_n, num_slots, d_in = x.shape[0], as_[0].shape[0], x.shape[1]
    max_threads = _threads or torch.get_num_threads()
    for y, a, b in zip(ys, as_, bs):
        work = int(num_segments) * a.shape[1] * (d_in + y.shape[1]) * x.element_size()
        threads = max(1, min(max_threads, work // MIN_BYTES_PER_THREAD))
        _cpu.add_lora(y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), a.data_ptr(), a.stride(0), a.stride(1),
                      b.data_ptr(), b.stride(0), b.stride(1), 0 if sc is None else sc.data_ptr(),
                      0 if rk is None else rk.data_ptr(), *(m.data_ptr() for m in meta), int(num_segments),
                      t_n, num_slots, a.shape[1], d_in, y.shape[1], code, threads)
