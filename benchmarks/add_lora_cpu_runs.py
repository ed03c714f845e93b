"""Repeated CPU runs of bench_add_lora.py at the issue's decode target, summarized as median [min-max].

The CPU machines are shared, so one run's speed-up moves by up to 2x with the load. This driver runs
`bench_add_lora.py --threads 1 --clock cpu --torch-ops --shapes ...` N times per dtype, alternating the
dtypes run by run, each in a fresh process. Every run times, round robin, the per-adapter loop (PEFT's
strategy), gather+bmm, the torch backend with the CPU kernel extension (hyperlora_torch) and without it
(hyperlora_torch_ops, torch's ops only), so each run compares them under the same load.

  python benchmarks/add_lora_cpu_runs.py                # 10 runs x float32, bfloat16, float16
Writes benchmarks/results/add_lora_cpu_kernel_runs.json (every run's rows, the summary, machine, date,
command, load average before and after) and prints the summary table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ("hyperlora_torch", "hyperlora_torch_ops", "gather_bmm")


def one_run(dtype: str, shapes: str, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        cmd = [sys.executable, str(HERE / "bench_add_lora.py"), "--threads", "1", "--clock", "cpu", "--dtype", dtype,
               "--shapes", shapes, "--torch-ops", "--reps", str(reps), "--json", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for dtype, results in runs.items():
        for i, first in enumerate(results[0]["rows"]):
            shape = {k: first[k] for k in ("T", "adapters", "rank", "hidden")}
            row = {"dtype": dtype, **shape, "runs": len(results)}
            for m in ("per_adapter_loop",) + METHODS:
                us = [r["rows"][i]["methods"][m]["median_us"] for r in results if m in r["rows"][i]["methods"]]
                sp = [r["rows"][i]["methods"][m]["speedup_vs_loop"] for r in results if m in r["rows"][i]["methods"]]
                if us:
                    row[m] = {"median_us": statistics.median(us), "speedup_median": statistics.median(sp),
                              "speedup_min": min(sp), "speedup_max": max(sp)}
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| dtype | T, adapters, r, d | hyperlora_torch (kernel) ×loop | torch ops only ×loop | gather+bmm ×loop "
             "| kernel µs (torch ops µs, loop µs) |", "|---|---|---|---|---|---|"]
    for r in rows:
        def cell(m):
            v = r.get(m)
            return "-" if v is None else f"{v['speedup_median']:.2f}x [{v['speedup_min']:.2f}-{v['speedup_max']:.2f}]"
        lines.append(f"| {r['dtype']} | {r['T']}, {r['adapters']}, {r['rank']}, {r['hidden']} | "
                     f"{cell('hyperlora_torch')} | {cell('hyperlora_torch_ops')} | {cell('gather_bmm')} | "
                     f"{r['hyperlora_torch']['median_us']:.0f} ({r['hyperlora_torch_ops']['median_us']:.0f}, "
                     f"{r['per_adapter_loop']['median_us']:.0f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--shapes", default="64,64,16,1024;64,64,16,4096", help="'T,P,r,d;...'")
    ap.add_argument("--reps", type=int, default=15, help="timed calls per method in each run")
    ap.add_argument("--out", default=str(RESULTS / "add_lora_cpu_kernel_runs.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import torch

    from _machine import machine_info
    from hyperlora.ops import _cpu_kernel

    torch.set_num_threads(1)
    machine = machine_info(torch.device("cpu"))
    dtypes = args.dtypes.split(",")
    runs: dict[str, list[dict]] = {d: [] for d in dtypes}
    for i in range(args.runs):
        for dtype in (dtypes if i % 2 == 0 else dtypes[::-1]):
            res = one_run(dtype, args.shapes, args.reps)
            runs[dtype].append(res)
            cells = "  ".join(f"d={r['hidden']}: kernel {r['methods']['hyperlora_torch']['speedup_vs_loop']:.2f}x, "
                              f"ops {r['methods']['hyperlora_torch_ops']['speedup_vs_loop']:.2f}x"
                              for r in res["rows"])
            print(f"run {i + 1}/{args.runs} {dtype} (load {res['machine'].get('loadavg_at_start')}): {cells}",
                  flush=True)
    rows = summarize(runs)
    result = {"benchmark": "add_lora_cpu_kernel_runs", "device": "cpu", "clock": "cpu",
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "python benchmarks/add_lora_cpu_runs.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "per_run_command": "python benchmarks/bench_add_lora.py --threads 1 --clock cpu --dtype D --shapes "
                                 f"'{args.shapes}' --torch-ops --reps {args.reps}",
              "machine": machine, "loadavg_at_end": round(os.getloadavg()[0], 2),
              "loadavg_per_run": {d: [r["machine"].get("loadavg_at_start") for r in rs] for d, rs in runs.items()},
              "cpu_kernel": _cpu_kernel.status(), "summary": rows,
              "runs": {d: [r["rows"] for r in rs] for d, rs in runs.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + table(rows))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
