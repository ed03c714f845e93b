"""latent_lora: torch reference, Triton (interpreter on CPU, real on GPU) and CUDA against float64 oracles.

Two oracles: (1) the latent formula in float64 straight from the contract, (2) the materialized path:
the adapters A, B that generate_lora would write from the same z/head, applied as `y += s * B A x`
(through hyperlora.ops.add_lora when it is there, else the float64 formula).
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from hyperlora.ops.backends import available_backends
from hyperlora.ops.latent_lora import latent_lora, latent_lora_reference, materialize_adapters

# Relative to the update's size plus |y| (see assert_close_rows): about two units of the dtype's last place.
# Measured worst over SHAPES x 5 seeds (torch backend): fp32 2.9e-7, fp16 3.7e-4, bf16 3.3e-3.
TOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make_case(seed: int, T: int, d_in: int, d_out: int, R: int, K: int, S: int, dtype: torch.dtype,
              neg_frac: float = 0.25, device: str = "cpu", with_scales: bool = True) -> dict:
    """Fresh random inputs; y is random (never zeros); slot -1 rows are poisoned with -0.0 and NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g)
    w_a = torch.randn(R * K, d_in, generator=g) / d_in ** 0.5
    w_b = torch.randn(d_out, R * K, generator=g) / (R * K) ** 0.5
    z = torch.randn(S, K, generator=g)
    z[:, -1] = 1.0  # folded bias coordinate
    slots = torch.randint(0, S, (T,), generator=g)
    slots[torch.rand(T, generator=g) < neg_frac] = -1
    y = torch.randn(T, d_out, generator=g).to(dtype)
    # poison: NaN catches reads that leak, -0.0 catches "adding zeros" (-0.0 + 0.0 == +0.0 bitwise)
    poison = torch.full((d_out,), -0.0, dtype=dtype)
    poison[1::2] = float("nan")
    y[slots < 0] = poison
    scales = torch.rand(S, generator=g) + 0.5 if with_scales else None
    dev = torch.device(device)
    return dict(y=y.to(dev), x=x.to(dev, dtype), w_a=w_a.to(dev, dtype), w_b=w_b.to(dev, dtype),
                z=z.to(dev), slots=slots.to(dev), scales=None if scales is None else scales.to(dev))


def oracle_latent(c: dict, y0: torch.Tensor | None = None) -> torch.Tensor:
    """The contract's latent formula in float64 (per-row; small shapes only), applied to y0 (default c["y"])."""
    y = (c["y"] if y0 is None else y0).double().cpu().clone()
    x, w_a, w_b = c["x"].double().cpu(), c["w_a"].double().cpu(), c["w_b"].double().cpu()
    z, slots = c["z"].double().cpu(), c["slots"].cpu()
    K = z.shape[1]
    R = w_a.shape[0] // K
    for t in range(x.shape[0]):
        s = int(slots[t])
        if s < 0:
            continue
        u = w_a @ x[t]
        st = (u.view(R, K) * z[s]).sum(-1)
        scale = 1.0 if c["scales"] is None else float(c["scales"][s])
        y[t] += scale * (w_b @ torch.outer(st, z[s]).reshape(-1))
    return y


def oracle_materialized(c: dict, y0: torch.Tensor | None = None) -> torch.Tensor:
    """y0 + scale * B_s A_s x with the adapters materialized from the same z/head, in float64."""
    a, b = materialize_adapters(c["z"].double().cpu(), c["w_a"].double().cpu(), c["w_b"].double().cpu())
    y = (c["y"] if y0 is None else y0).double().cpu().clone()
    slots = c["slots"].cpu()
    rows = (slots >= 0).nonzero().squeeze(1)
    sl = slots[rows]
    scale = torch.ones(a.shape[0], dtype=torch.float64) if c["scales"] is None else c["scales"].double().cpu()
    h = torch.einsum("ti,tri->tr", c["x"].double().cpu()[rows], a[sl])
    y[rows] += scale[sl, None] * torch.einsum("tr,tor->to", h, b[sl])
    return y


def assert_close_rows(out: torch.Tensor, ref: torch.Tensor, c: dict, dtype: torch.dtype, y_before: torch.Tensor):
    """Active rows within tolerance (relative to the update's size); slot -1 rows bitwise unchanged."""
    out, y_before, slots = out.cpu(), y_before.cpu(), c["slots"].cpu()
    inactive = slots < 0
    assert torch.equal(out[inactive].view(torch.uint8), y_before[inactive].view(torch.uint8)), \
        "rows with slot -1 were written"
    act = ~inactive
    if act.any():
        delta = (ref[act] - y_before[act].double()).abs().max().item()
        assert delta > 0, "the update is zero: the test could not fail"
        err = (out[act].double() - ref[act]).abs().max().item()
        # output rounding of y itself is relative to |y|, the update's error relative to the update
        bound = TOL[dtype] * (delta + ref[act].abs().max().item())
        assert err <= bound, f"max error {err:.3e} > {bound:.3e} (update size {delta:.3e}, {dtype})"


SHAPES = [  # T, d_in, d_out, R, K, S
    (1, 16, 8, 2, 3, 1),        # one token
    (7, 13, 11, 3, 5, 4),       # odd everything
    (33, 48, 40, 4, 9, 6),
    (64, 64, 96, 8, 17, 64),    # one policy per token-ish
]


# ----------------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_matches_float64_oracles(dtype, shape):
    torch.manual_seed(1)
    c = make_case(sum(shape), *shape, dtype=dtype)
    before = c["y"].clone()
    out = latent_lora(**c, backend="torch")
    assert out is c["y"]
    assert_close_rows(out, oracle_latent(c, before), c, dtype, before)
    assert_close_rows(out, oracle_materialized(c, before), c, dtype, before)


def test_both_oracles_agree():
    """Sanity: the latent formula and the materialized adapters are the same maths."""
    c = make_case(5, 9, 21, 17, 4, 6, 3, torch.float64)
    assert torch.allclose(oracle_latent(c), oracle_materialized(c), rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_matches_materialized_add_lora(dtype):
    """Same generated adapters through the materialized op (add_lora, scale folded into B) and the latent op."""
    from hyperlora.ops import add_lora

    c = make_case(11, 29, 40, 24, 4, 9, 5, dtype)
    a, b = materialize_adapters(c["z"].double(), c["w_a"].double(), c["w_b"].double())
    b = b * c["scales"].double()[:, None, None]
    y_mat = c["y"].clone()
    add_lora(y_mat, c["x"], a.to(dtype), b.to(dtype), c["slots"], backend="torch")
    before = c["y"].clone()
    y_lat = latent_lora(**c, backend="torch")
    ref = oracle_materialized(c, before)
    assert_close_rows(y_lat, ref, c, dtype, before)
    assert_close_rows(y_mat, ref, c, dtype, before)


def test_all_rows_inactive_and_empty():
    c = make_case(3, 5, 8, 6, 2, 3, 2, torch.float32, neg_frac=1.1)
    before = c["y"].clone()
    latent_lora(**c)
    assert torch.equal(c["y"].view(torch.int32), before.view(torch.int32))
    e = make_case(4, 0, 8, 6, 2, 3, 2, torch.float32)
    assert latent_lora(**e).shape == (0, 6)


def test_no_scales_int32_slots_and_noncontiguous_x():
    c = make_case(8, 10, 12, 9, 2, 4, 3, torch.float32, with_scales=False)
    c["slots"] = c["slots"].to(torch.int32)
    c["x"] = torch.cat([c["x"], c["x"]], dim=1)[:, ::2]
    assert not c["x"].is_contiguous()
    before = c["y"].clone()
    latent_lora(**c)
    assert_close_rows(c["y"], oracle_latent(c, before), c, torch.float32, before)


def test_autograd_matches_materialized_gradients():
    """The reference is differentiable (training through the latent path); gradcheck in float64."""
    c = make_case(9, 6, 7, 5, 2, 3, 3, torch.float64, neg_frac=0.3)
    c["y"] = torch.nan_to_num(c["y"])
    x = c["x"].clone().requires_grad_(True)
    z = c["z"].double().requires_grad_(True)

    def f(x_, z_):
        return latent_lora(c["y"].clone(), x_, c["w_a"], c["w_b"], z_, c["slots"], c["scales"])

    assert torch.autograd.gradcheck(f, (x, z))


def test_custom_op_registered_with_fake_impl():
    c = make_case(2, 6, 8, 5, 2, 3, 2, torch.float32)
    c["y"] = torch.nan_to_num(c["y"])
    args = (c["y"], c["x"], c["w_a"], c["w_b"], c["z"], c["slots"], c["scales"], "torch")
    torch.library.opcheck(torch.ops.hyperlora.latent_lora.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_compiles_fullgraph():
    c = make_case(6, 9, 16, 12, 2, 5, 3, torch.float32)
    before = c["y"].clone()
    f = torch.compile(lambda y, x: latent_lora(y, x, c["w_a"], c["w_b"], c["z"], c["slots"], c["scales"]),
                      backend="eager", fullgraph=True)
    out = f(c["y"], c["x"])
    assert_close_rows(out, oracle_latent(c, before), c, torch.float32, before)


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------
def _good():
    c = make_case(0, 4, 6, 5, 2, 3, 2, torch.float32)
    c["y"] = torch.nan_to_num(c["y"])
    return c


@pytest.mark.parametrize("arg,value,exc,needle", [
    ("x", torch.randn(4, 7), ValueError, "w_a"),
    ("x", torch.randn(4, 6, 1), ValueError, "x"),
    ("y", torch.randn(3, 5), ValueError, "y"),
    ("y", torch.randn(4, 5, dtype=torch.float64), TypeError, "y"),
    ("w_a", torch.randn(7, 6), ValueError, "w_a"),
    ("w_b", torch.randn(5, 7), ValueError, "w_b"),
    ("w_b", torch.randn(5, 6, dtype=torch.float16), TypeError, "w_b"),
    ("z", torch.randn(2, 4), ValueError, "w_a"),
    ("z", torch.randn(2), ValueError, "z"),
    ("z", torch.ones(2, 3, dtype=torch.int64), TypeError, "z"),
    ("slots", torch.tensor([0, 1, 0]), ValueError, "slots"),
    ("slots", torch.tensor([0, 1, 2, -1]), ValueError, "slots"),
    ("slots", torch.tensor([0, -2, 1, 1]), ValueError, "slots"),
    ("slots", torch.tensor([0.0, 1, 1, 1]), TypeError, "slots"),
    ("scales", torch.ones(3), ValueError, "scales"),
    ("scales", [1.0, 1.0], TypeError, "scales"),
])
def test_bad_arguments_raise_naming_them(arg, value, exc, needle):
    c = _good()
    c[arg] = value
    y_before = c["y"].clone() if isinstance(c["y"], torch.Tensor) else None
    with pytest.raises(exc, match=needle):
        latent_lora(**c)
    if y_before is not None and arg != "y":
        assert torch.equal(c["y"], y_before)


def test_bad_backend_and_float64_on_kernel_backend():
    c = _good()
    with pytest.raises(ValueError, match="backend"):
        latent_lora(**c, backend="nope")
    if available_backends()["triton"]["available"]:
        d = make_case(0, 4, 6, 5, 2, 3, 2, torch.float64)
        with pytest.raises(TypeError, match="float64"):
            latent_lora(**d, backend="triton")


def test_meta_of_wrong_type_rejected():
    with pytest.raises(TypeError, match="meta"):
        latent_lora(**_good(), meta=object())


# ----------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU: tiny shapes) and GPU backends
# ----------------------------------------------------------------------------------------------------
needs_triton = pytest.mark.skipif(not available_backends()["triton"]["available"],
                                  reason="triton not available (no GPU and TRITON_INTERPRET unset)")
INTERP_SHAPES = [(1, 16, 8, 2, 3, 1), (7, 13, 11, 3, 5, 4), (37, 40, 72, 4, 9, 6),
                 (70, 24, 20, 5, 70, 3),   # K > one column tile, R not a power of two, two token tiles
                 (5, 16, 16, 3, 1, 2),     # K = 1 (latent_dim 0: the head's bias only)
                 (9, 16, 12, 10, 3, 2)]    # R > 8: ranks split over several programs


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", INTERP_SHAPES)
def test_triton_matches_oracles(dtype, shape):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = make_case(100 + sum(shape), *shape, dtype=dtype, device=device)
    before = c["y"].clone()
    out = latent_lora(**c, backend="triton")
    assert_close_rows(out, oracle_latent(c, before), c, dtype, before)
    assert_close_rows(out, oracle_materialized(c, before), c, dtype, before)


@needs_triton
def test_triton_all_inactive_no_scales():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = make_case(7, 9, 16, 12, 2, 3, 2, torch.float32, neg_frac=1.1, device=device)
    before = c["y"].clone()
    latent_lora(**c, backend="triton")
    assert torch.equal(c["y"].view(torch.int32), before.view(torch.int32))
    d = make_case(8, 9, 16, 12, 2, 3, 2, torch.float16, device=device, with_scales=False)
    before = d["y"].clone()
    latent_lora(**d, backend="triton")
    assert_close_rows(d["y"], oracle_latent(d, before), d, torch.float16, before)


GPU_SHAPES = [(1, 576, 576, 8, 33, 4), (257, 1024, 320, 8, 33, 256), (300, 333, 577, 5, 7, 9)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_backends_match_materialized_oracle(backend, dtype, shape):
    if not available_backends()[backend]["available"]:
        pytest.skip(available_backends()[backend]["reason"])
    c = make_case(200 + sum(shape), *shape, dtype=dtype, device="cuda")
    before = c["y"].clone()
    out = latent_lora(**c, backend=backend)
    torch.cuda.synchronize()
    assert_close_rows(out, oracle_materialized(c, before), c, dtype, before)


@pytest.mark.gpu
def test_gpu_backends_agree_with_torch_backend():
    c = make_case(42, 130, 256, 192, 8, 17, 40, torch.bfloat16, device="cuda")
    ref = c["y"].clone()
    latent_lora_reference(ref, c["x"], c["w_a"], c["w_b"], c["z"], c["slots"], c["scales"])
    y_before = c["y"].clone()
    for backend in ("triton", "cuda"):
        if not available_backends()[backend]["available"]:
            continue
        y = c["y"].clone()
        latent_lora(**dict(c, y=y), backend=backend)
        # the same bf16 bound as every CPU case (two last-place units), rows with slot -1 bitwise unchanged
        assert_close_rows(y, ref.double().cpu(), c, torch.bfloat16, y_before)


def test_cuda_extension_exports_latent_lora_or_explains():
    from hyperlora.ops.backends import BackendUnavailableError, cuda_status

    st = cuda_status()
    if st["built"]:
        from hyperlora import _C

        assert callable(getattr(_C, "latent_lora", None)), "hyperlora._C was built without latent_lora"
    if not st["available"]:
        with pytest.raises(BackendUnavailableError):
            latent_lora(**_good(), backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_meta_from_build_meta_gives_same_result(backend):
    if backend == "triton" and not available_backends()["triton"]["available"]:
        pytest.skip("triton not available")
    from hyperlora.ops.metadata import build_meta

    c = make_case(21, 23, 20, 12, 3, 5, 6, torch.float32)
    before = c["y"].clone()
    ref = oracle_latent(c, before)
    latent_lora(**c, backend=backend, meta=build_meta(c["slots"], 6))
    assert_close_rows(c["y"], ref, c, torch.float32, before)
    with pytest.raises(ValueError, match="meta"):
        latent_lora(**c, meta=build_meta(c["slots"][:5], 6))


# ----------------------------------------------------------------------------------------------------
# runtime: attach(apply_mode="latent" / "auto") against "materialized"
# ----------------------------------------------------------------------------------------------------
RT_POLICIES = ["Refuse to discuss pricing.", None, "Answer in French.", "Refuse to discuss pricing."]


def _runtime_logits(apply_mode: str, entries: list, peft_dir=None, monkeypatch=None):
    import os
    import sys

    from runtime_helpers import forward_logits, hash_encoder, padded_batch, tiny_hypernet, tiny_model

    import hyperlora

    model = tiny_model("llama")
    hn = tiny_hypernet(model, ["q_proj", "v_proj", "down_proj"])
    rt = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=8, max_rank=8, apply_mode=apply_mode)
    names = {}
    if peft_dir is not None:
        names["PEFT"] = rt.load_peft(peft_dir, name="peft-a")
    ids, mask, _ = padded_batch([7, 5, 7, 6])
    base = forward_logits(model, ids, mask)
    with rt.policies([names.get(e, e) for e in entries]):
        got = forward_logits(model, ids, mask)
    rt.detach()
    return base, got


def _count_latent_calls(monkeypatch):
    mod = importlib.import_module("hyperlora.runtime.layers")  # where the runtime's layers look the op up

    calls = []
    real = mod.latent_lora

    def counting(*a, **k):
        calls.append(a[1].shape)
        return real(*a, **k)

    monkeypatch.setattr(mod, "latent_lora", counting)
    return calls


def test_attach_latent_gives_materialized_logits(monkeypatch):
    base, mat = _runtime_logits("materialized", RT_POLICIES)
    calls = _count_latent_calls(monkeypatch)
    base2, lat = _runtime_logits("latent", RT_POLICIES)
    assert calls, "apply_mode='latent' never reached latent_lora"
    assert torch.equal(base, base2)
    assert torch.equal(lat[1].view(torch.int32), base[1].view(torch.int32)), "a row without policy changed"
    assert (mat[0] - base[0]).abs().max() > 1e-2, "the adapters are a no-op: the test could not fail"
    torch.testing.assert_close(lat, mat, rtol=1e-4, atol=1e-4)


def test_attach_latent_with_peft_rows_in_the_same_batch(monkeypatch, tmp_path):
    import os
    import sys

    from runtime_helpers import make_peft_dir, tiny_model

    peft_dir = make_peft_dir(tiny_model("llama"), tmp_path / "peft-a", targets=("q_proj", "v_proj"))
    entries = ["Refuse to discuss pricing.", "PEFT", None, "Answer in French."]
    _, mat = _runtime_logits("materialized", entries, peft_dir)
    calls = _count_latent_calls(monkeypatch)
    _, lat = _runtime_logits("latent", entries, peft_dir)
    assert calls
    torch.testing.assert_close(lat, mat, rtol=1e-4, atol=1e-4)


def test_attach_auto_logs_choice_and_matches(caplog):
    import logging

    _, mat = _runtime_logits("materialized", RT_POLICIES)
    with caplog.at_level(logging.DEBUG, logger="hyperlora"):
        _, auto = _runtime_logits("auto", RT_POLICIES)
    torch.testing.assert_close(auto, mat, rtol=1e-4, atol=1e-4)
    assert any(r.name.startswith("hyperlora") and "path" in r.getMessage() for r in caplog.records)


def test_backend_choice_on_cpu_and_forced(monkeypatch):
    from hyperlora.ops.latent_lora import _pick_backend

    monkeypatch.delenv("HYPERLORA_BACKEND", raising=False)
    assert _pick_backend(None, torch.device("cpu")) == "torch"
    if available_backends()["triton"]["available"]:
        assert _pick_backend("triton", torch.device("cpu")) == "triton"


@pytest.mark.gpu
def test_gpu_auto_backend_prefers_triton_unless_forced(monkeypatch):
    from hyperlora.ops.latent_lora import _pick_backend

    monkeypatch.delenv("HYPERLORA_BACKEND", raising=False)
    dev = torch.device("cuda")
    if available_backends()["triton"]["available"]:
        assert _pick_backend(None, dev) == "triton"
    if available_backends()["cuda"]["available"]:
        assert _pick_backend("cuda", dev) == "cuda"
        monkeypatch.setenv("HYPERLORA_BACKEND", "cuda")
        assert _pick_backend(None, dev) == "cuda"


def test_bench_latent_smoke(tmp_path, monkeypatch):
    """The crossover benchmark runs end to end on a tiny grid and writes its JSON (keeps it from rotting)."""
    import importlib.util as iu
    import json
    import os

    monkeypatch.setenv("HYPERLORA_CALIBRATE", "0")
    path = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "benchmarks", "bench_latent.py")
    spec = iu.spec_from_file_location("bench_latent_smoke", path)
    bench = iu.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--no-sweep", "--hidden", "64", "--policies", "1", "8", "--tokens-per-policy",
                       "1", "--cold-mb", "0", "--threads", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["summary"]["cases"] == 2 and len(data["rows"]) == 2
    for r in data["rows"]:
        assert r["materialized_ms"] > 0 and r["latent_ms"] > 0 and r["auto_path"] in ("materialized", "latent")
        assert r["regret"] >= 1.0


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [
    dict(block_t=16, block_d=16, block_n=16, r_per_prog=2, splits=3, expand_block_t=32),   # split d_in
    dict(block_t=32, block_d=32, block_n=32, r_per_prog=1, splits=2, expand_block_t=16),
    dict(block_t=16, block_d=64, block_n=64, r_per_prog=4, splits=1, expand_block_t=64, block_o=16, block_j=16),
])
def test_triton_launch_configs(dtype, cfg):
    """Every tiling the GPU heuristic can produce (split d_in, several ranks per program, separate expand
    tiles) gives the oracle's result; the heuristic itself only picks among these."""
    from hyperlora.kernels.latent_lora import LaunchConfig, latent_lora_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = make_case(300 + cfg["splits"], 37, 40, 29, 5, 9, 4, dtype, device=device)
    before = c["y"].clone()
    ref = oracle_materialized(c, before)
    latent_lora_triton(c["y"], c["x"], c["w_a"], c["w_b"], c["z"], c["slots"], c["scales"], config=LaunchConfig(**cfg))
    assert_close_rows(c["y"], ref, c, dtype, before)


def test_gpu_launch_heuristic_shapes(monkeypatch):
    """The GPU heuristic (run on the CPU with a faked SM count): decode splits d_in, prefill does not."""
    import hyperlora.kernels.latent_lora as kl

    if not available_backends()["triton"]["available"]:
        pytest.skip("triton not importable")
    monkeypatch.setattr(kl, "triton_interpreting", lambda: False)
    monkeypatch.setattr(kl, "_sm_count", lambda device: 132)
    dec = kl.launch_config(256, 4096, 4096, 8, 33, torch.device("cpu"))
    assert dec.block_t == 64 and dec.splits > 1 and dec.r_per_prog == 1
    assert 4 * 8 * dec.splits >= 132
    pre = kl.launch_config(8192, 4096, 4096, 8, 33, torch.device("cpu"))
    assert pre.splits == 1 and pre.block_t == 64 and pre.expand_block_t == 64
    one = kl.launch_config(1, 576, 576, 8, 33, torch.device("cpu"))
    assert one.block_t == 16 and one.expand_block_t == 16
