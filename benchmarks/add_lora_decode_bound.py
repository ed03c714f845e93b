"""Where the time goes in CPU decode for add_lora (torch backend) against the per-adapter loop.

One token per adapter (T = adapters), float32, one thread, process CPU time. Every call gets the next of
several adapter pools (together larger than the L3 cache), so adapters come from DRAM as they would for
a model's successive layers. Per shape it reports the median of interleaved calls of:
  read_adapters   a.sum() + b.sum(): streaming the used adapters once (the memory floor)
  bmm_pair        the two bmm the torch backend runs ([T,1,d] x [T,d,r], [T,1,r] x [T,r,d]), nothing else
  bmm_pair_m2     the same with two rows per adapter: if it costs ~2x, the bmm are compute-bound, not
                  memory-bound (MKL's one-row GEMMs)
  hyperlora       add_lora(..., backend="torch", meta=meta) (with the CPU kernel extension hyperlora._cpu
                  when it is built: one pass over each adapter, csrc/cpu/)
  hyperlora_ops   the same with the CPU kernel turned off: torch's ops only (the two bmm above plus glue)
  loop            the per-adapter loop of benchmarks/bench_add_lora.py (PEFT's strategy)
At a tiny hidden size the same calls give each method's fixed (per-call and per-adapter) overhead.

  python benchmarks/add_lora_decode_bound.py            # writes benchmarks/results/add_lora_cpu_decode_bound.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from hyperlora.ops import _cpu_kernel
from hyperlora.ops.add_lora import add_lora
from hyperlora.ops.metadata import build_meta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_info  # noqa: E402
from bench_add_lora import make_inputs, per_adapter_loop  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _ops_only(fn):
    old = _cpu_kernel.set_enabled(False)
    try:
        return fn()
    finally:
        _cpu_kernel.set_enabled(old)


def measure(t: int, r: int, d: int, reps: int, pools_n: int) -> dict:
    """Median µs per method at T = adapters = t, rank r, hidden d (square layer)."""
    y, x, _, _, slots, scales = make_inputs(t, t, r, d, torch.float32, "cpu")
    pools = [make_inputs(t, t, r, d, torch.float32, "cpu", seed=i + 1)[2:4] for i in range(pools_n)]
    meta = build_meta(slots, t)
    ids = meta.token_ids[:t].long()
    xs1 = x.index_select(0, ids).unsqueeze(1)
    h1 = torch.randn(t, 1, r)
    xs2, h2 = torch.randn(t, 2, d), torch.randn(t, 2, r)
    k = [0]

    def cyc(fn):
        def call():
            k[0] = (k[0] + 1) % pools_n
            return fn(*pools[k[0]])
        return call

    fns = {
        "read_adapters": cyc(lambda a, b: (a.sum(), b.sum())),
        "bmm_pair": cyc(lambda a, b: (torch.bmm(xs1, a.transpose(1, 2)), torch.bmm(h1, b.transpose(1, 2)))),
        "bmm_pair_m2": cyc(lambda a, b: (torch.bmm(xs2, a.transpose(1, 2)), torch.bmm(h2, b.transpose(1, 2)))),
        "hyperlora": cyc(lambda a, b: add_lora(y, x, a, b, slots, scales, backend="torch", meta=meta)),
        "hyperlora_ops": cyc(lambda a, b: _ops_only(lambda: add_lora(y, x, a, b, slots, scales, backend="torch",
                                                                      meta=meta))),
        "loop": cyc(lambda a, b: per_adapter_loop(y, x, a, b, slots, scales)),
    }
    times: dict[str, list[float]] = {n: [] for n in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(reps):
            for n, fn in fns.items():
                t0 = time.process_time()
                fn()
                times[n].append(time.process_time() - t0)
    med = {n: statistics.median(v) * 1e6 for n, v in times.items()}
    adapter_bytes = 4 * t * r * 2 * d
    return {"T": t, "adapters": t, "rank": r, "hidden": d, "adapter_MB": adapter_bytes / 1e6,
            "median_us": med, "spread_us": {n: [min(v) * 1e6, max(v) * 1e6] for n, v in times.items()},
            "read_GBps": adapter_bytes / med["read_adapters"] / 1e3,
            "bmm_GBps": adapter_bytes / med["bmm_pair"] / 1e3,
            "hyperlora_GBps": adapter_bytes / med["hyperlora"] / 1e3,
            "loop_over_hyperlora": med["loop"] / med["hyperlora"],
            "loop_over_hyperlora_ops": med["loop"] / med["hyperlora_ops"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="64,16,4096;64,16,1024;64,16,64", help="'T,r,d;...' (T = adapters)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--pools", type=int, default=4, help="adapter pools cycled (together > L3)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    machine = machine_info(torch.device("cpu"))
    rows = []
    for item in args.shapes.split(";"):
        t, r, d = (int(v) for v in item.split(","))
        row = measure(t, r, d, args.reps, args.pools)
        rows.append(row)
        m = row["median_us"]
        print(f"T=adapters={t} r={r} d={d} ({row['adapter_MB']:.1f} MB of adapters): "
              + "  ".join(f"{n}={v:.0f}us" for n, v in m.items())
              + f"  read {row['read_GBps']:.1f} GB/s, bmm {row['bmm_GBps']:.1f} GB/s, "
              f"hyperlora {row['hyperlora_GBps']:.1f} GB/s, loop/hyperlora {row['loop_over_hyperlora']:.2f}x "
              f"(torch ops only {row['loop_over_hyperlora_ops']:.2f}x)", flush=True)
    result = {"benchmark": "add_lora_decode_bound", "device": "cpu", "dtype": "float32", "clock": "cpu",
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "python benchmarks/add_lora_decode_bound.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine, "pools": args.pools, "cpu_kernel": _cpu_kernel.status(), "rows": rows}
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / "add_lora_cpu_decode_bound.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
