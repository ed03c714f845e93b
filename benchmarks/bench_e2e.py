"""End-to-end multi-adapter serving on the CPU: base model vs PEFT mixed-adapter batches vs hyperlora.

For each model and each number of distinct adapters (rank 16 on all seven Llama projections), one forward
pass of a batch in which row i uses adapter i % n, timed for

* decode  : 64 rows x 1 token, a single-token forward without a KV cache (the LoRA work of a decode step;
            attention over a cache is the same for all three and is left out),
* prefill : 16 rows x 64 tokens (quick: 4 rows x 16 tokens; logits of the last position only, as generation needs),

for the base model alone, PEFT (`PeftModel(..., adapter_names=[...])`, its mixed-adapter batch) and hyperlora
(`with rt.policies([...])`, the same adapter weights loaded with `rt.add_adapter`), each its own benchmark
(pytest-benchmark's pedantic mode: a fixed number of rounds of one forward; the three methods of a case share
a group). Models: a Llama with hidden 1024 and 4 layers (random weights from its config) and SmolLM2-135M
(the embedded weights; its config with random weights if they fail to load, and extra_info says so).
Adapters: quick 1 and 64, full 1, 8, 32 and 64.

extra_info (hyperlora): max_abs_diff_vs_peft and adapter_effect (the two adapter paths agree and differ
from the base), bytes and FLOPs of the base forward and of the adapters (each distinct adapter read once;
base = every Linear weight plus the LM head) and floor_overhead = the adapters' roofline time max(bytes / BW,
FLOPs / rate) over the base model's, with this machine's copy bandwidth and float32 GEMM rate measured in the
same session; derived after the run: speedup_vs_peft, over_base (hyperlora / base) and speedup_bound (the
best speedup over PEFT an adapter path at the floor could reach: peft / (base x (1 + floor_overhead))).

    pytest benchmarks/bench_e2e.py                      # quick (a few minutes on one thread)
    pytest benchmarks/bench_e2e.py --bench-size full    # the old full run (~7 min)
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hyperlora
from hyperlora.modeling.base_model import load_base_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py, however this file is loaded
from _common import bench_size  # noqa: E402

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32


def llama_1024(layers: int):
    """A Llama with hidden 1024 and `layers` layers, random weights from its config, and its description."""
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), f"Llama hidden 1024, {layers} layers, random weights from config"


def smollm2():
    """The embedded SmolLM2-135M (or, if it fails to load, its config with random weights), and a description."""
    try:
        model, _ = load_base_model(None)
        return model.eval(), "SmolLM2-135M-Instruct (hyperlora.modeling.base_model, dequantized Q4_1 GGUF)"
    except Exception as exc:  # fall back to the architecture with random weights, and say so
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
    from peft import LoraConfig, get_peft_model  # optional dependency (the `test` extra)
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
    """A copy of `model` with hyperlora attached, holding every adapter as 'a<i>'; (model, runtime)."""
    m = copy.deepcopy(model)
    rt = hyperlora.attach(m, target_modules=SEVEN, max_adapters=max(len(adapters), 1), max_rank=RANK,
                          apply_mode="materialized")
    for i, ad in enumerate(adapters):
        rt.add_adapter(f"a{i}", ad, scale=ALPHA / RANK)
    return m, rt


def floors(model, rows: int, tokens: int, n_adapters: int, machine: dict) -> dict:  # machine: bandwidth, flops
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




# ------------------------------------------------------------------------------------------------ pytest-benchmark
METHODS = ("base", "peft", "hyperlora")


def _sizes(size: str) -> tuple[dict[str, tuple[int, int]], list[int], dict[str, int]]:
    """(shapes {name: (rows, tokens)}, adapter counts, rounds per shape) of a suite size."""
    if size == "full":
        return {"decode": (64, 1), "prefill": (16, 64)}, [1, 8, 32, 64], {"decode": 5, "prefill": 5}
    return {"decode": (64, 1), "prefill": (4, 16)}, [1, 64], {"decode": 5, "prefill": 3}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.name != "test_e2e_cpu":
        return
    shapes, counts, _ = _sizes(bench_size(metafunc.config))
    metafunc.parametrize("e2e_model", ["llama1024", "smollm2"], indirect=True, scope="module")
    metafunc.parametrize("shape,n,method", [pytest.param(sh, n, m, id=f"{sh}-n{n}-{m}")
                                            for sh in shapes for n in counts for m in METHODS])


@pytest.fixture(scope="module")
def e2e_model(request: pytest.FixtureRequest, size: str) -> dict:
    """One model, its adapters, its PEFT copy and its hyperlora copy (built once per model)."""
    shapes, counts, rounds = _sizes(size)
    if request.param == "llama1024":
        model, desc = llama_1024(4)
    else:
        model, desc = smollm2()
    adapters = make_adapters(model, max(counts))
    with torch.no_grad():
        pm = build_peft(model, adapters)
        hm, rt = build_hyperlora(model, adapters)
    yield {"label": request.param, "model": model, "desc": desc, "pm": pm, "hm": hm, "rt": rt,
           "shapes": shapes, "rounds": rounds}
    rt.detach()


def test_e2e_cpu(benchmark, e2e_model, shape, n, method, cpu_roofline):
    """One forward of a mixed-adapter batch: the base model, PEFT and hyperlora."""
    em = e2e_model
    model, pm, hm, rt = em["model"], em["pm"], em["hm"], em["rt"]
    rows, tokens = em["shapes"][shape]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (rows, tokens), generator=g)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1, use_cache=False)
    names = [f"a{i % n}" for i in range(rows)]

    def base():
        return model(**kw).logits

    def peft():
        return pm(**kw, adapter_names=names).logits

    def hyper():
        with rt.policies(names):
            return hm(**kw).logits

    fn = {"base": base, "peft": peft, "hyperlora": hyper}[method]
    machine = {"bandwidth": cpu_roofline["copy_GBps"] * 1e9, "flops": cpu_roofline["gemm_TFLOPs"] * 1e12}
    f = floors(model, rows, tokens, n, machine)
    info = {"model": em["label"], "model_desc": em["desc"], "shape": shape, "rows": rows, "tokens": tokens,
            "adapters": n, "distinct_adapters": min(n, rows), "method": method, "rank": RANK, "lora_alpha": ALPHA,
            "roofline": cpu_roofline, **f}
    with torch.no_grad():
        if method == "hyperlora":  # correctness first (also the warm-up): the two adapter paths agree
            out_h, out_p, out_b = hyper(), peft(), base()
            info.update(max_abs_diff_vs_peft=(out_p - out_h).abs().max().item(),
                        adapter_effect=(out_p - out_b).abs().max().item())
            info["ratios"] = {"speedup_vs_peft": ["peft", "self"], "over_base": ["self", "base"],
                              "speedup_bound": ["peft", "base", 1.0 / (1.0 + f["floor_overhead"])]}
        else:
            fn()
            if method == "peft":
                info["ratios"] = {"over_base": ["self", "base"]}
        benchmark.group = f"e2e cpu {em['label']} {shape} {rows}x{tokens} adapters={n}"
        benchmark.extra_info.update(info)
        benchmark.pedantic(fn, rounds=em["rounds"][shape], iterations=1)
