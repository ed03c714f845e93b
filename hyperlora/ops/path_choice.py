"""Cost model: apply a batch's generated adapters by the materialized path or the latent path?

Per layer shape and batch, both paths are costed from the bytes they move and the FLOPs they do, on a
roofline of the device (`time = max(bytes / bandwidth, flops / flop_rate) + fixed overheads`):

* materialized (`hyperlora.ops.add_lora`): reads each distinct adapter once, P * R * (d_in + d_out)
  elements, plus the activations; 2 * T * R * (d_in + d_out) FLOPs at the rate of skinny gathered GEMMs.
* latent (`hyperlora.ops.latent_lora`): reads the shared head once, R * K * (d_in + d_out) elements, plus the
  activations; 2 * T * R * K * (d_in + d_out) FLOPs as dense GEMMs.

So the latent path wins when many distinct policies share few tokens each (decode), and loses for
prefill-heavy batches with few policies. The device's bandwidth and FLOP rate are measured once per device
by a small calibration (~0.5 s on an idle CPU core, a few seconds on a loaded one; milliseconds on a GPU)
and cached for the process; `HYPERLORA_CALIBRATE=0` uses the defaults named
below instead (CPU, H100, H200, other GPUs). Close calls are then checked by timing both ops once per
shape bucket (`choose_path`). Every new decision is logged at debug level on the `hyperlora.ops.path_choice` logger.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch

from hyperlora.ops._common import capturing
from hyperlora.ops.metadata import build_meta
from hyperlora.ops.precision import cpu_has_native_bf16

# The op modules by name: `hyperlora.ops.add_lora` / `.latent_lora` as attributes are the functions (the package
# re-exports them), and calibration looks the ops up on the modules at call time.
_add_lora_mod = importlib.import_module("hyperlora.ops.add_lora")
_latent_lora_mod = importlib.import_module("hyperlora.ops.latent_lora")

__all__ = ["DeviceProfile", "PathCost", "PathChoice", "DEFAULT_PROFILES", "choose_path", "estimate",
           "device_profile", "calibrate", "PATHS"]

logger = logging.getLogger("hyperlora.ops.path_choice")
PATHS = ("materialized", "latent")


@dataclass(frozen=True)
class DeviceProfile:
    """Throughputs of one device, as the cost model sees it.

    bandwidth: bytes/s a streaming read reaches (what reading weights and activations costs).
    flops: FLOP/s of a dense GEMM in a 16-bit dtype; flops32 the same in float32 (float64 counts as half).
    latent_efficiency: fraction of the dense rates the latent op's two GEMMs and contractions reach.
    gather_efficiency: fraction of `flops` and `bandwidth` the materialized path's per-adapter skinny GEMMs
        reach on the adapters' bytes (activations stream at full bandwidth on both paths).
    launch_s: fixed cost of one kernel launch (informational); materialized_fixed_s / latent_fixed_s: fixed
        cost of one call of each op (launches, host-side work); segment_s: extra cost per distinct adapter in
        the materialized path (segment bookkeeping, a loop iteration on the CPU).
    """

    name: str
    bandwidth: float
    flops: float
    flops32: float
    gather_efficiency: float = 0.5
    latent_efficiency: float = 1.0
    launch_s: float = 5e-6
    segment_s: float = 0.0
    materialized_fixed_s: float = 1e-5
    latent_fixed_s: float = 1e-5
    source: str = "default"


# Defaults, used when calibration is off or fails. GPU figures: TOOLCHAIN.md (H100 ~3.0 TB/s copy, H200
# ~4.3 TB/s, ~790 TFLOP/s bf16 dense peak, of which skinny LoRA-shaped GEMMs reach roughly half; float32
# counted at the TF32-free CUDA-core rate). CPU: one thread of this project's 2-core AMD EPYC machines as
# calibrated on 2026-11-25 (benchmarks/results/latent_cpu_20261125_quick.json).
DEFAULT_PROFILES: dict[str, DeviceProfile] = {
    "cpu": DeviceProfile("cpu", bandwidth=25e9, flops=200e9, flops32=55e9, gather_efficiency=0.5,
                         latent_efficiency=1.0, launch_s=3e-6, segment_s=2e-6, materialized_fixed_s=3.5e-5,
                         latent_fixed_s=3e-5),
    "h100": DeviceProfile("NVIDIA H100", bandwidth=3.0e12, flops=400e12, flops32=50e12, gather_efficiency=0.4,
                          launch_s=4e-6, segment_s=0.0, materialized_fixed_s=8e-6, latent_fixed_s=8e-6),
    "h200": DeviceProfile("NVIDIA H200", bandwidth=4.3e12, flops=400e12, flops32=50e12, gather_efficiency=0.4,
                          launch_s=4e-6, segment_s=0.0, materialized_fixed_s=8e-6, latent_fixed_s=8e-6),
    "cuda": DeviceProfile("CUDA GPU", bandwidth=1.5e12, flops=150e12, flops32=20e12, gather_efficiency=0.4,
                          launch_s=5e-6, segment_s=0.0, materialized_fixed_s=1e-5, latent_fixed_s=1e-5),
}


@dataclass(frozen=True)
class PathCost:
    """Estimated bytes moved, FLOPs done and seconds taken by one path for one layer and batch."""

    bytes: float
    flops: float
    seconds: float


@dataclass(frozen=True)
class PathChoice:
    """The chosen path and both estimates (what the benchmarks report)."""

    path: str
    materialized: PathCost
    latent: PathCost
    profile: str
    measured: Optional[tuple[float, float]] = None  # (materialized, latent) seconds when a close call was timed

    @property
    def ratio(self) -> float:
        """Estimated time of the other path over the chosen one (>= 1)."""
        other = self.latent if self.path == "materialized" else self.materialized
        chosen = self.materialized if self.path == "materialized" else self.latent
        return other.seconds / max(chosen.seconds, 1e-30)


def _elem_size(dtype: Union[torch.dtype, int]) -> int:
    if isinstance(dtype, int):
        if dtype not in (2, 4, 8):
            raise ValueError(f"dtype as an element size must be 2, 4 or 8 bytes, got {dtype}")
        return dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype or an element size in bytes, got {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()


def _check_sizes(**sizes: int) -> None:
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"choose_path: {name} must be an int, got {type(v).__name__}")
        if v < 0 or (v == 0 and name not in ("tokens", "policies")):
            raise ValueError(f"choose_path: {name} must be {'>= 0' if name in ('tokens', 'policies') else '> 0'}, got {v}")


def estimate(tokens: int, policies: int, d_in: int, d_out: int, rank: int, latent_k: int, elem_size: int,
             profile: DeviceProfile) -> tuple[PathCost, PathCost]:
    """(materialized, latent) cost of applying `policies` distinct adapters to `tokens` rows of one layer.

    `latent_k` is K = latent_dim + 1 (folded bias). Activations (x read, y read + written) count on both
    paths; the [T, R] float32 intermediate counts twice (written, read back).
    """
    T, P, R, K = float(tokens), float(min(policies, max(tokens, 1))), float(rank), float(latent_k)
    flop_rate = profile.flops if elem_size == 2 else profile.flops32 / (elem_size // 4)
    act = elem_size * T * (d_in + 2 * d_out) + 8.0 * T * R
    # materialized: every distinct adapter's A and B, skinny per-segment GEMMs
    m_bytes = act + elem_size * P * R * (d_in + d_out)
    m_flops = 2.0 * T * R * (d_in + d_out)
    eff = profile.gather_efficiency
    m_stream = act / profile.bandwidth + (m_bytes - act) / (profile.bandwidth * eff)
    m_time = max(m_stream, m_flops / (flop_rate * eff)) + profile.materialized_fixed_s + P * profile.segment_s
    # latent: the shared head once, dense GEMMs with R*K columns, plus the per-slot latents
    l_bytes = act + elem_size * R * K * (d_in + d_out) + 4.0 * P * K
    l_flops = 2.0 * T * R * K * (d_in + d_out) + 4.0 * T * R * K
    l_eff = profile.latent_efficiency
    l_time = max(l_bytes / profile.bandwidth, l_flops / flop_rate) / l_eff + profile.latent_fixed_s
    return PathCost(m_bytes, m_flops, m_time), PathCost(l_bytes, l_flops, l_time)


@functools.lru_cache(maxsize=4096)
def _decide(tokens: int, policies: int, d_in: int, d_out: int, rank: int, latent_k: int, elem_size: int,
            profile: DeviceProfile) -> PathChoice:
    mat, lat = estimate(tokens, policies, d_in, d_out, rank, latent_k, elem_size, profile)
    path = "latent" if lat.seconds < mat.seconds else "materialized"
    choice = PathChoice(path, mat, lat, profile.name)
    logger.debug("dispatch: %s for T=%d P=%d d_in=%d d_out=%d R=%d K=%d (%dB) on %s: materialized %.3g us "
                 "(%.3g MB, %.3g GFLOP), latent %.3g us (%.3g MB, %.3g GFLOP)", path, tokens, policies, d_in,
                 d_out, rank, latent_k, elem_size, profile.name, mat.seconds * 1e6, mat.bytes / 1e6,
                 mat.flops / 1e9, lat.seconds * 1e6, lat.bytes / 1e6, lat.flops / 1e9)
    return choice


def choose_path(tokens: int, policies: int, d_in: int, d_out: int, rank: int, latent_k: int,
                dtype: Union[torch.dtype, int] = torch.bfloat16, *, device: Union[torch.device, str, None] = None,
                profile: Optional[DeviceProfile] = None) -> PathChoice:
    """Pick "materialized" or "latent" for one layer shape and batch; returns the choice and both estimates.

    Args:
        tokens: rows of the batch that carry a generated adapter (slot >= 0 and a latent).
        policies: distinct generated adapters among them.
        d_in, d_out, rank: the layer's shape and the adapters' rank R.
        latent_k: K = latent_dim + 1 of the hypernetwork head.
        dtype: the activations' / weights' dtype (or its element size in bytes).
        device: whose profile to use (calibrated once, cached); ignored when `profile` is given.
    Decisions are cached per (shape, batch, profile) and logged at debug level the first time. Close calls
    (estimates within 20x, both under 0.5 s) on a device are checked once per bucket (tokens and adapters
    rounded up to powers of two) by timing both ops on synthetic inputs; then `measured` holds those times
    and `path` follows them. `HYPERLORA_DISPATCH_MEASURE=0` turns the check off; an explicit `profile`
    (a what-if) never measures.
    """
    _check_sizes(tokens=tokens, policies=policies, d_in=d_in, d_out=d_out, rank=rank, latent_k=latent_k)
    prof = profile if profile is not None else device_profile(device)
    choice = _decide(tokens, policies, d_in, d_out, rank, latent_k, _elem_size(dtype), prof)
    if profile is None and isinstance(dtype, torch.dtype) and _should_measure(choice, tokens):
        dev = _device_of(device)
        key = (_bucket(tokens), min(_bucket(policies), _bucket(tokens)), d_in, d_out, rank, latent_k, dtype, str(dev))
        times = _measured(key)
        if times is not None:
            path = "latent" if times[1] < times[0] else "materialized"
            choice = dataclasses.replace(choice, path=path, measured=times)
    return choice


# --------------------------------------------------------------------------------------------------
# close calls: time both ops once per shape bucket
# --------------------------------------------------------------------------------------------------
# Estimates closer than this are checked by timing both ops. Wide on purpose: on a CPU the cost of the
# materialized op swings with its allocator's state (fresh gather buffers page-fault), which no roofline sees.
_MEASURE_RATIO = 20.0
_MEASURE_MAX_S = 0.5      # ... when both estimates are under this (bounds the one-off cost of a check, ~8 calls)
_MEASURED: dict[tuple, Optional[tuple[float, float]]] = {}
_MEASURE_LOCK = threading.Lock()


def _bucket(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _device_of(device: Union[torch.device, str, None]) -> torch.device:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _should_measure(choice: PathChoice, tokens: int) -> bool:
    if tokens == 0 or os.environ.get("HYPERLORA_DISPATCH_MEASURE", "1").strip().lower() in {"0", "false", "no", "off"}:
        return False
    if capturing():
        return False
    m, l = choice.materialized.seconds, choice.latent.seconds
    return max(m, l) < _MEASURE_MAX_S and max(m, l) / max(min(m, l), 1e-12) < _MEASURE_RATIO


def _measured(key: tuple) -> Optional[tuple[float, float]]:
    """(materialized, latent) seconds for a bucket, timed once (thread-safe), or None if it cannot be timed."""
    if key in _MEASURED:
        return _MEASURED[key]
    with _MEASURE_LOCK:
        if key not in _MEASURED:
            try:
                _MEASURED[key] = _time_both(*key)
            except Exception as exc:  # a failed check must never break a forward pass: keep the model's choice
                logger.warning("dispatch: timing both paths for %s failed (%s); using the cost model", key, exc)
                _MEASURED[key] = None
        return _MEASURED[key]


def _time_both(T: int, P: int, d_in: int, d_out: int, R: int, K: int, dtype: torch.dtype,
               device_key: str) -> Optional[tuple[float, float]]:
    """Median times of add_lora and latent_lora on synthetic inputs of this bucket (P adapters, T tokens spread
    evenly), called alternately with the caches flushed in between, as a forward over many layers sees them."""

    dev = torch.device(device_key)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dev, dtype)

    x, y = rnd(T, d_in), rnd(T, d_out)
    w_a, w_b, a, b = rnd(R * K, d_in), rnd(d_out, R * K), rnd(P, R, d_in), rnd(P, d_out, R)
    z = torch.randn(P, K, generator=g).to(dev)
    scales = torch.ones(P, device=dev)
    slots = (torch.arange(T) % P).to(dev, torch.int32)
    meta = build_meta(slots, P)
    flush = torch.empty((96 << 20) // 4 if dev.type == "cpu" else (128 << 20) // 4, device=dev)  # > LLC / L2
    fns = (lambda: _add_lora_mod.add_lora(y, x, a, b, slots, meta=meta),
           lambda: _latent_lora_mod.latent_lora(y, x, w_a, w_b, z, slots, scales, meta=meta))
    times: tuple[list[float], list[float]] = ([], [])
    with torch.no_grad():
        for fn in fns:  # warm up (and JIT-compile on a GPU)
            fn()
        for _ in range(3):
            for i, fn in enumerate(fns):
                flush.fill_(1.0)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times[i].append(time.perf_counter() - t0)
    out = (sorted(times[0])[1], sorted(times[1])[1])
    logger.debug("dispatch: timed T=%d P=%d d_in=%d d_out=%d R=%d K=%d %s on %s: materialized %.3g us, latent "
                 "%.3g us", T, P, d_in, d_out, R, K, dtype, device_key, out[0] * 1e6, out[1] * 1e6)
    return out


# --------------------------------------------------------------------------------------------------
# device profiles: defaults and calibration
# --------------------------------------------------------------------------------------------------
def _default_for(device: torch.device) -> DeviceProfile:
    if device.type != "cuda":
        return DEFAULT_PROFILES["cpu"]
    name = torch.cuda.get_device_name(device)
    for key in ("h200", "h100"):
        if key in name.lower():
            return DEFAULT_PROFILES[key]
    return dataclasses.replace(DEFAULT_PROFILES["cuda"], name=name)


def _best_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate(device: Union[torch.device, str, None] = None) -> DeviceProfile:
    """Measure bandwidth (a large streaming read), dense GEMM FLOP rates (16-bit, float32), launch overhead.

    Takes ~0.1-0.5 s on a CPU, milliseconds on a GPU. Efficiency factors and the per-segment cost keep
    their defaults for the device kind (they describe kernels, not the hardware).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    base = _default_for(dev)
    gpu = dev.type == "cuda"
    with torch.no_grad():
        # streaming reads (the LoRA ops' dominant traffic is reading weights); a copy's write-allocate traffic
        # made the figure swing 2-3x between runs on the shared CPU machines
        n_read = (128 << 20) // 4 if gpu else (48 << 20) // 4
        src = torch.empty(n_read, dtype=torch.float32, device=dev).uniform_()
        bw = src.numel() * 4 / _best_time(lambda: src.sum(), dev, 10)
        del src
        # a LoRA-like GEMM: a token block against a weight that does not fit in a CPU's cache (a small square
        # GEMM that does fit overstates a CPU's rate on real layers ~3x)
        m, k, n = (4096, 4096, 4096) if gpu else (256, 2048, 512)
        rates = {}
        for dt in (torch.bfloat16 if (gpu or cpu_has_native_bf16()) else torch.float32, torch.float32):
            a = torch.randn(m, k, device=dev).to(dt)
            b = torch.randn(n, k, device=dev).to(dt)
            rates[dt] = 2 * m * k * n / _best_time(lambda: a @ b.T, dev, 5)
        small = torch.ones(8, device=dev)
        launch = _best_time(lambda: small.add_(0.0), dev, 20)
    flops16 = max(rates.values())
    prof = dataclasses.replace(base, bandwidth=bw, flops=flops16, flops32=rates[torch.float32],
                               launch_s=max(launch, 1e-6), source="calibrated")
    if not gpu:  # on a GPU the ops' first calls would JIT-compile kernels: keep the defaults there
        prof = _calibrate_ops(dev, prof)
    logger.debug("dispatch: calibrated %s: %.1f GB/s, %.1f TFLOP/s (16-bit), %.1f TFLOP/s (fp32), launch %.1f us, "
                 "fixed materialized %.1f us + %.1f us/adapter at %.0f%% of the rates, fixed latent %.1f us at %.0f%%",
                 prof.name, bw / 1e9, flops16 / 1e12, prof.flops32 / 1e12, prof.launch_s * 1e6,
                 prof.materialized_fixed_s * 1e6, prof.segment_s * 1e6, 100 * prof.gather_efficiency,
                 prof.latent_fixed_s * 1e6, 100 * prof.latent_efficiency)
    return prof


def _calibrate_ops(dev: torch.device, prof: DeviceProfile) -> DeviceProfile:
    """Costs of the ops themselves, on top of the hardware's: the latent op at a tiny shape (fixed cost) and
    at a medium one (its fraction of the dense rates); the materialized op at a tiny shape with 1 and with
    64 distinct adapters (fixed cost, cost per adapter) and with 256 adapters of a 1024-wide layer, cache-cold
    (the rate it reads adapters at, `gather_efficiency`). What the roofline does not explain is overhead."""
    latent_lora = _latent_lora_mod.latent_lora
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dev)

    T, d, R, K = 64, 128, 8, 17
    x, y, w_a, w_b, z = rnd(T, d), rnd(T, d), rnd(R * K, d), rnd(d, R * K), rnd(T, K)
    one = torch.zeros(T, dtype=torch.int32, device=dev)
    many = torch.arange(T, dtype=torch.int32, device=dev)
    m_one, m_many = build_meta(one, T), build_meta(many, T)
    bare = dataclasses.replace(prof, materialized_fixed_s=0.0, latent_fixed_s=0.0, segment_s=0.0, latent_efficiency=1.0)
    Tm, dm, Km = 128, 1024, 33
    xm, ym, wam, wbm, zm = rnd(Tm, dm), rnd(Tm, dm), rnd(R * Km, dm), rnd(dm, R * Km), rnd(1, Km)
    slm = torch.zeros(Tm, dtype=torch.int32, device=dev)
    mm = build_meta(slm, 1)
    with torch.no_grad():
        t_lat = _best_time(lambda: latent_lora(y, x, w_a, w_b, z, one, meta=m_one), dev, 11)
        t_lat_m = _best_time(lambda: latent_lora(ym, xm, wam, wbm, zm, slm, meta=mm), dev, 5)
    _, e_lat = estimate(T, 1, d, d, R, K, 4, bare)
    _, e_lat_m = estimate(Tm, 1, dm, dm, R, Km, 4, bare)
    lat_fixed = max(t_lat - e_lat.seconds, 0.0)
    lat_eff = min(1.0, max(0.05, e_lat_m.seconds / max(t_lat_m - lat_fixed, 1e-9)))
    prof = dataclasses.replace(prof, latent_fixed_s=lat_fixed, latent_efficiency=lat_eff)
    add_lora = _add_lora_mod.add_lora
    a, b = rnd(T, R, d), rnd(T, d, R)
    # 256 adapters of a 1024-wide layer, one token each (decode), cycled through copies that overflow a CPU's
    # last-level cache, as the adapters of a model's successive layers do in a forward pass
    Pg = 256
    xg, yg = rnd(Pg, dm), rnd(Pg, dm)
    ag, bg = rnd(Pg, R, dm), rnd(Pg, dm, R)
    copies = [(ag, bg)] + [(ag.clone(), bg.clone()) for _ in range(3)]
    sg = torch.arange(Pg, dtype=torch.int32, device=dev)
    mg = build_meta(sg, Pg)
    turn = [0]

    def cold_many() -> None:
        turn[0] += 1
        ac, bc = copies[turn[0] % len(copies)]
        add_lora(yg, xg, ac, bc, sg, meta=mg)

    with torch.no_grad():
        t_one = _best_time(lambda: add_lora(y, x, a, b, one, meta=m_one), dev, 11)
        t_many = _best_time(lambda: add_lora(y, x, a, b, many, meta=m_many), dev, 9)
        for _ in range(2 * len(copies)):  # settle the allocator: the op's big temporaries must reach steady state
            cold_many()
        t_many_m = _best_time(cold_many, dev, 8)
    bare = dataclasses.replace(bare, gather_efficiency=1.0)
    e_one, _ = estimate(T, 1, d, d, R, K, 4, bare)
    e_many, _ = estimate(T, T, d, d, R, K, 4, bare)
    mat_fixed = max(t_one - e_one.seconds, 0.0)
    segment = max((t_many - e_many.seconds - mat_fixed) / (T - 1), 0.0)
    # the rate at which the materialized op reads its adapters
    act_s = (4.0 * Pg * 3 * dm + 8.0 * Pg * R) / prof.bandwidth
    adapters_s = 4.0 * Pg * R * 2 * dm / prof.bandwidth
    rest = t_many_m - mat_fixed - Pg * segment - act_s
    gather = min(1.0, max(0.02, adapters_s / rest)) if rest > 0 else 1.0
    return dataclasses.replace(prof, materialized_fixed_s=mat_fixed, segment_s=segment, gather_efficiency=gather)


@functools.lru_cache(maxsize=None)
def _profile_for(device_key: str) -> DeviceProfile:
    dev = torch.device(device_key)
    if os.environ.get("HYPERLORA_CALIBRATE", "1").strip().lower() in {"0", "false", "no", "off"}:
        return _default_for(dev)
    try:
        return calibrate(dev)
    except Exception as exc:  # a failed measurement must never break a forward pass
        logger.warning("dispatch: calibration on %s failed (%s); using default profile", dev, exc)
        return _default_for(dev)


def device_profile(device: Union[torch.device, str, None] = None) -> DeviceProfile:
    """The (calibrated once, then cached) profile of `device` (default: the CPU)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _profile_for(str(dev))
