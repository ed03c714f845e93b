"""Benchmark: policy text -> adapter in the pool, for 1, 8 and 64 new policies.

Times, separately and in the same run:
  encoder      PolicyEncoder (all-MiniLM-L6-v2) on P new texts (never cached); [bf16] = dtype=torch.bfloat16
  hyperlora    allocate P slots + HyperNetwork.generate_into_pool (trunk once, one generate_lora launch per
               module type, written straight into the pool)
  batched+copy the same hypernetwork, but A/B materialized by `generate` first, then copied into the slots
  t2l-style    T2L's way: one policy at a time, A/B for all layers of a type, a per-module state dict, then
               each module copied into place (T2L writes it to disk and vLLM loads it; we skip the disk)

Shapes are built without loading weights: SmolLM2-135M (hidden 576, 30 layers, q_proj 576->576, v_proj
576->192, rank 8) on the CPU; a 7B model (hidden 4096, 32 layers, q/k/v/o 4096->4096, rank 8) on a GPU.

    python benchmarks/bench_generate.py                  # CPU, SmolLM2-135M shapes
    python benchmarks/bench_generate.py --model 7b       # GPU (cuda), 7B shapes
Writes benchmarks/results/bench_generate_<model>_<device>.json (machine, date, command, every timing).
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

import torch

from hyperlora.hypernets.t2l.hypernet import HyperNetwork, HyperNetworkConfig
from hyperlora.adapters.pool import AdapterPool

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_machine.py, however this file is loaded
from _machine import machine_info  # noqa: E402

MODELS = {
    # name: (hidden, layers, {type: (d_in, d_out)})
    "smollm2-135m": (576, 30, {"q_proj": (576, 576), "v_proj": (576, 192)}),
    "7b": (4096, 32, {t: (4096, 4096) for t in ("q_proj", "k_proj", "v_proj", "o_proj")}),
}


def build_hypernet(model: str, rank: int, latent_dim: int, device: str) -> HyperNetwork:
    """A HyperNetwork for the model's target shapes, built from a config alone (no base weights loaded)."""
    _, layers, shapes = MODELS[model]
    names = {t: [f"model.layers.{i}.self_attn.{t}" for i in range(layers)] for t in shapes}
    cfg = HyperNetworkConfig(rank=rank, latent_dim=latent_dim, task_emb_dim=384, target_modules=list(shapes),
                             module_shapes={t: list(s) for t, s in shapes.items()}, module_names=names,
                             layer_indices={t: list(range(layers)) for t in shapes}, num_layers=layers,
                             lora_alpha=2.0 * rank, base_model_type="llama")
    hn = HyperNetwork(cfg)
    with torch.no_grad():
        for t in hn.types:
            hn.head(t)[1].normal_(0, 0.02)  # a trained head is not zero; keep the numbers realistic
    return hn.to(device).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `fn()` per repeat (device synchronized before and after)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def ours(hn: HyperNetwork, pool: AdapterPool, emb: torch.Tensor, tag: str, backend: str | None) -> None:
    keys = [AdapterPool.content_key(tag, f"policy {i}", hn.config.rank, hn.config.scale) for i in range(emb.shape[0])]
    slots = [pool.allocate(k, hn.config.rank, hn.config.scale) for k in keys]
    hn.generate_into_pool(emb, pool, slots, backend=backend)
    for k in keys:
        pool.remove(k)


@torch.no_grad()
def batched_copy(hn: HyperNetwork, pool: AdapterPool, emb: torch.Tensor) -> None:
    """Materialize every A/B with `generate`, then copy them into the slots (one scatter per type)."""
    P = emb.shape[0]
    slots = torch.arange(P, device=pool.device)
    R, scale = hn.config.rank, hn.config.scale
    for t, (a, b) in hn.generate(emb).items():
        a_buf, b_buf = pool.buffers(t)
        a_buf[:, slots, :R] = a.transpose(0, 1).to(a_buf.dtype)
        a_buf[:, slots, R:] = 0
        b_buf[:, slots, :, :R] = (b.transpose(0, 1) * scale).to(b_buf.dtype)
        b_buf[:, slots, :, R:] = 0


@torch.no_grad()
def t2l_style(hn: HyperNetwork, pool: AdapterPool, emb: torch.Tensor) -> None:
    """T2L's flow: one description at a time, the head applied to every layer of a module type at once
    (T2L's `gen_lora` batches layers), giving a per-module LoRA state dict that is then copied into place
    module by module (what loading it into serving slots does; T2L itself writes it to disk first)."""
    R, K, scale = hn.config.rank, hn.config.K, hn.config.scale
    for p in range(emb.shape[0]):
        z = hn.latents(emb[p:p + 1])
        state: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for t in hn.types:
            w_a, w_b = hn.head(t)
            a = torch.einsum("lk,rki->lri", z[t][0], w_a.view(R, K, -1))
            b = torch.einsum("lk,ork->lor", z[t][0], w_b.view(-1, R, K))
            for li, name in enumerate(hn.module_names(t)):
                state[name] = (a[li], b[li])
        for name, (a, b) in state.items():
            la, lb = pool.lora_a(name)[p], pool.lora_b(name)[p]
            la[:R].copy_(a)
            la[R:].zero_()
            lb[:, :R].copy_(b * scale)
            lb[:, R:].zero_()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default=None, help="default: smollm2-135m on CPU, 7b on GPU")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--policies", default="1,8,64")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-rank", type=int, default=16, help="pool max_rank (ranks above the adapter's are zeroed)")
    ap.add_argument("--latent-dim", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", default=None, help="comma list for hyperlora (default: auto; on GPU cuda,triton,torch)")
    ap.add_argument("--no-encoder", action="store_true")
    ap.add_argument("--skip-t2l-above", type=int, default=10**9, help="skip the slow baseline above this P")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = args.model or ("7b" if device.startswith("cuda") else "smollm2-135m")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    Ps = [int(p) for p in args.policies.split(",")]
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = ["cuda", "triton", "torch"] if device.startswith("cuda") else [None]
    hn = build_hypernet(model, args.rank, args.latent_dim, device)
    pool = AdapterPool(hn.targets(), max_adapters=max(Ps), max_rank=args.max_rank, dtype=dtype, device=device)
    encoders = {}
    if not args.no_encoder:
        from hyperlora.hypernets.t2l.minilm import PolicyEncoder

        encoders["encoder"] = PolicyEncoder(device=device)
        encoders["encoder[bf16]"] = PolicyEncoder(device=device, dtype=torch.bfloat16)
    rows = []
    load_before = machine_info().get("loadavg_at_start")
    for P in Ps:
        texts_base = [f"Policy {i}: never discuss topic number {i} and always answer within {i + 3} sentences."
                      for i in range(P)]
        emb = torch.randn(P, 384, device=device)
        emb = torch.nn.functional.normalize(emb, dim=-1)
        row: dict = {"policies": P}
        for ename, enc in encoders.items():
            counter = [0]

            def encode(enc=enc) -> None:
                counter[0] += 1  # new texts every repeat: the cache never hits
                enc.encode([f"{t} (v{counter[0]})" for t in texts_base])

            row[ename + "_s"] = statistics.median(timed(encode, device, args.repeats))
        for be in backends:
            name = f"hyperlora[{be or 'auto'}]"
            try:
                ts = timed(lambda: ours(hn, pool, emb, f"bench-{be}", be), device, args.repeats)
                row[name + "_s"] = statistics.median(ts)
            except Exception as exc:  # a backend unavailable here: record why
                row[name + "_error"] = f"{type(exc).__name__}: {exc}"
        row["batched+copy_s"] = statistics.median(timed(lambda: batched_copy(hn, pool, emb), device, args.repeats))
        if P <= args.skip_t2l_above:
            reps = max(1, min(args.repeats, 3)) if P >= 64 else args.repeats
            row["t2l-style_s"] = statistics.median(timed(lambda: t2l_style(hn, pool, emb), device, reps))
        rows.append(row)

    cols = sorted({k for r in rows for k in r if k.endswith("_s")}, key=lambda c: (not c.startswith("encoder"), c))
    print(f"\npolicy -> adapter in pool: {model} shapes, rank {args.rank}, latent {args.latent_dim}, pool "
          f"max_rank {args.max_rank}, {dtype}, {device} ({machine_info().get('gpu') or machine_info()['cpu']})")
    print(f"{'P':>4} " + " ".join(f"{c[:-2]:>20}" for c in cols) + "   (milliseconds, median)")
    for r in rows:
        print(f"{r['policies']:>4} " + " ".join(f"{r[c] * 1e3:>20.2f}" if c in r else f"{'-':>20}" for c in cols))
    ours_cols = [c for c in cols if c.startswith("hyperlora")]
    for r in rows:
        if "t2l-style_s" in r and ours_cols:
            best = min(r[c] for c in ours_cols if c in r)
            print(f"  P={r['policies']}: fastest hyperlora {best * 1e3:.2f} ms vs t2l-style {r['t2l-style_s'] * 1e3:.2f} ms"
                  f" ({r['t2l-style_s'] / best:.1f}x)")
    for r in rows:
        for k, v in r.items():
            if k.endswith("_error"):
                print(f"  P={r['policies']} {k}: {v}")
    result = {"benchmark": "bench_generate", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine_info(), "model_shapes": model,
              "targets": {t: list(s) for t, s in MODELS[model][2].items()}, "layers": MODELS[model][1],
              "rank": args.rank, "latent_dim": args.latent_dim, "pool_max_rank": args.max_rank, "dtype": str(dtype),
              "device": device, "repeats": args.repeats, "loadavg_1m_before": load_before, "rows": rows}
    out = Path(args.out) if args.out else (Path(__file__).parent / "results" /
                                           f"bench_generate_{model}_{device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
