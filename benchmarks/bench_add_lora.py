"""Benchmark of hyperlora.ops.add_lora (many adapters in one batch) against the peers, same run, same data.

Sweep: tokens T (1..8192) x distinct adapters P (1, 8, 64, 256; P <= T) x rank r (8, 16, 64) x hidden d
(1024, 4096, square layer d_in = d_out = d). `--quick` runs a handful of decode/prefill shapes that finish
in a few minutes on a 2-core CPU.

Methods, each timed interleaved with the others (round robin, so load from other processes hits all alike):
  per_adapter_loop  what PEFT does for mixed batches: for each adapter, mask its rows, x[m] A^T B^T, add back
  gather_bmm        gather each token's A and B (lora_a[slots]) and run two batched matmuls
  hyperlora_<be>    add_lora(..., backend=<be>, meta=meta) with the metadata built once per forward
                    (shared by every layer in the runtime); its build time is reported separately (meta_us)
  hyperlora_torch_ops  (CPU, with --torch-ops) the torch backend with the CPU kernel extension turned
                    off: torch's ops only, as before hyperlora._cpu existed

Layout of tokens: with fewer than 16 tokens per adapter (decode) the adapters are interleaved in random
order, as requests sit in a decode batch; otherwise each adapter owns a contiguous run (prefill prompts).

Per row: median time, achieved GB/s and TFLOP/s, and the fraction of the roofline, where
  bytes = x + each used adapter once (r (d_in + d_out)) + y read and written,   FLOPs = 2 T r (d_in + d_out),
  roofline time = max(bytes / copy bandwidth, FLOPs / dense GEMM rate), both measured in this run on this
  device (CPU: a large tensor copy and a float32 GEMM; GPU: a 1 GiB device copy and a bf16 8192^3 GEMM).

  python benchmarks/bench_add_lora.py --quick                 # CPU, float32, a few minutes
  python benchmarks/bench_add_lora.py --device cuda --dtype bfloat16   # full sweep on a GPU
Writes benchmarks/results/add_lora_<device>[_<tag>].json and .md.
"""
from __future__ import annotations

import os
import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from hyperlora.ops import _cpu_kernel
from hyperlora.ops.add_lora import add_lora
from hyperlora.ops.metadata import build_meta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_machine.py, however this file is loaded
from _machine import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FULL = dict(tokens=[1, 16, 64, 256, 1024, 8192], adapters=[1, 8, 64, 256], ranks=[8, 16, 64], hidden=[1024, 4096])
# (T, P, r, d): decode shapes first (the CPU target: P = 64 in decode), then prefill
QUICK = [(64, 64, 16, 1024), (64, 64, 16, 4096), (1, 1, 16, 4096), (64, 8, 16, 1024), (256, 256, 8, 1024),
         (256, 64, 64, 1024), (1024, 8, 16, 1024), (1024, 1, 64, 4096)]
GATHER_LIMIT_BYTES = 1 << 30


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


# ------------------------------------------------------------------------------------------------ timing
class Timer:
    """Seconds per call: CUDA events on a GPU; on the CPU wall time, or with clock="cpu" the process's
    CPU time (time.process_time), which on a shared machine excludes time spent descheduled. CPU time is
    only meaningful with one torch thread (it sums over threads)."""

    def __init__(self, device: torch.device, clock: str = "wall"):
        self.cuda = device.type == "cuda"
        self.clock = time.process_time if clock == "cpu" else time.perf_counter

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = self.clock()
        fn()
        return self.clock() - t0


def interleaved(fns: dict[str, Callable[[], object]], timer: Timer, reps: int, budget_s: float) -> dict[str, float]:
    """Median seconds per method, measured round robin (one warm-up call each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    t_end = time.perf_counter() + budget_s
    for i in range(reps):
        for k, fn in fns.items():
            times[k].append(timer(fn))
        if i >= 2 and time.perf_counter() > t_end:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def measure_roofline(device: torch.device, dtype: torch.dtype, timer: Timer) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and dense GEMM FLOP/s on this device now."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # float32: 1 GiB on a GPU, 64 MiB (> L3) on a CPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t_copy = interleaved({"copy": lambda: dst.copy_(src)}, timer, 7, 5.0)["copy"]
    bw = 2 * src.numel() * src.element_size() / t_copy
    del src, dst
    if device.type == "cuda":
        m, gdt = 8192, (dtype if dtype != torch.float32 else torch.bfloat16)
    else:
        m, gdt = 2048, torch.float32
    p, q = torch.randn(m, m, device=device, dtype=gdt), torch.randn(m, m, device=device, dtype=gdt)
    t_mm = interleaved({"mm": lambda: torch.mm(p, q)}, timer, 5, 10.0)["mm"]
    return {"copy_GBps": bw / 1e9, "gemm_TFLOPs": 2 * m ** 3 / t_mm / 1e12, "gemm_dtype": str(gdt).replace("torch.", "")}


# ------------------------------------------------------------------------------------------------ one shape
def make_inputs(T, P, r, d, dtype, device, seed=0):
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


def bench_shape(T, P, r, d, dtype, device, backends, timer, reps, budget, roof, torch_ops=False) -> dict:
    y, x, a, b, slots, scales = make_inputs(T, P, r, d, dtype, device)
    es = x.element_size()
    used = int(torch.unique(slots).numel())
    nbytes = es * (T * d + used * r * (d + d) + 2 * T * d)
    flops = 2 * T * r * (d + d)
    fns: dict[str, Callable[[], object]] = {"per_adapter_loop": lambda: per_adapter_loop(y, x, a, b, slots, scales)}
    if T * r * 2 * d * es <= GATHER_LIMIT_BYTES:
        fns["gather_bmm"] = lambda: gather_bmm(y, x, a, b, slots, scales)
    meta = build_meta(slots, P)
    for be in backends:
        fns[f"hyperlora_{be}"] = (lambda be=be: add_lora(y, x, a, b, slots, scales, backend=be, meta=meta))
    if torch_ops and device.type == "cpu" and "torch" in backends:
        fns["hyperlora_torch_ops"] = _without_cpu_kernel(
            lambda: add_lora(y, x, a, b, slots, scales, backend="torch", meta=meta))
    with torch.no_grad():
        med = interleaved(fns, timer, reps, budget)
        meta_t = interleaved({"meta": lambda: build_meta(slots, P)}, timer, max(3, reps // 2), 1.0)["meta"]
    t_roof = max(nbytes / (roof["copy_GBps"] * 1e9), flops / (roof["gemm_TFLOPs"] * 1e12))
    row = {"T": T, "adapters": P, "rank": r, "hidden": d, "bytes": nbytes, "flops": flops,
           "meta_us": meta_t * 1e6, "roofline_us": t_roof * 1e6, "methods": {}}
    for k, t in med.items():
        row["methods"][k] = {"median_us": t * 1e6, "GBps": nbytes / t / 1e9, "TFLOPs": flops / t / 1e12,
                             "roofline_frac": t_roof / t}
    base = med["per_adapter_loop"]
    for k in med:
        row["methods"][k]["speedup_vs_loop"] = base / med[k]
    return row


# ------------------------------------------------------------------------------------------------ report
def markdown(result: dict) -> str:
    m, roof = result["machine"], result["roofline"]
    names = list(result["rows"][0]["methods"]) if result["rows"] else []
    lines = [f"# add_lora benchmark ({result['device']}, {result['dtype']})", "",
             f"- date: {result['date']}", f"- command: `{result['command']}`",
             f"- clock: {result['clock']} (cpu = process CPU time of one thread: the machine is shared)",
             f"- machine: {m.get('gpu') or m.get('cpu')}, {m['threads']} torch threads, torch {m['torch']}, "
             f"load average at start {m.get('loadavg_at_start', '?')}",
             f"- measured roofline: copy {roof['copy_GBps']:.1f} GB/s, GEMM {roof['gemm_TFLOPs']:.3f} TFLOP/s "
             f"({roof['gemm_dtype']})",
             "- bytes = x + each used adapter once + y read and written; FLOPs = 2·T·r·(d_in+d_out); "
             "roof% = roofline time / measured time", "",
             "| T | adapters | rank | hidden | " + " | ".join(f"{n} µs (GB/s, roof%, ×loop)" for n in names)
             + " | meta µs |",
             "|" + "---|" * (5 + len(names))]
    for row in result["rows"]:
        cells = []
        for n in names:
            v = row["methods"].get(n)
            cells.append("-" if v is None else
                         f"{v['median_us']:.0f} ({v['GBps']:.1f}, {100 * v['roofline_frac']:.0f}%, "
                         f"{v['speedup_vs_loop']:.2f}×)")
        lines.append(f"| {row['T']} | {row['adapters']} | {row['rank']} | {row['hidden']} | " + " | ".join(cells)
                     + f" | {row['meta_us']:.0f} |")
    if result.get("summary"):
        lines += ["", "## Summary", ""] + [f"- {s}" for s in result["summary"]]
    return "\n".join(lines) + "\n"


def summarize(rows: list[dict], backends: list[str]) -> list[str]:
    out = []
    for be in backends:
        k = f"hyperlora_{be}"
        for kind, sel in (("decode", lambda r: r["T"] // r["adapters"] < 16),
                          ("prefill", lambda r: r["T"] // r["adapters"] >= 16)):
            fr = [r["methods"][k]["roofline_frac"] for r in rows if sel(r) and k in r["methods"]]
            sp = [r["methods"][k]["speedup_vs_loop"] for r in rows if sel(r) and k in r["methods"]]
            if fr:
                out.append(f"{k}, {kind} shapes ({len(fr)}): median {100 * statistics.median(fr):.0f}% of the roofline "
                           f"(min {100 * min(fr):.0f}%, max {100 * max(fr):.0f}%), median {statistics.median(sp):.2f}x "
                           "the per-adapter loop")
    for be in backends:
        k = f"hyperlora_{be}"
        dec = [r for r in rows if r["adapters"] == 64 and r["T"] // r["adapters"] < 16 and k in r["methods"]]
        for r in dec:
            gb = r["methods"].get("gather_bmm")
            out.append(f"{k} at 64 adapters, decode T={r['T']} r={r['rank']} d={r['hidden']}: "
                       f"{r['methods'][k]['speedup_vs_loop']:.2f}x faster than the per-adapter loop"
                       + (f"; gather+bmm takes {gb['median_us'] / r['methods'][k]['median_us']:.2f}x its time" if gb else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few decode/prefill shapes (CPU: a few minutes)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--backends", default=None, help="comma list; default torch on CPU, triton,cuda on GPU")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per method (default 9 CPU, 30 GPU)")
    ap.add_argument("--budget", type=float, default=None, help="seconds per shape before stopping early")
    ap.add_argument("--clock", choices=["wall", "cpu"], default=None,
                    help="CPU timing: wall time, or process CPU time (needs --threads 1; default with --quick "
                         "on the CPU, since the machine is shared)")
    ap.add_argument("--shapes", default=None, help="explicit shapes 'T,P,r,d;T,P,r,d' instead of the sweep")
    ap.add_argument("--torch-ops", action="store_true",
                    help="CPU: also time the torch backend with the CPU kernel extension off (hyperlora_torch_ops)")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--json", default=None, help="write the JSON result to this path (and no .md) instead")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("float32" if device.type == "cpu" else "bfloat16")]
    backends = (args.backends.split(",") if args.backends else
                (["torch"] if device.type == "cpu" else ["triton", "cuda"]))
    reps = args.reps or (15 if device.type == "cpu" else 30)
    budget = args.budget or (8.0 if device.type == "cpu" else 3.0)
    clock = args.clock or ("cpu" if device.type == "cpu" and args.quick else "wall")
    if device.type == "cpu" and clock == "cpu":
        if args.threads not in (None, 1):
            ap.error("--clock cpu measures one thread's CPU time: use --threads 1")
        torch.set_num_threads(1)
    timer = Timer(device, clock)
    if args.shapes:
        shapes = [tuple(int(v) for v in item.split(",")) for item in args.shapes.split(";") if item.strip()]
        if any(len(sh) != 4 or sh[1] > sh[0] for sh in shapes):
            ap.error("--shapes: 'T,P,r,d;...' with adapters P <= tokens T")
    elif args.quick:
        shapes = QUICK
    else:
        shapes = [(t, p, r, d) for d in FULL["hidden"] for r in FULL["ranks"] for p in FULL["adapters"]
                  for t in FULL["tokens"] if p <= t]
    roof = measure_roofline(device, dtype, timer)
    print(f"roofline on {device}: copy {roof['copy_GBps']:.1f} GB/s, GEMM {roof['gemm_TFLOPs']:.3f} TFLOP/s", flush=True)
    rows = []
    for (T, P, r, d) in shapes:
        row = bench_shape(T, P, r, d, dtype, device, backends, timer, reps, budget, roof, args.torch_ops)
        rows.append(row)
        cells = "  ".join(f"{k}={v['median_us']:.0f}us({v['roofline_frac'] * 100:.0f}%,{v['speedup_vs_loop']:.2f}x)"
                          for k, v in row["methods"].items())
        print(f"T={T:5d} P={P:3d} r={r:2d} d={d:4d}  {cells}  meta={row['meta_us']:.0f}us", flush=True)
    result = {"benchmark": "add_lora", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix() if argv is None else "bench_add_lora.py",
                                               *(sys.argv[1:] if argv is None else argv)]),
              "clock": clock if device.type == "cpu" else "cuda_events",
              "machine": machine_info(device), "roofline": roof, "backends": backends, "rows": rows,
              "cpu_kernel": _cpu_kernel.status() | {"enabled": _cpu_kernel.available()}}
    result["summary"] = summarize(rows, backends)
    md = markdown(result)
    print("\n" + md)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    elif not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = f"add_lora_{device.type}" + (f"_{args.tag}" if args.tag else "")
        (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / f"{stem}.md").write_text(md)
        print(f"wrote {RESULTS / (stem + '.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
