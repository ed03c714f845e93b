"""What every benchmark shares: the machine it ran on (results are only comparable on the same one), the
suite's size and thread options, the GPU timer, and the measured roofline (copy bandwidth, GEMM rate)."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable, Iterable

import pytest
import torch

from hyperlora.ops.backends import available_backends


def env_positive_int(name: str, default: int) -> int:
    """The positive integer in environment variable ``name`` (``default`` when unset or blank); anything else
    stops the run with a pytest usage error naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise pytest.UsageError(f"{name}={raw!r}: expected a positive integer") from None
    if v < 1:
        raise pytest.UsageError(f"{name} must be >= 1, got {v}")
    return v

SIZES = ("quick", "full")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Platform, versions, threads, CPU model, 1-minute load average (shared machines skew CPU timings)
    and, for a CUDA device, the GPU's name and Triton's version."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count(), "cpu": cpu_model()}
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = round(os.getloadavg()[0], 2)
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" or dev is None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(dev)
        try:
            import triton  # optional dependency

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def bench_size(config: Any) -> str:
    """The suite's size: --bench-size, else BENCH_SIZE, else 'quick'. An unknown value raises ValueError."""
    opt = config.getoption("--bench-size", None) if config is not None else None
    size = opt or os.environ.get("BENCH_SIZE", "").strip() or "quick"
    if size not in SIZES:
        raise ValueError(f"benchmark size {size!r}: expected one of {', '.join(SIZES)} (--bench-size / BENCH_SIZE)")
    return size


def cuda_sync_timer() -> float:
    """Wall time after the current CUDA stream finished: pytest-benchmark reads it before and after a round
    of back-to-back calls, so a round is timed from launch to completion, without a sync per call."""
    torch.cuda.synchronize()
    return time.perf_counter()


def _median_time(fn: Callable[[], object], reps: int, clock: Callable[[], float], cuda: bool) -> float:
    fn()
    out = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = clock()
        fn()
        if cuda:
            torch.cuda.synchronize()
        out.append(clock() - t0)
    return statistics.median(out)


def measure_roofline(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Copy bandwidth (bytes read + written per second) and dense GEMM FLOP/s on this device now: CPU a
    64 MiB float32 copy (> L3) and a float32 2048^3 GEMM; GPU a 1 GiB copy and an 8192^3 GEMM in `dtype`
    (bfloat16 for float32). On the CPU with one torch thread it uses process CPU time, as the benchmarks do."""
    cuda = device.type == "cuda"
    clock = time.process_time if not cuda and torch.get_num_threads() == 1 else time.perf_counter
    n = (1 << 28) if cuda else (1 << 24)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t_copy = _median_time(lambda: dst.copy_(src), 7, clock, cuda)
    bw = 2 * src.numel() * src.element_size() / t_copy
    del src, dst
    m, gdt = (8192, dtype if dtype != torch.float32 else torch.bfloat16) if cuda else (2048, torch.float32)
    p, q = torch.randn(m, m, device=device, dtype=gdt), torch.randn(m, m, device=device, dtype=gdt)
    t_mm = _median_time(lambda: torch.mm(p, q), 5, clock, cuda)
    return {"copy_GBps": bw / 1e9, "gemm_TFLOPs": 2 * m ** 3 / t_mm / 1e12, "gemm_dtype": str(gdt).replace("torch.", "")}


def roofline_seconds(nbytes: float, flops: float, roof: dict[str, Any]) -> float:
    """max(bytes / copy bandwidth, FLOPs / GEMM rate): the fastest this work could run on the device."""
    return max(nbytes / (roof["copy_GBps"] * 1e9), flops / (roof["gemm_TFLOPs"] * 1e12))


def require_backend(name: str, device: str) -> None:
    """Skip the calling benchmark, with hyperlora's reason, when op backend `name` cannot run on `device`."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
    st = available_backends().get(name)
    if st is None:
        pytest.skip(f"unknown backend {name!r}: hyperlora knows {', '.join(available_backends())}")
    if not st.get("available"):
        pytest.skip(f"backend {name!r} unavailable: {st.get('reason') or st}")


def _median_of(group: dict[str, float], ref: Any, own: float) -> float | None:
    if ref == "self":
        return own
    if isinstance(ref, (list, tuple)):
        vals = [group[m] for m in ref if m in group]
        return min(vals) if len(vals) == len(ref) else None
    return group.get(ref)


def derive(benchmarks: Iterable[tuple[str | None, dict, float]]) -> None:
    """Fill each benchmark's comparisons into its extra_info (in place), from (group, extra_info, median)
    of every benchmark of the session: ratios between methods of the same group, and GB/s, TFLOP/s and the
    roofline fraction from bytes, flops and roofline_s. A ratio whose peer did not run here is None, and
    its peer is listed under `missing_peers`."""
    rows = [(g, ei, med) for g, ei, med in benchmarks if med and med > 0]
    groups: dict[str | None, dict[str, float]] = {}
    for g, ei, med in rows:
        if "method" in ei:
            groups.setdefault(g, {})[ei["method"]] = med
    for g, ei, med in rows:
        if "bytes" in ei:
            ei["GBps"] = ei["bytes"] / med / 1e9
        if "flops" in ei:
            ei["TFLOPs"] = ei["flops"] / med / 1e12
        if "roofline_s" in ei:
            ei["roofline_frac"] = ei["roofline_s"] / med
        missing = []
        for name, (num, den, *factor) in ei.get("ratios", {}).items():
            a, b = _median_of(groups.get(g, {}), num, med), _median_of(groups.get(g, {}), den, med)
            ei[name] = None if a is None or b is None else a / b * (factor[0] if factor else 1.0)
            if ei[name] is None:
                missing.append(name)
        if missing:
            ei["missing_peers"] = missing


def round_robin(benchmark: Any, fns: dict[str, Callable[[], object]], method: str, budget_s: float,
                max_rounds: int = 15, min_rounds: int = 5) -> int:
    """Time `fns[method]` as the former scripts' round robin did: pytest-benchmark's pedantic mode, one call
    per round, and before each timed call one untimed call of every other method of the case (its setup), so
    each method finds the caches as the others leave them, and load swings hit all methods alike. Rounds:
    as many as fit `budget_s` of whole rounds (all methods once, timed in the warm-up), within
    [min_rounds, max_rounds]. Returns the number of rounds."""
    if method not in fns:
        raise KeyError(f"method {method!r} is not one of {', '.join(fns)}")
    t0 = time.perf_counter()
    for fn in fns.values():  # warm-up (first-call set-up, kernel compilation), also sizes the rounds
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t_all = max(time.perf_counter() - t0, 1e-9)
    rounds = max(min_rounds, min(max_rounds, int(budget_s / t_all)))
    others = [f for k, f in fns.items() if k != method]

    def setup() -> None:
        for f in others:
            f()

    benchmark.extra_info["timing"] = ("round robin: each timed call follows one untimed call of every other "
                                      f"method ({', '.join(k for k in fns if k != method)})")
    benchmark.pedantic(fns[method], setup=setup, rounds=rounds, iterations=1)
    return rounds
