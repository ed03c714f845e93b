"""Charts (and a text summary) from benchmark results in the suite's schema (benchmarks/conftest.py).

    python benchmarks/plot.py benchmarks/results/bench_cpu_20261207.json            # PNGs beside the JSON
    python benchmarks/plot.py run1.json run2.json ... --out plots/ --table           # several runs: median [min-max]

One PNG per benchmark family found in the files (matplotlib, optional: without it only --table works):
  add_lora      speedup over the per-adapter loop and fraction of the roofline, per shape and method
  decode_bound  time per method at T = adapters (where CPU decode time goes)
  latent        latent / materialized time per case, and auto's regret
  generate      policy -> adapter time per method against the number of policies
  e2e           speedup of hyperlora over PEFT (and the floor's bound) per model, shape and adapter count
  serve         the load benchmark (bench_serve.py): throughput, TTFT p50/p99 and time per output token p50/p99
                per case (clients x policies) and system
With several files, a benchmark present in more than one gets the median of its figures and a min-max bar
(the repeated-runs summary benchmarks/add_lora_cpu_runs.py used to print). Files in another schema (the
results written before the suite moved to pytest-benchmark) are refused with a message naming the file.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

SCHEMA = "hyperlora-bench/1"
FAMILIES = {"add_lora": "test_add_lora_", "decode_bound": "test_decode_bound", "latent": "test_latent_",
            "generate": "test_generate_", "e2e": "test_e2e_", "serve": "test_serve_"}
SERVE_FIGURES = ("throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")


def load(paths: list[Path]) -> list[dict[str, Any]]:
    """The results files, each checked to be in the suite's schema (ValueError naming the file otherwise)."""
    out = []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{p}: not a readable JSON file ({exc})") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or "benchmarks" not in data:
            raise ValueError(f"{p}: not a {SCHEMA} results file (written by `pytest benchmarks/ --benchmark-json`); "
                             f"found schema {data.get('schema') if isinstance(data, dict) else None!r}")
        out.append(data)
    return out


def family(bench: dict[str, Any]) -> str | None:
    name = bench.get("name", "")
    for fam, prefix in FAMILIES.items():
        if name.startswith(prefix):
            return fam
    return None


def collect(runs: list[dict[str, Any]]) -> dict[str, dict[tuple[str, str], list[dict[str, Any]]]]:
    """{family: {(group, method): [the benchmark's record in each run]}}, in first-seen order."""
    out: dict[str, dict[tuple[str, str], list[dict[str, Any]]]] = {}
    for run in runs:
        for b in run["benchmarks"]:
            fam = family(b)
            if fam is None:
                continue
            key = (b.get("group") or "", b.get("extra_info", {}).get("method", b["name"]))
            out.setdefault(fam, {}).setdefault(key, []).append(b)
    return out


def figure(recs: list[dict[str, Any]], key: str) -> tuple[float, float, float] | None:
    """(median, min, max) over runs of an extra_info figure, or of the median time in seconds ('median')."""
    vals = [r["stats"]["median"] if key == "median" else r.get("extra_info", {}).get(key) for r in recs]
    vals = [v for v in vals if isinstance(v, (int, float))]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def table(fams: dict[str, dict[tuple[str, str], list[dict[str, Any]]]]) -> str:
    """Text summary: per group and method the median time and every derived ratio, median [min-max] over runs."""
    lines = []
    for fam, entries in fams.items():
        lines.append(f"## {fam}")
        for (group, method), recs in entries.items():
            t = figure(recs, "median")
            names = list(recs[0].get("extra_info", {}).get("ratios", {})) + ["roofline_frac"]
            if fam == "serve":
                names = list(SERVE_FIGURES) + names
            cells = []
            for n in names:
                f = figure(recs, n)
                if f:
                    cells.append(f"{n} {f[0]:.2f}" + (f" [{f[1]:.2f}-{f[2]:.2f}]" if len(recs) > 1 else ""))
            lines.append(f"{group} | {method}: {t[0] * 1e3:.3f} ms" + (f" [{t[1] * 1e3:.3f}-{t[2] * 1e3:.3f}]"
                                                                       if len(recs) > 1 else "")
                         + (f" ({len(recs)} runs)" if len(recs) > 1 else "") + ("; " + ", ".join(cells) if cells else ""))
        lines.append("")
    return "\n".join(lines)


def _bars(ax, groups: list[str], methods: list[str], get, ylabel: str, log: bool = False) -> None:
    """Grouped bars: one cluster per group, one bar per method, min-max error bars over runs."""
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        xs, ys, lo, hi = [], [], [], []
        for j, g in enumerate(groups):
            f = get(g, m)
            if f is None:
                continue
            xs.append(j + (i - (len(methods) - 1) / 2) * width)
            ys.append(f[0])
            lo.append(f[0] - f[1])
            hi.append(f[2] - f[0])
        if xs:
            ax.bar(xs, ys, width, label=m, yerr=[lo, hi] if any(lo) or any(hi) else None, capsize=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def _short(group: str, family_name: str) -> str:
    words = group.split()
    if family_name == "serve":
        return " ".join(words[1:])
    return " ".join(words[2:]) if family_name in ("add_lora", "latent", "generate", "e2e") else group


def plot(fams: dict[str, dict[tuple[str, str], list[dict[str, Any]]]], out_dir: Path, title: str) -> list[Path]:
    """One PNG per family; returns the paths written. Needs matplotlib (ImportError otherwise)."""
    import matplotlib  # optional dependency (the `plot` / `test` extras)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fam, entries in fams.items():
        groups = list(dict.fromkeys(g for g, _ in entries))
        methods = list(dict.fromkeys(m for _, m in entries))

        def get(key: str):
            return lambda g, m: figure(entries[(g, m)], key) if (g, m) in entries else None

        labels = [_short(g, fam) for g in groups]
        if fam == "add_lora":
            meths = [m for m in methods if m != "build_meta"]
            fig, axes = plt.subplots(2, 1, figsize=(max(8, len(groups) * 0.9), 9))
            _bars(axes[0], groups, meths, get("speedup_vs_loop"), "speedup over the per-adapter loop (x)")
            _bars(axes[1], groups, meths, get("roofline_frac"), "fraction of the roofline")
            axes[0].axhline(1.0, color="grey", lw=0.8)
            for ax in axes:
                ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        elif fam == "decode_bound":
            fig, ax = plt.subplots(figsize=(8, 5))
            _bars(ax, groups, methods, lambda g, m: (lambda f: f and tuple(v * 1e6 for v in f))(get("median")(g, m)),
                  "median µs per call", log=True)
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        elif fam == "latent":
            fig, axes = plt.subplots(2, 1, figsize=(max(8, len(groups) * 0.35), 9))
            _bars(axes[0], groups, ["latent"], get("latent_speedup"), "materialized / latent time (x)", log=True)
            _bars(axes[1], groups, ["auto"], get("regret"), "auto's regret (picked / better path)")
            axes[0].axhline(1.0, color="grey", lw=0.8)
            axes[1].axhline(1.0, color="grey", lw=0.8)
            for ax in axes:
                ax.set_xticklabels(labels, rotation=75, ha="right", fontsize=6)
        elif fam == "generate":
            fig, ax = plt.subplots(figsize=(8, 5))
            _bars(ax, groups, methods, lambda g, m: (lambda f: f and tuple(v * 1e3 for v in f))(get("median")(g, m)),
                  "median ms (policy -> adapter in pool)", log=True)
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        elif fam == "serve":
            fig, axes = plt.subplots(3, 1, figsize=(max(8, len(groups) * 2.2), 12))
            _bars(axes[0], groups, methods, get("throughput_tok_s"), "output tokens/s (median run)")
            for ax, (key, label) in zip(axes[1:], (("ttft", "time to first token (s)"),
                                                   ("tpot", "time per output token (s)"))):
                _bars(ax, groups, methods, get(f"{key}_p50_s"), label + ": bars p50, ticks p99", log=True)
                width = 0.8 / max(len(methods), 1)
                for i, m in enumerate(methods):
                    pts = [(j + (i - (len(methods) - 1) / 2) * width, get(f"{key}_p99_s")(g, m))
                           for j, g in enumerate(groups)]
                    pts = [(x, f[0]) for x, f in pts if f]
                    if pts:
                        ax.plot(*zip(*pts), "k_", markersize=8)
            for ax in axes:
                ax.set_xticklabels(labels, rotation=0, fontsize=8)
        else:  # e2e
            fig, ax = plt.subplots(figsize=(max(8, len(groups) * 1.2), 5))
            _bars(ax, groups, ["hyperlora"], get("speedup_vs_peft"), "hyperlora speedup over PEFT (x)")
            bound = [get("speedup_bound")(g, "hyperlora") for g in groups]
            ax.plot([i for i, b in enumerate(bound) if b], [b[0] for b in bound if b], "k_", markersize=20,
                    label="bound: adapters at the floor")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.legend(fontsize=7)
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        fig.suptitle(f"{fam}: {title}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{fam}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="results JSON files (pytest benchmarks/ --benchmark-json)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for the PNGs (default: <first file's name without .json>_plots/ beside it)")
    ap.add_argument("--table", action="store_true", help="print the text summary")
    ap.add_argument("--no-plot", action="store_true", help="only the summary")
    args = ap.parse_args(argv)
    try:
        runs = load(args.files)
    except ValueError as exc:
        ap.error(str(exc))
    fams = collect(runs)
    if not fams:
        ap.error(f"no benchmarks of a known family ({', '.join(FAMILIES)}) in the files")
    if args.table or args.no_plot:
        print(table(fams))
    if not args.no_plot:
        first = args.files[0]
        out = args.out or first.with_name(first.stem + "_plots")
        m = runs[0].get("machine", {})
        title = (f"{m.get('gpu') or m.get('cpu')}, {runs[0].get('date')}, commit "
                 f"{(runs[0].get('commit') or {}).get('short')}" + (f", {len(runs)} files" if len(runs) > 1 else ""))
        try:
            paths = plot(fams, out, title)
        except ImportError:
            print("matplotlib is not installed (pip install matplotlib, or the `plot` extra): use --table",
                  file=sys.stderr)
            return 1
        for p in paths:
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
