"""End-to-end multi-adapter serving on the CPU: base model vs PEFT mixed-adapter batches vs hyperlora.

For each model and each number of distinct adapters (rank 16 on all seven Llama projections), one forward
pass of a batch in which row i uses adapter i % n, timed for

* decode  : 64 rows x 1 token, a single-token forward without a KV cache (the LoRA work of a decode step;
            attention over a cache is the same for all three and is left out),
* prefill : 16 rows x 64 tokens (logits of the last position only, as generation needs),

for the base model alone, PEFT (`PeftModel(..., adapter_names=[...])`, its mixed-adapter batch) and hyperlora
(`with rt.policies([...])`, the same adapter weights loaded with `rt.add_adapter`). Methods are interleaved
per repetition and the median is reported. Beside the measured overhead over the base model it prints the
floor implied by bytes and FLOPs: the adapters' roofline time max(bytes / BW, FLOPs / rate) over the base
model's, with this machine's copy bandwidth and float32 GEMM rate measured in the same run (each distinct
adapter's A and B read once; base = every Linear weight plus the LM head).

    python benchmarks/bench_e2e.py --threads 1   # full run (~5 min; one thread: the 2-core box is shared)
    python benchmarks/bench_e2e.py --quick       # smoke run

Writes benchmarks/results/e2e_<host>_<date>.json (with machine, date and command).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_machine.py, however this file is loaded
from _machine import cpu_model  # noqa: E402

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32


def llama_1024(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), f"Llama hidden 1024, {layers} layers, random weights from config"


def smollm2(quick: bool):
    try:
        from hyperlora.modeling.base_model import load_base_model

        model, _ = load_base_model(None)
        return model.eval(), "SmolLM2-135M-Instruct (hyperlora.modeling.base_model, dequantized Q4_1 GGUF)"
    except Exception as exc:  # fall back to the architecture with random weights, and say so
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                          max_position_embeddings=8192)
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval(), f"SmolLM2-135M config with RANDOM weights (load failed: {exc})"


def make_adapters(model, n: int, seed: int = 0) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """n random rank-16 adapters on every q/k/v/o/gate/up/down module: {name: (A [r, d_in], B [d_out, r])}."""
    g = torch.Generator().manual_seed(seed)
    names = [(n_, m) for n_, m in model.named_modules() if n_.rsplit(".", 1)[-1] in SEVEN]
    out = []
    for _ in range(n):
        ad = {}
        for name, m in names:
            ad[name] = (torch.randn(RANK, m.in_features, generator=g) / m.in_features ** 0.5,
                        torch.randn(m.out_features, RANK, generator=g) * 0.02)
        out.append(ad)
    return out


def build_peft(model, adapters):
    """A PeftModel (on a copy of `model`) holding every adapter as 'a<i>' with the given weights."""
    from peft import LoraConfig, get_peft_model

    from peft.tuners.lora import LoraLayer

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=SEVEN, lora_dropout=0.0)
    # low_cpu_mem_usage: adapter weights start on the meta device (no init), then get ours assigned
    pm = get_peft_model(copy.deepcopy(model), cfg, adapter_name="a0", low_cpu_mem_usage=True)
    # PeftModel.add_adapter re-walks every module per call (quadratic: ~4 min for 64 adapters on SmolLM2
    # here), so the other adapters are added with PEFT's own per-layer LoraLayer.update_layer, which builds
    # the same lora_A / lora_B modules add_adapter would; the forward is PEFT's unchanged.
    layers = [m for m in pm.base_model.model.modules() if isinstance(m, LoraLayer)]
    for i in range(1, len(adapters)):
        pm.peft_config[f"a{i}"] = cfg
        for layer in layers:
            layer.update_layer(f"a{i}", RANK, ALPHA, config=cfg)
    mods = dict(pm.base_model.model.named_modules())
    for i, ad in enumerate(adapters):
        for name, (a, b) in ad.items():
            layer = mods[name]
            layer.lora_A[f"a{i}"].weight = torch.nn.Parameter(a, requires_grad=False)
            layer.lora_B[f"a{i}"].weight = torch.nn.Parameter(b, requires_grad=False)
    assert not any(p.is_meta for p in pm.parameters()), "some PEFT weights were left on the meta device"
    return pm.eval()


def build_hyperlora(model, adapters):
    import hyperlora

    m = copy.deepcopy(model)
    rt = hyperlora.attach(m, target_modules=SEVEN, max_adapters=max(len(adapters), 1), max_rank=RANK,
                          apply_mode="materialized")
    for i, ad in enumerate(adapters):
        rt.add_adapter(f"a{i}", ad, scale=ALPHA / RANK)
    return m, rt


def calibrate() -> dict:
    """This machine's streaming bandwidth (a 256 MB copy: bytes read + written) and float32 GEMM rate, measured
    with the benchmark's thread count, in the same run (the CPU is shared, so nominal figures mean little)."""
    src = torch.randn(32 << 20)
    dst = torch.empty_like(src)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    t = time_all({"copy": lambda: dst.copy_(src), "gemm": lambda: a @ b}, 5)
    return {"bandwidth": 2 * src.numel() * 4 / t["copy"], "flops": 2 * 1024 ** 3 / t["gemm"]}


def floors(model, rows: int, tokens: int, n_adapters: int, machine: dict) -> dict:
    """Bytes and FLOPs of the base forward and of the adapters (each distinct adapter read once), and the
    roofline floor of the adapters' overhead: max(bytes / BW, FLOPs / rate) of the adapters over the base's."""
    el = 4
    lin_params = sum(m.weight.numel() for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and n != "lm_head")
    head = model.get_output_embeddings().weight.numel()
    T = rows * tokens
    lm_rows = rows  # logits of the last position only
    base_bytes = (lin_params + head) * el
    base_flops = 2 * T * lin_params + 2 * lm_rows * head
    per_adapter = sum(RANK * (m.in_features + m.out_features) for n, m in model.named_modules()
                      if n.rsplit(".", 1)[-1] in SEVEN)
    used = min(n_adapters, rows)
    ad_bytes, ad_flops = used * per_adapter * el, 2 * T * per_adapter
    bw, fl = machine["bandwidth"], machine["flops"]
    base_floor = max(base_bytes / bw, base_flops / fl)
    ad_floor = max(ad_bytes / bw, ad_flops / fl)
    return {"base_bytes": base_bytes, "base_flops": base_flops, "adapter_bytes": ad_bytes, "adapter_flops": ad_flops,
            "bytes_overhead": ad_bytes / base_bytes, "flops_overhead": ad_flops / base_flops,
            "base_floor_s": base_floor, "adapter_floor_s": ad_floor, "floor_overhead": ad_floor / base_floor}


def time_all(fns: dict, reps: int, warm: bool = True) -> dict:
    """Median seconds of each function; repetitions interleave the functions (fair under a shared CPU)."""
    if warm:
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run_model(label: str, model, desc: str, counts: list[int], shapes: dict, reps: dict, machine: dict) -> list[dict]:
    print(f"\n== {label}: {desc}")
    t0 = time.perf_counter()
    adapters = make_adapters(model, max(counts))
    t1 = time.perf_counter()
    pm = build_peft(model, adapters)
    t2 = time.perf_counter()
    hm, rt = build_hyperlora(model, adapters)
    t3 = time.perf_counter()
    print(f"   setup: {max(counts)} adapters (rank {RANK}, {len(SEVEN)} projections) made in {t1 - t0:.1f} s, PEFT "
          f"model {t2 - t1:.1f} s, hyperlora {t3 - t2:.1f} s")
    vocab = model.config.vocab_size
    rows_out = []
    for shape, (rows, tokens) in shapes.items():
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (rows, tokens), generator=g)
        mask = torch.ones_like(ids)
        kw = dict(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)

        with torch.no_grad():
            ref_base = model(**kw).logits
        done_distinct: dict[int, dict] = {}
        for n in counts:
            if min(n, rows) in done_distinct:  # e.g. prefill's 16 rows: 32 and 64 adapters both use 16
                prev = done_distinct[min(n, rows)]
                print(f"   {shape:7s} {rows:3d}x{tokens:<3d} n={n:<3d} the same batch as n={prev['adapters']} "
                      f"({rows} rows, so {min(n, rows)} distinct adapters): not re-measured")
                rows_out.append({**prev, "adapters": n, "same_batch_as_adapters": prev["adapters"]})
                continue
            names = [f"a{i % n}" for i in range(rows)]

            def base():
                return model(**kw).logits

            def peft():
                return pm(**kw, adapter_names=names).logits

            def hyper():
                with rt.policies(names):
                    return hm(**kw).logits

            with torch.no_grad():
                # correctness first (these runs are also the warm-up): the two adapter paths agree, and
                # differ from the base model
                out_p, out_h = peft(), hyper()
                diff = (out_p - out_h).abs().max().item()
                moved = (out_p - ref_base).abs().max().item()
                t = time_all({"base": base, "peft": peft, "hyperlora": hyper}, reps[shape], warm=False)
            f = floors(model, rows, tokens, n, machine)
            rec = {"model": label, "shape": shape, "rows": rows, "tokens": tokens, "adapters": n,
                   "base_s": t["base"], "peft_s": t["peft"], "hyperlora_s": t["hyperlora"],
                   "speedup_vs_peft": t["peft"] / t["hyperlora"],
                   "hyperlora_overhead": t["hyperlora"] / t["base"] - 1, "peft_overhead": t["peft"] / t["base"] - 1,
                   "max_abs_diff_vs_peft": diff, "adapter_effect": moved, **f}
            # the best speedup over PEFT any adapter path could reach here: its adapters at the floor
            rec["speedup_bound"] = t["peft"] / (t["base"] * (1 + f["floor_overhead"]))
            rows_out.append(rec)
            done_distinct[min(n, rows)] = rec
            floor = f["floor_overhead"]
            print(f"   {shape:7s} {rows:3d}x{tokens:<3d} n={n:<3d} base {t['base'] * 1e3:8.1f} ms | peft "
                  f"{t['peft'] * 1e3:8.1f} ms | hyperlora {t['hyperlora'] * 1e3:8.1f} ms | x{rec['speedup_vs_peft']:.2f} "
                  f"vs peft | overhead hl {rec['hyperlora_overhead'] * 100:6.1f}% peft {rec['peft_overhead'] * 100:7.1f}%"
                  f" | floor {floor * 100:5.1f}% (bytes {f['bytes_overhead'] * 100:.0f}%, flops "
                  f"{f['flops_overhead'] * 100:.1f}%) | bound x{rec['speedup_bound']:.2f} | max|peft-hl| {diff:.1e}")
    rt.detach()
    return rows_out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes and few repetitions (smoke test)")
    ap.add_argument("--models", default="llama1024,smollm2", help="comma list: llama1024, smollm2")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per shape (default: decode 5, prefill 2)")
    ap.add_argument("--shapes", default="decode,prefill", help="comma list: decode, prefill")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    counts = [1, 64] if args.quick else [1, 8, 32, 64]
    shapes = {"decode": (64, 1), "prefill": (16, 64)} if not args.quick else {"decode": (64, 1), "prefill": (4, 16)}
    shapes = {k: v for k, v in shapes.items() if k in args.shapes.split(",")}
    # prefill forwards cost seconds each on this CPU: fewer repetitions there
    reps = {"decode": args.reps or (2 if args.quick else 5), "prefill": args.reps or 2}
    results = []
    t_start = time.perf_counter()
    with torch.no_grad():
        machine = calibrate()
    print(f"machine: {machine['bandwidth'] / 1e9:.1f} GB/s copy, {machine['flops'] / 1e9:.1f} GFLOP/s float32 GEMM, "
          f"{torch.get_num_threads()} thread(s); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for name in args.models.split(","):
        name = name.strip()
        if name == "llama1024":
            model, desc = llama_1024(2 if args.quick else 4)
        elif name == "smollm2":
            model, desc = smollm2(args.quick)
        else:
            raise SystemExit(f"unknown model {name!r}: choose llama1024, smollm2")
        with torch.no_grad():
            results += run_model(name, model, desc, counts, shapes, reps, machine)
        del model
    total = time.perf_counter() - t_start
    print(f"\nsummary (speedup of hyperlora over PEFT; targets: >= 2x decode at 64 adapters, >= 1.2x prefill):")
    for r in results:
        if r["adapters"] == max(counts):
            print(f"   {r['model']:10s} {r['shape']:7s} n={r['adapters']}: x{r['speedup_vs_peft']:.2f} (an adapter path "
                  f"at the bytes/FLOPs floor would give x{r['speedup_bound']:.2f}; hyperlora overhead "
                  f"{r['hyperlora_overhead'] * 100:.0f}% vs floor {r['floor_overhead'] * 100:.0f}%)")
    info = {
        "benchmark": "bench_e2e", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(), "machine": platform.machine(), "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "decode_note": "64 rows x 1 token, single-token forward without KV cache",
        "quick": args.quick, "reps": reps, "calibration": machine, "load_average_start": load0,
        "load_average_end": os.getloadavg()[0], "rank": RANK, "lora_alpha": ALPHA, "seconds": total, "results": results,
    }
    try:
        import peft
        import transformers

        info.update(peft=peft.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        f"e2e_{'quick_' if args.quick else ''}{'_'.join(shapes) + '_' if len(shapes) == 1 else ''}"
        f"{socket.gethostname()}_{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {out} ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
