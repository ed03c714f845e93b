"""Benchmark of hyperlora.ops.add_lora (many adapters in one batch) against its peers, same run, same data.

    pytest benchmarks/bench_add_lora.py                      # CPU, quick shapes (a minute or two)
    pytest benchmarks/bench_add_lora.py --bench-size full    # the full sweep below
    pytest benchmarks/bench_add_lora.py -m gpu               # GPU: triton and cuda backends, bfloat16

Methods (each its own benchmark; the methods of one shape share a pytest-benchmark group; timed round robin
as the former script did: each timed call follows one untimed call of every other method of the shape, see
_common.round_robin; back to back, the kernel found its adapters in L1/L2 and ran 2-3x faster than in the
old runs, while the peers did not change):
  per_adapter_loop    what PEFT does for mixed batches: for each adapter, mask its rows, x[m] A^T B^T, add back
  gather_bmm          gather each token's A and B (lora_a[slots]) and run two batched matmuls
  hyperlora_<be>      add_lora(..., backend=<be>, meta=meta) with the metadata built once per forward (shared
                      by every layer in the runtime, so outside the timing; `build_meta` is its own benchmark)
  hyperlora_torch_ops (CPU) the torch backend with the CPU kernel extension hyperlora._cpu turned off

Shapes (T tokens, P distinct adapters, rank r, hidden d; square layer): quick = decode and prefill shapes
that finish in minutes on a 2-core CPU (the old `--quick`); full = T (1..8192) x P (1, 8, 64, 256; P <= T)
x r (8, 16, 64) x d (1024, 4096). Tokens: with fewer than 16 tokens per adapter (decode) the adapters are
interleaved in random order, as requests sit in a decode batch; otherwise each adapter owns a contiguous run.

extra_info per benchmark: the shape, bytes = x + each used adapter once (r (d_in + d_out)) + y read and
written, FLOPs = 2 T r (d_in + d_out), roofline_s = max(bytes / copy bandwidth, FLOPs / GEMM rate) with
both measured in this session (conftest's cpu_roofline / gpu_roofline); after the run the conftest derives
GBps, TFLOPs, roofline_frac and speedup_vs_loop (the per-adapter loop's median / this median).

The decode-bound group (`test_decode_bound`, CPU, T = adapters, one token each, float32) says where CPU
decode time goes: read_adapters (a.sum() + b.sum(), the memory floor), bmm_pair (the torch backend's two
bmm alone), bmm_pair_m2 (the same with two rows per adapter: ~2x means compute-bound), hyperlora,
hyperlora_ops (CPU kernel off) and loop; every call takes the next of several adapter pools (together
larger than L3), so adapters come from DRAM as for a model's successive layers.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import pytest
import torch

from hyperlora.ops import _cpu_kernel
from hyperlora.ops.add_lora import add_lora
from hyperlora.ops.metadata import build_meta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py, however this file is loaded
from _common import bench_size, require_backend, roofline_seconds, round_robin  # noqa: E402

FULL = dict(tokens=[1, 16, 64, 256, 1024, 8192], adapters=[1, 8, 64, 256], ranks=[8, 16, 64], hidden=[1024, 4096])
# (T, P, r, d): decode shapes first (the CPU target: P = 64 in decode), then prefill
QUICK = [(64, 64, 16, 1024), (64, 64, 16, 4096), (1, 1, 16, 4096), (64, 8, 16, 1024), (256, 256, 8, 1024),
         (256, 64, 64, 1024), (1024, 8, 16, 1024), (1024, 1, 64, 4096)]
# the CPU decode target, also timed in bfloat16 and float16 (the CPU kernel's other dtypes)
DECODE_TARGET = [(64, 64, 16, 1024), (64, 64, 16, 4096)]
DECODE_BOUND = [(64, 16, 4096), (64, 16, 1024), (64, 16, 64)]  # (T = adapters, r, d)
GATHER_LIMIT_BYTES = 1 << 30
CPU_METHODS = ("per_adapter_loop", "gather_bmm", "hyperlora_torch", "hyperlora_torch_ops")
GPU_METHODS = ("per_adapter_loop", "gather_bmm", "hyperlora_triton", "hyperlora_cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------ peers
def per_adapter_loop(y, x, a, b, slots, scales):
    """PEFT's mixed-batch strategy: one masked sub-batch per adapter."""
    for s in torch.unique(slots).tolist():
        if s < 0:
            continue
        m = slots == s
        y[m] += ((x[m] @ a[s].t()) @ b[s].t()) * scales[s]
    return y


def gather_bmm(y, x, a, b, slots, scales):
    """Per-token gathered adapters and two bmm (all tokens have a slot in this benchmark)."""
    ag, bg = a.index_select(0, slots), b.index_select(0, slots)          # [T, r, d_in], [T, d_out, r]
    h = torch.bmm(x.unsqueeze(1), ag.transpose(1, 2)) * scales.index_select(0, slots).view(-1, 1, 1).to(x.dtype)
    y += torch.bmm(h, bg.transpose(1, 2)).squeeze(1)
    return y


def make_inputs(T: int, P: int, r: int, d: int, dtype: torch.dtype, device, seed: int = 0):
    """(y, x, a, b, slots, scales) for T tokens over P adapters of rank r on a d x d layer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(device=device, dtype=dtype)
    a = (torch.randn(P, r, d, generator=g) / d ** 0.5).to(device=device, dtype=dtype)
    b = (torch.randn(P, d, r, generator=g) / r ** 0.5).to(device=device, dtype=dtype)
    if T // P >= 16:    # prefill: each adapter's prompt is one contiguous run of tokens
        slots = torch.repeat_interleave(torch.arange(P), torch.full((P,), T // P))
        slots = torch.cat([slots, torch.randint(0, P, (T - slots.numel(),), generator=g)])
    else:               # decode: adapters interleaved in random order
        slots = torch.arange(T) % P
        slots = slots[torch.randperm(T, generator=g)]
    scales = (torch.rand(P, generator=g) + 0.5).to(device)
    y = torch.randn(T, d, generator=g).to(device=device, dtype=dtype)
    return y, x, a, b, slots.to(device), scales


def _without_cpu_kernel(fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        old = _cpu_kernel.set_enabled(False)
        try:
            return fn()
        finally:
            _cpu_kernel.set_enabled(old)
    return call


def method_fn(method: str, inputs, meta) -> Callable[[], object] | None:
    """The call that `method` times on these inputs, or None where it does not apply here."""
    y, x, a, b, slots, scales = inputs
    if method == "per_adapter_loop":
        return lambda: per_adapter_loop(y, x, a, b, slots, scales)
    if method == "gather_bmm":
        T, d_in, d_out, r = x.shape[0], a.shape[2], b.shape[1], a.shape[1]
        if T * r * (d_in + d_out) * x.element_size() > GATHER_LIMIT_BYTES:
            return None
        return lambda: gather_bmm(y, x, a, b, slots, scales)
    if method == "hyperlora_torch_ops":
        return _without_cpu_kernel(lambda: add_lora(y, x, a, b, slots, scales, backend="torch", meta=meta))
    be = method.removeprefix("hyperlora_")
    return lambda: add_lora(y, x, a, b, slots, scales, backend=be, meta=meta)


def shape_info(T: int, P: int, r: int, d: int, dtype: torch.dtype, slots: torch.Tensor, roof: dict) -> dict:
    """The shape, bytes moved, FLOPs and roofline time that extra_info records."""
    es = torch.empty((), dtype=dtype).element_size()
    used = int(torch.unique(slots).numel())
    nbytes = es * (T * d + used * r * (d + d) + 2 * T * d)
    flops = 2 * T * r * (d + d)
    return {"T": T, "adapters": P, "rank": r, "hidden": d, "dtype": str(dtype).replace("torch.", ""),
            "bytes": nbytes, "flops": flops, "roofline_s": roofline_seconds(nbytes, flops, roof),
            "roofline": roof}


def _sid(sh) -> str:
    return "-".join(f"{k}{v}" for k, v in zip(("T", "P", "r", "d"), sh))


def _cases(size: str, gpu: bool) -> list:
    if size == "full":
        shapes = [(t, p, r, d) for d in FULL["hidden"] for r in FULL["ranks"] for p in FULL["adapters"]
                  for t in FULL["tokens"] if p <= t]
    else:
        shapes = QUICK
    if gpu:
        return [pytest.param(sh, "bfloat16", m, id=f"{_sid(sh)}-bfloat16-{m}") for sh in shapes for m in GPU_METHODS]
    out = [pytest.param(sh, "float32", m, id=f"{_sid(sh)}-float32-{m}") for sh in shapes for m in CPU_METHODS]
    out += [pytest.param(sh, dt, m, id=f"{_sid(sh)}-{dt}-{m}") for dt in ("bfloat16", "float16")
            for sh in DECODE_TARGET for m in CPU_METHODS]
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.name == "test_add_lora_cpu":
        metafunc.parametrize("shape,dtype_name,method", _cases(bench_size(metafunc.config), gpu=False))
    elif metafunc.definition.name == "test_add_lora_gpu":
        metafunc.parametrize("shape,dtype_name,method", _cases(bench_size(metafunc.config), gpu=True))


ROUND_BUDGET_S = {"quick": 2.0, "full": 8.0}  # seconds of whole rounds per benchmark (the old script: 8 s per shape)


def _run(benchmark, shape, dtype_name: str, method: str, device: str, roof: dict, size: str) -> None:
    T, P, r, d = shape
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(T, P, r, d, dtype, device)
    meta = build_meta(inputs[4], P)
    methods = GPU_METHODS if device == "cuda" else CPU_METHODS
    fns = {m: f for m in methods if (f := method_fn(m, inputs, meta)) is not None
           and (device != "cuda" or not m.startswith("hyperlora_") or _backend_ok(m.removeprefix("hyperlora_")))}
    if method not in fns:
        pytest.skip(f"{method}: the gathered adapters would exceed {GATHER_LIMIT_BYTES >> 20} MiB")
    benchmark.group = f"add_lora {device} {dtype_name} T={T} P={P} r={r} d={d}"
    benchmark.extra_info.update(shape_info(T, P, r, d, dtype, inputs[4], roof), method=method, device=device,
                                ratios={"speedup_vs_loop": ["per_adapter_loop", "self"]})
    with torch.no_grad():
        round_robin(benchmark, fns, method, ROUND_BUDGET_S[size])


def _backend_ok(name: str) -> bool:
    try:
        require_backend(name, "cuda")
    except pytest.skip.Exception:
        return False
    return True


def test_add_lora_cpu(benchmark, shape, dtype_name, method, cpu_roofline, size):
    """add_lora's torch backend (with and without the CPU kernel) and the peers, on the CPU."""
    _run(benchmark, shape, dtype_name, method, "cpu", cpu_roofline, size)


@pytest.mark.gpu
def test_add_lora_gpu(benchmark, shape, dtype_name, method, gpu_roofline, size):
    """add_lora's Triton and CUDA backends and the peers, on the GPU."""
    if method.startswith("hyperlora_"):
        require_backend(method.removeprefix("hyperlora_"), "cuda")
    _run(benchmark, shape, dtype_name, method, "cuda", gpu_roofline, size)


@pytest.mark.parametrize("shape", [(64, 64, 16, 1024), (1024, 8, 16, 1024)], ids=_sid)
def test_build_meta_cpu(benchmark, shape):
    """The per-forward metadata build that the add_lora benchmarks leave out of their timing."""
    T, P, r, d = shape
    slots = make_inputs(T, P, r, d, torch.float32, "cpu")[4]
    benchmark.group = f"add_lora cpu float32 T={T} P={P} r={r} d={d}"
    benchmark.extra_info.update(T=T, adapters=P, rank=r, hidden=d, method="build_meta")
    benchmark(lambda: build_meta(slots, P))


# ------------------------------------------------------------------------------------------------ decode bound
DECODE_BOUND_METHODS = ("read_adapters", "bmm_pair", "bmm_pair_m2", "hyperlora", "hyperlora_ops", "loop")
POOLS = 4  # adapter pools cycled, together larger than the L3 cache at d = 4096


@pytest.mark.parametrize("method", DECODE_BOUND_METHODS)
@pytest.mark.parametrize("shape", DECODE_BOUND, ids=lambda s: f"T{s[0]}-r{s[1]}-d{s[2]}")
def test_decode_bound(benchmark, shape, method):
    """Where CPU decode time goes at T = adapters (one token each), adapters streamed from DRAM."""
    t, r, d = shape
    y, x, _, _, slots, scales = make_inputs(t, t, r, d, torch.float32, "cpu")
    pools = [make_inputs(t, t, r, d, torch.float32, "cpu", seed=i + 1)[2:4] for i in range(POOLS)]
    meta = build_meta(slots, t)
    ids = meta.token_ids[:t].long()
    xs1 = x.index_select(0, ids).unsqueeze(1)
    h1 = torch.randn(t, 1, r)
    xs2, h2 = torch.randn(t, 2, d), torch.randn(t, 2, r)
    ops = {
        "read_adapters": lambda a, b: (a.sum(), b.sum()),
        "bmm_pair": lambda a, b: (torch.bmm(xs1, a.transpose(1, 2)), torch.bmm(h1, b.transpose(1, 2))),
        "bmm_pair_m2": lambda a, b: (torch.bmm(xs2, a.transpose(1, 2)), torch.bmm(h2, b.transpose(1, 2))),
        "hyperlora": lambda a, b: add_lora(y, x, a, b, slots, scales, backend="torch", meta=meta),
        "hyperlora_ops": lambda a, b: _without_cpu_kernel(
            lambda: add_lora(y, x, a, b, slots, scales, backend="torch", meta=meta))(),
        "loop": lambda a, b: per_adapter_loop(y, x, a, b, slots, scales),
    }
    k = [0]

    def cycled(op):
        def call():
            k[0] = (k[0] + 1) % POOLS
            return op(*pools[k[0]])
        return call

    benchmark.group = f"add_lora decode bound cpu float32 T=P={t} r={r} d={d}"
    benchmark.extra_info.update(T=t, adapters=t, rank=r, hidden=d, method=method, pools=POOLS,
                                bytes=4 * t * r * 2 * d,  # the used adapters, read once: GBps = adapter stream
                                ratios={"loop_over_this": ["loop", "self"],
                                        "over_read_adapters": ["self", "read_adapters"]})
    with torch.no_grad():
        round_robin(benchmark, {n: cycled(op) for n, op in ops.items()}, method, 2.0, max_rounds=21)
