"""The latent-vs-materialized crossover: time of each path, and of `auto`, per layer shape and batch.

For one LoRA-served layer (d_in = d_out = hidden) and a batch of P distinct generated policies with
`tpp` tokens each (tpp=1 is decode), it times:
  base          the layer's own GEMM (x @ W.T), for scale
  materialized  hyperlora.ops.add_lora on adapters materialized from the same latents (one pool slot each)
  latent        hyperlora.ops.latent_lora on the head and the per-slot latents
  auto          hyperlora.ops.path_choice.choose_path + the path it picks
and reports which path auto picked, the cost model's estimates, and `regret` = time of the picked path /
time of the better path (same measurements; 1.00 = auto picked the faster one).

    pytest benchmarks/bench_latent.py                     # CPU, the quick grid (41 cases), float32
    pytest benchmarks/bench_latent.py --bench-size full   # the full grid
    pytest benchmarks/bench_latent.py -m gpu              # GPU, bfloat16, backend auto (cuda > triton)

Each path of a case is its own benchmark (one pytest-benchmark group per case), timed round robin as the CLI
does (each timed call follows one call of the case's other paths: _common.round_robin); extra_info has the case,
the cost model's pick (auto_path) and estimates, bytes (the cost model's count for that path: GBps) and,
derived after the run from the medians, latent_speedup (materialized / latent), regret and auto_over_best
(on the auto benchmark). The whole-model forwards (`--e2e` below) are not part of the suite.

The command line below (`python benchmarks/bench_latent.py --quick [--e2e]`, the old interleaved timing and
JSON) is kept for tests/ops/test_latent_lora.py::test_bench_latent_smoke, which runs it on a tiny grid.
"""
from __future__ import annotations

import os
import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from hyperlora.ops import path_choice as dispatch
from hyperlora.ops.latent_lora import latent_lora, materialize_adapters
from hyperlora.ops.metadata import build_meta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py, however this file is loaded
from _common import bench_size, machine_info, require_backend, round_robin  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _materialized_op():
    """hyperlora.ops.add_lora, or (before it lands) a segment-loop torch stand-in, and its name."""
    try:
        from hyperlora.ops.add_lora import add_lora

        return add_lora, "hyperlora.ops.add_lora"
    except ImportError:
        def segment_loop(y, x, a, b, slots, scales=None, ranks=None, *, backend=None, meta=None):
            m = meta if meta is not None and meta.has_host_summary else build_meta(slots, a.shape[0])
            for slot, start, count in m.host_segments:
                rows = m.token_ids[start:start + count].long()
                y.index_add_(0, rows, (x.index_select(0, rows) @ a[slot].T) @ b[slot].T)
            return y

        return segment_loop, "segment-loop stand-in (add_lora not landed)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns, device: torch.device, budget_s: float, max_reps: int) -> list[float]:
    """Median seconds of each fn, called round-robin (so a shared machine's load swings hit all of them alike)
    after one warm-up round, for up to `max_reps` rounds within ~`budget_s` (at least 3 rounds)."""
    for fn in fns:
        fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < max_reps and (len(times[0]) < 3 or time.perf_counter() - start < budget_s):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def build_case(hidden: int, rank: int, k: int, policies: int, tpp: int, dtype: torch.dtype, device: torch.device,
               backend: str | None, cold_bytes: int = 0, seed: int = 0) -> dict:
    """One layer's case: {"fns": {base, materialized, latent, auto}, "choice": the cost model's pick}.

    A model's layers each have their own weights, so a forward pass never finds a layer's adapters (or base
    weight) in cache: each call takes the next of enough copies of its path's weights to exceed `cold_bytes`."""
    add_lora, _ = _materialized_op()
    g = torch.Generator(device="cpu").manual_seed(seed)
    T = policies * tpp
    d = hidden

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    x = rnd(T, d)
    w_a = rnd(rank * k, d, scale=d ** -0.5)
    w_b = rnd(d, rank * k, scale=(rank * k) ** -0.5)
    z = torch.randn(policies, k, generator=g)
    z[:, -1] = 1.0
    z = z.to(device)
    scales = torch.full((policies,), 2.0, device=device)
    a, b = materialize_adapters(z, w_a.float(), w_b.float())
    b = b * scales[:, None, None]
    a, b = a.to(dtype), b.to(dtype)
    slots = torch.arange(policies).repeat_interleave(tpp)
    slots = slots[torch.randperm(T, generator=g)].to(device, torch.int32)
    meta = build_meta(slots, policies)  # once per forward, shared by every layer: outside the timing
    y = rnd(T, d)
    w = rnd(d, d, scale=d ** -0.5)

    def copies_of(*ts):
        nbytes = sum(t.numel() * t.element_size() for t in ts)
        n = 1 if cold_bytes <= 0 else max(1, min(16, -(-cold_bytes // max(nbytes, 1))))
        return [ts] + [tuple(t.clone() for t in ts) for _ in range(n - 1)]

    mat_w, lat_w, base_w = copies_of(a, b), copies_of(w_a, w_b, z), copies_of(w)
    step = {"mat": 0, "lat": 0, "base": 0}

    def nxt(key, pool):
        step[key] += 1
        return pool[step[key] % len(pool)]

    def base():
        (wc,) = nxt("base", base_w)
        return x @ wc.T

    def mat():
        ac, bc = nxt("mat", mat_w)
        add_lora(y, x, ac, bc, slots, backend=backend, meta=meta)

    def lat():
        wac, wbc, zc = nxt("lat", lat_w)
        latent_lora(y, x, wac, wbc, zc, slots, scales, backend=backend, meta=meta)

    choice = dispatch.choose_path(T, policies, d, d, rank, k, dtype, device=device)

    def auto():
        c = dispatch.choose_path(T, policies, d, d, rank, k, dtype, device=device)
        (lat if c.path == "latent" else mat)()

    return {"fns": {"materialized": mat, "latent": lat, "auto": auto, "base": base}, "choice": choice, "tokens": T}


def run_case(hidden: int, rank: int, k: int, policies: int, tpp: int, dtype: torch.dtype, device: torch.device,
             backend: str | None, budget_s: float, max_reps: int, with_base: bool, cold_bytes: int = 0,
             seed: int = 0) -> dict:
    """The CLI's row: every path timed round robin (time_interleaved), the pick and its regret."""
    case = build_case(hidden, rank, k, policies, tpp, dtype, device, backend, cold_bytes, seed)
    f, choice, T, d = case["fns"], case["choice"], case["tokens"], hidden
    fns = [f["materialized"], f["latent"], f["auto"]] + ([f["base"]] if with_base else [])
    times = time_interleaved(fns, device, budget_s, max_reps)
    t_mat, t_lat, t_auto = times[:3]
    t_base = times[3] if with_base else None
    best = min(t_mat, t_lat)
    picked = t_lat if choice.path == "latent" else t_mat
    return dict(hidden=d, rank=rank, latent_k=k, policies=policies, tokens_per_policy=tpp, tokens=T,
                base_ms=None if t_base is None else t_base * 1e3, materialized_ms=t_mat * 1e3, latent_ms=t_lat * 1e3,
                auto_ms=t_auto * 1e3, auto_path=choice.path, auto_timed=choice.measured is not None, better_path="latent" if t_lat < t_mat else "materialized",
                regret=picked / best, auto_over_best=t_auto / best,
                est_materialized_ms=choice.materialized.seconds * 1e3, est_latent_ms=choice.latent.seconds * 1e3,
                est_materialized_mb=choice.materialized.bytes / 1e6, est_latent_mb=choice.latent.bytes / 1e6,
                # achieved rates: the bytes each path must move (cost model's count) over its measured time,
                # to compare with the device's calibrated read bandwidth (profile.bandwidth in the JSON)
                materialized_gbps=choice.materialized.bytes / t_mat / 1e9, latent_gbps=choice.latent.bytes / t_lat / 1e9,
                latent_tflops=choice.latent.flops / t_lat / 1e12)


def grid(args) -> list[tuple[int, int, int, int, int]]:
    """(hidden, rank, K, policies, tokens per policy) cases; --quick adds a small rank / latent_dim sweep."""
    cases = []
    for h in args.hidden:
        for r in args.rank:
            for k in args.latent_k:
                for tpp in args.tokens_per_policy:
                    for p in args.policies:
                        if p * tpp <= args.max_tokens:
                            cases.append((h, r, k, p, tpp))
    if args.quick and not args.no_sweep:
        for r in (4, 16):
            for k in (17, 65):
                for p in (16, 256):
                    cases.append((1024, r, k, p, 1))
    return cases


def code_version() -> dict:
    """HEAD and whether the two ops' files differ from it (other work in progress changes the timings)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    ops = ["hyperlora/ops/add_lora.py", "hyperlora/ops/latent_lora.py", "hyperlora/ops/path_choice.py"]
    return {"head": git("rev-parse", "--short", "HEAD"), "uncommitted": git("status", "--short", "--", *ops).splitlines()}


def format_table(rows: list[dict]) -> str:
    head = (f"{'hidden':>6} {'R':>3} {'K':>3} {'P':>5} {'tpp':>4} {'T':>6} | {'base':>8} {'mat':>8} {'latent':>8} "
            f"{'auto':>8} | {'auto->':>12} {'better':>12} {'regret':>6} | {'est mat':>8} {'est lat':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        base = f"{r['base_ms']:8.3f}" if r["base_ms"] is not None else f"{'-':>8}"
        lines.append(f"{r['hidden']:>6} {r['rank']:>3} {r['latent_k']:>3} {r['policies']:>5} {r['tokens_per_policy']:>4} "
                     f"{r['tokens']:>6} | {base} {r['materialized_ms']:8.3f} {r['latent_ms']:8.3f} {r['auto_ms']:8.3f} | "
                     f"{r['auto_path'] + ('*' if r.get('auto_timed') else ''):>12} {r['better_path']:>12} {r['regret']:6.2f} | "
                     f"{r['est_materialized_ms']:8.3f} {r['est_latent_ms']:8.3f}")
    lines.append("times in ms (median); regret = picked path / better path, same measurements; est = cost model; "
                 "* = a close call that auto settled by timing both ops once")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    regrets = [r["regret"] for r in rows]
    out = {"cases": len(rows), "auto_picked_better": sum(r["auto_path"] == r["better_path"] for r in rows),
           "max_regret": max(regrets, default=None), "mean_regret": statistics.mean(regrets) if regrets else None,
           "cases_regret_over_1.05": sum(x > 1.05 for x in regrets)}
    # issue 7's GPU target case: 7B shapes (hidden 4096, rank 8), decode with 256 distinct policies
    for r in rows:
        if (r["hidden"], r["rank"], r["policies"], r["tokens_per_policy"]) == (4096, 8, 256, 1):
            out["target_7b_decode_256"] = {
                "latent_speedup_over_materialized": r["materialized_ms"] / r["latent_ms"],
                "base_plus_latent_over_base": None if r["base_ms"] is None else (r["base_ms"] + r["latent_ms"]) / r["base_ms"],
                "auto_regret": r["regret"], "goal": "speedup >= 2, base+latent <= 1.2 x base, regret <= 1.05 (GPU)"}
    return out


def run_e2e(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Whole-model forward of the embedded SmolLM2-135M with a fresh (untrained: timing only) hypernetwork,
    each row its own policy among P distinct ones: base, materialized, latent, auto."""
    import hashlib

    import hyperlora
    from hyperlora.modeling.base_model import load_base_model

    model, _ = load_base_model(dtype=dtype)
    model.to(device)
    hn = hyperlora.HyperNetwork.for_model(model, rank=8, target_modules=tuple(args.e2e_targets), latent_dim=32)
    hn = hn.to(device).eval()

    def encoder(texts):  # timing only: a deterministic stand-in for MiniLM
        return torch.stack([torch.randn(hn.config.task_emb_dim, generator=torch.Generator().manual_seed(
            int(hashlib.sha256(t.encode()).hexdigest()[:12], 16))) for t in texts]).to(device)

    rt = hyperlora.attach(model, hn, encoder=encoder, max_adapters=64, max_rank=8, apply_mode="auto")
    rows = []
    g = torch.Generator().manual_seed(0)
    for phase, (b, t) in {"decode": (64, 1), "prefill": (8, 64)}.items():
        ids = torch.randint(1, 1000, (b, t), generator=g).to(device)
        for p in (1, 8, 64):
            if p > b:
                continue
            pols = [f"policy number {i % p}: answer briefly" for i in range(b)]
            rt.apply_mode = "auto"
            rt.prepare(pols)  # generate (and keep latents) outside the timing
            res = {"phase": phase, "rows": b, "tokens_per_row": t, "policies": p}
            fns = {}
            for mode in ("base", "materialized", "latent", "auto"):
                def fwd(mode=mode):
                    rt.apply_mode = "auto" if mode == "base" else mode
                    with rt.policies([None] * b if mode == "base" else pols):
                        model(input_ids=ids)
                fns[mode] = fwd
            with torch.no_grad():
                times = time_interleaved(list(fns.values()), device, args.e2e_budget, 5)
            res.update({f"{m}_ms": tm * 1e3 for m, tm in zip(fns, times)})
            rows.append(res)
            print(f"  e2e {phase} B={b} T={t} P={p}: " + ", ".join(f"{m} {res[m + '_ms']:.1f} ms" for m in fns),
                  flush=True)
    rt.detach()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on the CPU, bfloat16 on a GPU")
    p.add_argument("--backend", default=None, help="op backend (torch/triton/cuda; default: auto)")
    p.add_argument("--quick", action="store_true", help="small grid that finishes in minutes on 2 CPU cores")
    p.add_argument("--hidden", type=int, nargs="+", default=[576, 1024, 4096])
    p.add_argument("--rank", type=int, nargs="+", default=None)
    p.add_argument("--latent-k", type=int, nargs="+", default=None, help="K = latent_dim + 1")
    p.add_argument("--policies", type=int, nargs="+", default=None)
    p.add_argument("--tokens-per-policy", type=int, nargs="+", default=None)
    p.add_argument("--max-tokens", type=int, default=None, help="skip cases with more tokens")
    p.add_argument("--cold-mb", type=int, default=None,
                   help="cycle copies of each path's weights until they exceed this many MB, as a forward over many "
                        "layers would (default 96 on a CPU, 3x a 32 MB L3; 200 on a GPU; 0 = warm cache)")
    p.add_argument("--e2e", action="store_true",
                   help="also time whole forwards of the embedded SmolLM2-135M (decode 64 rows, prefill 8 x 64)")
    p.add_argument("--e2e-targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--e2e-budget", type=float, default=2.0)
    p.add_argument("--no-sweep", action="store_true", help="--quick without the rank / latent_dim sweep")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (on a 2-core machine shared with other jobs use 1: 2-thread OpenMP "
                        "regions there stall for tens of ms)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/latent_<device>_<date>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.quick:
        args.rank = args.rank or [8]
        args.latent_k = args.latent_k or [33]
        args.policies = args.policies or [1, 4, 16, 64, 256, 1024]
        args.tokens_per_policy = args.tokens_per_policy or [1, 16]
        args.max_tokens = args.max_tokens or 4096
        budget, reps = 0.4, 7
    else:
        args.rank = args.rank or [8, 16]
        args.latent_k = args.latent_k or [17, 33]
        args.policies = args.policies or [1, 4, 16, 64, 256, 1024]
        args.tokens_per_policy = args.tokens_per_policy or [1, 4, 16, 128]
        args.max_tokens = args.max_tokens or (65536 if device.type == "cuda" else 8192)
        budget, reps = (0.5, 50) if device.type == "cuda" else (0.8, 9)

    cold_mb = args.cold_mb if args.cold_mb is not None else (200 if device.type == "cuda" else 96)
    _, mat_impl = _materialized_op()
    t0 = time.perf_counter()
    profile = dispatch.device_profile(device)
    print(f"device {device} ({machine_info(device).get('gpu') or machine_info(device)['cpu']}), {dtype}, "
          f"materialized = {mat_impl}; cost-model profile: {profile}", flush=True)
    rows = []
    for h, r, k, pol, tpp in grid(args):
        with_base = tpp == 1 or device.type == "cuda" or h <= 1024
        with torch.no_grad():
            rows.append(run_case(h, r, k, pol, tpp, dtype, device, args.backend, budget, reps, with_base,
                                 cold_bytes=cold_mb << 20))
        last = rows[-1]
        print(f"  h={h} R={r} K={k} P={pol} tpp={tpp}: mat {last['materialized_ms']:.3f} ms, latent "
              f"{last['latent_ms']:.3f} ms, auto->{last['auto_path']} (regret {last['regret']:.2f})", flush=True)
    print()
    print(format_table(rows))
    summ = summary(rows)
    print(f"\nauto picked the better path in {summ['auto_picked_better']}/{summ['cases']} cases; max regret "
          f"{summ['max_regret']:.2f}, mean {summ['mean_regret']:.3f}; {summ['cases_regret_over_1.05']} cases > 1.05")
    if "target_7b_decode_256" in summ:
        t = summ["target_7b_decode_256"]
        print(f"7B decode, 256 policies: latent {t['latent_speedup_over_materialized']:.2f}x faster than materialized; "
              f"base+latent = {t['base_plus_latent_over_base'] or float('nan'):.2f} x base; auto regret {t['auto_regret']:.2f}")
    e2e = None
    if args.e2e:
        print("\nwhole model (SmolLM2-135M, hypernetwork rank 8, latent_dim 32, targets "
              f"{' '.join(args.e2e_targets)}):", flush=True)
        e2e = run_e2e(args, device, dtype)
    now = dt.datetime.now(dt.timezone.utc)
    out = Path(args.out) if args.out else RESULTS / f"latent_{device.type}_{now:%Y%m%d}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "latent_vs_materialized_crossover", "date": now.isoformat(timespec="seconds"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(device), "code": code_version(), "dtype": str(dtype), "backend": args.backend or "auto",
        "materialized_impl": mat_impl, "cold_mb": cold_mb, "profile": dispatch.dataclasses.asdict(profile),
        "wall_seconds": round(time.perf_counter() - t0, 1), "summary": summ, "rows": rows, "e2e": e2e}, indent=1))
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------------------------ pytest-benchmark
PATHS = ("materialized", "latent", "auto", "base")


def suite_grid(size: str, cuda: bool) -> list[tuple[int, int, int, int, int]]:
    """The suite's (hidden, rank, K, policies, tokens per policy) cases: quick = the CLI's --quick grid
    (with its rank / latent_dim sweep), full = the CLI's default grid."""
    quick = size == "quick"
    args = argparse.Namespace(
        hidden=[576, 1024, 4096], quick=quick, no_sweep=False, rank=[8] if quick else [8, 16],
        latent_k=[33] if quick else [17, 33], policies=[1, 4, 16, 64, 256, 1024],
        tokens_per_policy=[1, 16] if quick else [1, 4, 16, 128],
        max_tokens=4096 if quick else (65536 if cuda else 8192))
    return grid(args)


def _params(size: str, cuda: bool) -> list:
    out = []
    for h, r, k, p, tpp in suite_grid(size, cuda):
        with_base = tpp == 1 or cuda or h <= 1024  # the CLI's rule: large prefill base GEMMs cost seconds on a CPU
        for m in PATHS if with_base else PATHS[:3]:
            out.append(pytest.param((h, r, k, p, tpp), m, id=f"h{h}-R{r}-K{k}-P{p}-tpp{tpp}-{m}"))
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.name in ("test_latent_cpu", "test_latent_gpu"):
        cuda = metafunc.definition.name == "test_latent_gpu"
        metafunc.parametrize("case,path", _params(bench_size(metafunc.config), cuda))


def _bench(benchmark, case, path: str, device: torch.device, dtype: torch.dtype, cold_mb: int, size: str) -> None:
    h, r, k, p, tpp = case
    c = build_case(h, r, k, p, tpp, dtype, device, None, cold_bytes=cold_mb << 20)
    ch = c["choice"]
    with_base = tpp == 1 or device.type == "cuda" or h <= 1024
    fns = {m: f for m, f in c["fns"].items() if m != "base" or with_base}
    benchmark.group = f"latent {device.type} {str(dtype).replace('torch.', '')} h={h} R={r} K={k} P={p} tpp={tpp}"
    info = dict(hidden=h, rank=r, latent_k=k, policies=p, tokens_per_policy=tpp, tokens=c["tokens"], method=path,
                device=device.type, cold_mb=cold_mb, auto_path=ch.path, auto_timed=ch.measured is not None,
                est_materialized_ms=ch.materialized.seconds * 1e3, est_latent_ms=ch.latent.seconds * 1e3,
                est_materialized_mb=ch.materialized.bytes / 1e6, est_latent_mb=ch.latent.bytes / 1e6)
    if path == "materialized":
        info["bytes"] = ch.materialized.bytes
    elif path == "latent":
        info.update(bytes=ch.latent.bytes, flops=ch.latent.flops,
                    ratios={"latent_speedup": ["materialized", "self"]})
    elif path == "auto":
        info["ratios"] = {"regret": [ch.path, ["materialized", "latent"]],
                          "auto_over_best": ["self", ["materialized", "latent"]]}
    benchmark.extra_info.update(info)
    # round robin as the CLI times it (time_interleaved): each timed call follows one call of the other paths
    budget, rounds = {"quick": (0.4, 7), "full": (0.8, 9)}[size] if device.type == "cpu" else (0.5, 50)
    with torch.no_grad():
        round_robin(benchmark, fns, path, budget, max_rounds=rounds, min_rounds=3)


def test_latent_cpu(benchmark, case, path, size):
    """Each path of one LoRA-served layer on the CPU (float32; weights cycled past a 96 MB cache)."""
    _bench(benchmark, case, path, torch.device("cpu"), torch.float32, 96, size)


@pytest.mark.gpu
def test_latent_gpu(benchmark, case, path, size):
    """Each path on the GPU (bfloat16; weights cycled past 200 MB)."""
    require_backend("torch", "cuda")
    _bench(benchmark, case, path, torch.device("cuda"), torch.bfloat16, 200, size)


if __name__ == "__main__":
    raise SystemExit(main())
