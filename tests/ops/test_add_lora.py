"""add_lora against a float64 per-token reference, for every backend that can run here.

torch always; triton in the CPU interpreter (TRITON_INTERPRET=1, set before the kernel module is imported)
or on a GPU; cuda only on a GPU. GPU-marked tests rerun the same cases on CUDA tensors.
"""
from __future__ import annotations

import os

import torch  # noqa: E402

if not torch.cuda.is_available():  # before hyperlora.kernels.add_lora is imported (tests/conftest.py does too)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hyperlora.ops.backends import BackendUnavailableError, available_backends  # noqa: E402
from hyperlora.ops.add_lora import add_lora  # noqa: E402
from hyperlora.ops.metadata import LoraBatchMeta, build_meta  # noqa: E402

HAS_GPU = torch.cuda.is_available()
TRITON_OK = available_backends()["triton"]["available"]
CPU_BACKENDS = ["torch"] + (["triton"] if TRITON_OK and not HAS_GPU else [])
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float64: 2.0 ** -52}


# ----------------------------------------------------------------------------------------------------
# oracle and helpers
# ----------------------------------------------------------------------------------------------------
def reference(y, x, a, b, slots, scales, ranks):
    """float64, one token at a time: the contract written as plainly as possible."""
    out = y.double().clone()
    S, R = a.shape[0], a.shape[1]
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        r = R if ranks is None else int(ranks[s])
        sc = 1.0 if scales is None else float(scales[s])
        out[t] += sc * (x[t].double() @ a[s, :r].double().T) @ b[s, :, :r].double().T
    return out


def make_case(T, S, R, d_in, d_out, dtype, device, slots=None, mixed_ranks=False, with_scales=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g).to(dtype)
    a = (torch.randn(S, R, d_in, generator=g) / d_in ** 0.5).to(dtype)
    b = torch.randn(S, d_out, R, generator=g).to(dtype)
    if slots is None:
        slots = torch.randint(-1, S, (T,), generator=g)
    scales = (torch.rand(S, generator=g) + 0.5) if with_scales else None
    ranks = None
    if mixed_ranks:
        ranks = torch.randint(0, R + 1, (S,), generator=g).to(torch.int32)
        ranks[0] = 0
        ranks[-1] = R
        # poison the unused rank rows/columns: they must never be read
        for s in range(S):
            a[s, int(ranks[s]):] = float("nan")
            b[s, :, int(ranks[s]):] = float("nan")
    y = torch.randn(T, d_out, generator=g).to(dtype)
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(y), mv(x), mv(a), mv(b), mv(slots), mv(scales), mv(ranks)


def poison_untouched(y, slots):
    """Fill rows with slot -1 with NaN (and a negative zero) so any write to them is visible."""
    rows = (slots < 0).nonzero().squeeze(1)
    if rows.numel():
        y[rows] = float("nan")
        y[rows[0], 0] = -0.0
    return y


def assert_bits_equal(a, b):
    if a.dtype == torch.bfloat16 or a.dtype == torch.float16:
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    elif a.dtype == torch.float32:
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    else:
        assert torch.equal(a.view(torch.int64), b.view(torch.int64))


def assert_matches(out, ref, slots, dtype, x_scale=1.0):
    act = slots >= 0
    got = out[act].double().cpu()
    want = ref[act].cpu()
    # one rounding of the result to `dtype` plus float32 accumulation on O(1) magnitudes
    tol = 4 * EPS[dtype] if dtype != torch.float32 else 2e-5
    err = (got - want).abs()
    bound = tol * (want.abs() + 1.0) * x_scale
    assert torch.all(err <= bound), f"max err {err.max().item():.3g} (bound at that point {bound.flatten()[err.argmax()]:.3g})"


def run_and_check(backend, device, dtype, T, S, R, d_in, d_out, slots=None, mixed_ranks=False,
                  with_scales=True, seed=0):
    torch.manual_seed(seed)
    y, x, a, b, slots, scales, ranks = make_case(T, S, R, d_in, d_out, dtype, device, slots, mixed_ranks,
                                                 with_scales, seed)
    poison_untouched(y, slots)
    y0 = y.clone()
    ref = reference(y0, x, a, b, slots, scales, ranks)
    out = add_lora(y, x, a, b, slots, scales, ranks, backend=backend)
    assert out is y
    assert_matches(y, ref, slots, dtype)
    none = slots < 0
    assert_bits_equal(y[none], y0[none])
    return y


CASES = {
    #               T,  S, R, d_in, d_out, slots
    "odd_sizes": (37, 5, 8, 19, 23, None),
    "one_token": (1, 3, 4, 17, 9, torch.tensor([2])),
    "missing_slots": (12, 9, 4, 16, 16, torch.tensor([8, 0, 8, -1, 0, 3, 8, -1, 3, 3, 0, 8])),
    "all_minus_one": (7, 4, 4, 8, 8, torch.full((7,), -1)),
    "non_contiguous": (24, 4, 8, 32, 40, torch.arange(24) % 4),
    "one_slot_prefill": (50, 2, 16, 24, 36, torch.ones(50, dtype=torch.int64)),
    "rank_one": (9, 3, 1, 5, 7, None),
    "big_rank": (10, 3, 96, 16, 20, None),
    "decode_distinct": (6, 8, 4, 16, 12, torch.tensor([5, 0, 7, -1, 2, 3])),
    "decode_batched": (21, 24, 4, 16, 12, torch.tensor([23, 0, 7, -1, 2, 3, 9, 1, 4, 5, 6, 8, 10, 11, 12, 13,
                                                         14, 15, 16, -1, 22])),
    "sparse_pool": (5, 40, 4, 8, 8, torch.tensor([39, 2, 2, -1, 39])),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------------------------------
# correctness, CPU
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(backend, dtype, case):
    T, S, R, d_in, d_out, slots = CASES[case]
    run_and_check(backend, "cpu", dtype, T, S, R, d_in, d_out, slots)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_ranks_including_zero(backend, dtype):
    # unused rank rows/columns are NaN: reading them would poison the output
    run_and_check(backend, "cpu", dtype, 29, 6, 8, 21, 13, mixed_ranks=True, seed=3)
    # one token per adapter, many adapters (the batched decode path of the torch backend)
    run_and_check(backend, "cpu", dtype, 20, 20, 8, 21, 13, slots=torch.randperm(20), mixed_ranks=True, seed=4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", ["one_each", "three_each", "uneven", "half_pool"])
def test_decode_over_most_of_the_pool_with_common_rank(backend, dtype, pattern):
    """Most slots used, few tokens each, one common rank below R (NaN past it): the torch backend's
    dense path (bmm over the pool's strided views) and the kernels must agree with the oracle."""
    torch.manual_seed(21)
    S, R, d_in, d_out = 10, 8, 24, 20
    slots = {"one_each": torch.randperm(S),
             "three_each": (torch.arange(3 * S) % S)[torch.randperm(3 * S)],
             "uneven": torch.tensor([0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, -1]),
             "half_pool": torch.tensor([9, 7, 5, 3, 1, -1, 1])}[pattern]
    y, x, a, b, _, scales, _ = make_case(slots.numel(), S, R, d_in, d_out, dtype, "cpu", slots, seed=21)
    ranks = torch.full((S,), 5, dtype=torch.int64)
    a[:, 5:] = float("nan")
    b[:, :, 5:] = float("nan")
    poison_untouched(y, slots)
    y0 = y.clone()
    add_lora(y, x, a, b, slots, scales, ranks, backend=backend)
    assert_matches(y, reference(y0, x, a, b, slots, scales, ranks), slots, dtype)
    assert_bits_equal(y[slots < 0], y0[slots < 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("with_scales", [True, False], ids=["scales", "no_scales"])
def test_decode_runs_of_consecutive_slots(dtype, with_scales, monkeypatch):
    """One token per adapter, the used slots in a few runs of consecutive pool slots (the torch backend's
    run path: bmm over pool slices, chunked float32 copies for half dtypes): mixed ranks incl. a rank-0
    run, NaN past each rank, slot -1 tokens, strided x, y and adapters, the sliced form with two d_out.
    Rank-0 and slot -1 rows stay bitwise untouched."""
    import importlib

    mod = importlib.import_module("hyperlora.ops.add_lora")
    taken = []
    orig = mod._torch_decode_runs
    monkeypatch.setattr(mod, "_torch_decode_runs", lambda *a, **k: taken.append(orig(*a, **k)) or taken[-1])
    monkeypatch.setattr(mod, "_RUNS_UPCAST_BYTES", 4 * 4 * 40 * 3)  # half dtypes: chunks of 3 slots
    torch.manual_seed(31)
    S, R, d_in, d_outs = 40, 6, 37, (29, 40)
    used = list(range(0, 12)) + list(range(20, 31)) + [38]
    slots = torch.tensor(used + [-1, -1, -1])[torch.randperm(len(used) + 3)]
    ranks = torch.zeros(S, dtype=torch.int64)
    ranks[0:5], ranks[5:9], ranks[9:12], ranks[20:31], ranks[38] = 4, 0, R, 3, 1
    x = torch.randn(d_in, slots.numel()).t().to(dtype)                     # column-major x
    as_, bs = [], []
    for d_out in d_outs:
        a = (torch.randn(S, d_in, R) / d_in ** 0.5).to(dtype).transpose(1, 2)  # [S, R, d_in], unit stride on R
        b = torch.randn(S, d_out, R).to(dtype)
        for sl in range(S):
            a[sl, int(ranks[sl]):] = float("nan")
            b[sl, :, int(ranks[sl]):] = float("nan")
        as_.append(a)
        bs.append(b)
    scales = torch.rand(S) + 0.5 if with_scales else None
    ys = tuple(poison_untouched(torch.randn(slots.numel(), 2 * d).to(dtype)[:, ::2], slots) for d in d_outs)
    untouched = (slots < 0) | (ranks[slots.clamp(min=0)] == 0)
    for y in ys:
        y[untouched.nonzero()[0], 1] = -0.0
    y0s = tuple(y.clone() for y in ys)
    add_lora(ys, x, tuple(as_), tuple(bs), slots, scales, ranks, backend="torch")
    assert taken == [True]
    for y, y0, a, b in zip(ys, y0s, as_, bs):
        assert_matches(y, reference(y0, x, a, b, slots, scales, ranks), slots, dtype)
        assert_bits_equal(y[untouched], y0[untouched])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_scales_and_int32_slots(backend):
    slots = torch.tensor([1, -1, 0, 1, 2], dtype=torch.int32)
    run_and_check(backend, "cpu", torch.float32, 5, 3, 4, 11, 6, slots=slots, with_scales=False, seed=5)


def test_float64_on_torch_backend():
    run_and_check("torch", "cpu", torch.float64, 13, 3, 4, 7, 5, seed=6)


@pytest.mark.skipif(not TRITON_OK, reason="triton not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_split_k_shrink(dtype, monkeypatch):
    """d_in split across programs with atomic partial sums (what decode uses on a GPU), forced here."""
    import hyperlora.kernels.add_lora as K

    monkeypatch.setattr(K, "FORCE_SPLIT_K", 3)
    torch.manual_seed(7)
    T, S, R, d_in = 9, 4, 8, 600
    x = torch.randn(T, d_in).to(dtype)
    slots = torch.tensor([3, -1, 0, 3, 1, 2, 0, -1, 1])
    scales, ranks = torch.rand(S) + 0.5, torch.tensor([8, 5, 0, 3])
    as_ = tuple((torch.randn(S, R, d_in) / d_in ** 0.5).to(dtype) for _ in range(2))
    bs = tuple(torch.randn(S, d, R).to(dtype) for d in (24, 8))
    ys = tuple(poison_untouched(torch.randn(T, d).to(dtype), slots) for d in (24, 8))
    y0s = tuple(y.clone() for y in ys)
    add_lora(ys, x, as_, bs, slots, scales, ranks, backend="triton")
    for y, y0, a, b in zip(ys, y0s, as_, bs):
        assert_matches(y, reference(y0, x, a, b, slots, scales, ranks), slots, dtype)
        assert_bits_equal(y[slots < 0], y0[slots < 0])


def test_public_name_is_callable_even_after_submodule_import():
    import hyperlora.ops.add_lora  # noqa: F401  (binds the package attribute to the module)
    from hyperlora.ops import add_lora as op

    y, x, a, b, slots, scales, ranks = make_case(6, 3, 2, 5, 4, torch.float32, "cpu")
    ref = reference(y, x, a, b, slots, scales, ranks)
    assert op(y, x, a, b, slots, scales, ranks) is y
    assert_matches(y, ref, slots, torch.float32)


def test_empty_batch_is_a_no_op():
    x, y = torch.randn(0, 8), torch.randn(0, 4)
    a, b = torch.randn(2, 3, 8), torch.randn(2, 4, 3)
    assert add_lora(y, x, a, b, torch.zeros(0, dtype=torch.int64)) is y


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d_outs", [(24, 8, 8), (16, 40), (8, 8, 16, 24)], ids=["qkv", "gate_up", "four"])
def test_sliced_form_matches_separate_references(backend, dtype, d_outs):
    torch.manual_seed(11)
    T, S, R, d_in = 21, 4, 8, 24
    x = torch.randn(T, d_in).to(dtype)
    slots = torch.randint(-1, S, (T,))
    slots[0] = -1
    scales = torch.rand(S) + 0.5
    ranks = torch.tensor([8, 3, 0, 5], dtype=torch.int32)
    as_ = tuple((torch.randn(S, R, d_in) / d_in ** 0.5).to(dtype) for _ in d_outs)
    bs = tuple(torch.randn(S, d, R).to(dtype) for d in d_outs)
    ys = tuple(poison_untouched(torch.randn(T, d).to(dtype), slots) for d in d_outs)
    y0s = tuple(y.clone() for y in ys)
    out = add_lora(ys, x, as_, bs, slots, scales, ranks, backend=backend)
    assert isinstance(out, tuple) and all(o is y for o, y in zip(out, ys))
    for y, y0, a, b in zip(ys, y0s, as_, bs):
        assert_matches(y, reference(y0, x, a, b, slots, scales, ranks), slots, dtype)
        assert_bits_equal(y[slots < 0], y0[slots < 0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_meta_reuse_across_layers_and_fixed_buffers(backend):
    torch.manual_seed(12)
    T, S, R, d = 19, 5, 4, 16
    slots = torch.randint(-1, S, (T,))
    meta = build_meta(slots, S)
    buf = build_meta(slots, S, out=LoraBatchMeta.empty(T, S))
    for layer in range(3):
        y, x, a, b, _, scales, ranks = make_case(T, S, R, d, d, torch.float32, "cpu", slots, seed=20 + layer)
        ref = reference(y, x, a, b, slots, scales, ranks)
        y2 = y.clone()
        add_lora(y, x, a, b, slots, scales, ranks, backend=backend, meta=meta)
        add_lora(y2, x, a, b, slots, scales, ranks, backend=backend, meta=buf)
        assert_matches(y, ref, slots, torch.float32)
        assert_matches(y2, ref, slots, torch.float32)


def test_meta_for_another_batch_is_rejected():
    y, x, a, b, slots, _, _ = make_case(6, 3, 2, 4, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="meta was built for T=7"):
        add_lora(y, x, a, b, slots, meta=build_meta(torch.zeros(7, dtype=torch.int64), 3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    torch.manual_seed(13)
    T, S, R, d_in, d_out = 15, 3, 4, 10, 6
    x = torch.randn(d_in, T).t()                        # column-major x
    a = torch.randn(S, d_in, R).transpose(1, 2)         # [S, R, d_in] with unit stride on R
    b = torch.randn(S, R, d_out).transpose(1, 2)
    y = torch.randn(T, 2 * d_out)[:, ::2]               # strided rows
    slots = torch.randint(-1, S, (T,))
    ref = reference(y, x, a, b, slots, None, None)
    add_lora(y, x, a, b, slots, backend=backend)
    assert_matches(y, ref, slots, torch.float32)


# ----------------------------------------------------------------------------------------------------
# autograd (torch path)
# ----------------------------------------------------------------------------------------------------
def test_gradcheck_tiny():
    torch.manual_seed(14)
    T, S, R, d_in, d_out = 7, 3, 3, 5, 4
    x = torch.randn(T, d_in, dtype=torch.float64, requires_grad=True)
    a = torch.randn(S, R, d_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(S, d_out, R, dtype=torch.float64, requires_grad=True)
    slots = torch.tensor([2, -1, 0, 2, 1, -1, 0])
    scales = torch.rand(S, dtype=torch.float64) + 0.5
    ranks = torch.tensor([3, 0, 2])

    def f(x, a, b):
        y = torch.randn(T, d_out, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        return add_lora(y, x, a, b, slots, scales, ranks)

    assert torch.autograd.gradcheck(f, (x, a, b))


def test_autograd_float32_matches_float64_reference_and_y_grad_flows():
    torch.manual_seed(15)
    T, S, R, d_in, d_out = 23, 4, 8, 12, 10
    x, a, b = torch.randn(T, d_in), torch.randn(S, R, d_in) / 4, torch.randn(S, d_out, R)
    slots = torch.randint(-1, S, (T,))
    scales, ranks = torch.rand(S) + 0.5, torch.tensor([8, 2, 0, 5])
    w = torch.randn(T, d_out)
    base = torch.randn(T, d_out)

    def loss(x, a, b, base, fn):
        return (fn(base * 1.0, x, a, b) * w).sum()

    ours = lambda y, x, a, b: add_lora(y, x, a, b, slots, scales, ranks)  # noqa: E731
    theirs = lambda y, x, a, b: reference(y, x, a, b, slots, scales, ranks)  # noqa: E731
    leaves32 = [t.clone().requires_grad_() for t in (x, a, b, base)]
    leaves64 = [t.double().requires_grad_() for t in (x, a, b, base)]
    g32 = torch.autograd.grad(loss(*leaves32, ours), leaves32)
    g64 = torch.autograd.grad(loss(*leaves64, theirs), leaves64)
    for got, want in zip(g32, g64):
        want = torch.nan_to_num(want)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # rows past a slot's rank get exactly zero gradient
    assert torch.all(g32[1][1, 2:] == 0) and torch.all(g32[1][2] == 0)


def test_forced_kernel_backend_with_grad_raises():
    if not TRITON_OK:
        pytest.skip("triton not available")
    y, x, a, b, slots, scales, ranks = make_case(8, 3, 4, 6, 6, torch.float32, "cpu")
    x.requires_grad_()
    with pytest.raises(ValueError, match="backend 'triton' has no autograd"):
        add_lora(y, x, a, b, slots, scales, ranks, backend="triton")


@pytest.mark.gpu
def test_gpu_autograd_with_automatic_backend():
    y, x, a, b, slots, scales, ranks = make_case(33, 5, 8, 24, 16, torch.float32, "cuda", mixed_ranks=False)
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    w = torch.randn_like(y)
    g = torch.autograd.grad((add_lora(y.clone(), *leaves, slots, scales, ranks) * w).sum(), leaves)
    leaves64 = [t.double().requires_grad_() for t in (x, a, b)]
    g64 = torch.autograd.grad((reference(y, *leaves64, slots, scales, ranks) * w.double()).sum(), leaves64)
    for got, want in zip(g, g64):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_no_grad_uses_in_place_op_even_with_leaf_params():
    y, x, a, b, slots, scales, ranks = make_case(8, 3, 4, 6, 6, torch.float32, "cpu")
    a.requires_grad_()
    ref = reference(y, x, a.detach(), b, slots, scales, ranks)
    with torch.no_grad():
        add_lora(y, x, a, b, slots, scales, ranks)
    assert_matches(y, ref, slots, torch.float32)


# ----------------------------------------------------------------------------------------------------
# torch.compile and torch.library
# ----------------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph_cpu():
    torch.manual_seed(16)
    y, x, a, b, slots, scales, ranks = make_case(9, 3, 4, 8, 6, torch.float32, "cpu", seed=16)
    ref = reference(y, x, a, b, slots, scales, ranks)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(y, x, a, b, slots, scales, ranks):
        return add_lora(y, x, a, b, slots, scales, ranks, backend="torch")

    f(y, x, a, b, slots, scales, ranks)
    assert_matches(y, ref, slots, torch.float32)


def test_torch_compile_fullgraph_autograd_matches_eager():
    torch.manual_seed(17)
    _, x, a, b, slots, scales, ranks = make_case(9, 3, 4, 8, 6, torch.float32, "cpu", seed=17)
    w = torch.randn(9, 6)

    def f(x, a, b):
        y = torch.zeros(9, 6) + 1
        return (add_lora(y, x, a, b, slots, scales, ranks) * w).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    want = torch.autograd.grad(f(*leaves), leaves)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2)


def test_custom_op_is_registered_with_fake_impl():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert hasattr(torch.ops.hyperlora, "add_lora_") and hasattr(torch.ops.hyperlora, "lora_delta")
    meta = build_meta(torch.tensor([0, -1, 1]), 2)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x, a, b = torch.empty(3, 4), torch.empty(2, 2, 4), torch.empty(2, 5, 2)
        d = torch.ops.hyperlora.lora_delta(x, a, b, None, None, *meta.tensors())
        assert d.shape == (3, 5) and d.dtype == torch.float32
    torch.library.opcheck(torch.ops.hyperlora.lora_delta.default,
                          (torch.randn(3, 4), torch.randn(2, 2, 4), torch.randn(2, 5, 2), None, None, *meta.tensors()),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------------------------------
# validation: every error names the argument
# ----------------------------------------------------------------------------------------------------
def _good():
    T, S, R, d_in, d_out = 5, 3, 4, 6, 7
    return dict(y=torch.randn(T, d_out), x=torch.randn(T, d_in), lora_a=torch.randn(S, R, d_in),
                lora_b=torch.randn(S, d_out, R), slots=torch.tensor([0, 1, -1, 2, 0]),
                scales=torch.ones(S), ranks=torch.tensor([4, 2, 0]))


BAD = [
    ("x", lambda g: g["x"].reshape(-1), ValueError, r"x must be 2-D \[T, d_in\]"),
    ("x", lambda g: g["x"].int(), ValueError, r"x must be float32, float16 or bfloat16"),
    ("x", lambda g: g["x"].tolist(), TypeError, r"x must be a torch.Tensor"),
    ("y", lambda g: g["y"][:4], ValueError, r"y must have T=5 rows"),
    ("y", lambda g: g["y"].half(), ValueError, r"y has dtype torch.float16 but x has torch.float32"),
    ("y", lambda g: g["y"][None], ValueError, r"y must be 2-D \[T, d_out\]"),
    ("lora_a", lambda g: g["lora_a"][:, :, :5], ValueError, r"lora_a must be \[S, R, d_in=6\]"),
    ("lora_a", lambda g: g["lora_a"][0], ValueError, r"lora_a must be 3-D \[S, R, d_in\]"),
    ("lora_a", lambda g: g["lora_a"].bfloat16(), ValueError, r"lora_a has dtype torch.bfloat16"),
    ("lora_b", lambda g: g["lora_b"][:, :6], ValueError, r"lora_b must be \[S=3, d_out=7, R=4\]"),
    ("lora_b", lambda g: g["lora_b"][:2], ValueError, r"lora_b must be \[S=3"),
    ("slots", lambda g: g["slots"][:4], ValueError, r"slots must have one entry per token of x: shape \[5\]"),
    ("slots", lambda g: torch.tensor([0, 1, 3, 2, 0]), ValueError, r"slots values must be in \[-1, 2\].*max 3"),
    ("slots", lambda g: torch.tensor([0, -2, 1, 2, 0]), ValueError, r"slots values must be in \[-1, 2\].*min -2"),
    ("slots", lambda g: g["slots"].float(), ValueError, r"slots must be int32 or int64"),
    ("scales", lambda g: torch.ones(4), ValueError, r"scales must be a float tensor of shape \[S=3\]"),
    ("scales", lambda g: torch.ones(3, dtype=torch.int64), ValueError, r"scales must be a float tensor"),
    ("scales", lambda g: [1.0, 1.0, 1.0], TypeError, r"scales must be a float tensor \[S\] or None"),
    ("ranks", lambda g: torch.tensor([4, 5, 0]), ValueError, r"ranks values must be in \[0, R=4\].*max 5"),
    ("ranks", lambda g: torch.tensor([4, -1, 0]), ValueError, r"ranks values must be in \[0, R=4\].*min -1"),
    ("ranks", lambda g: torch.tensor([4.0, 1.0, 0.0]), ValueError, r"ranks must be an int32/int64 tensor"),
    ("ranks", lambda g: torch.tensor([4, 1]), ValueError, r"ranks must be an int32/int64 tensor of shape \[S=3\]"),
]


@pytest.mark.parametrize("arg,mutate,exc,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_arguments_raise_naming_the_argument(arg, mutate, exc, match):
    g = _good()
    g[arg] = mutate(g)
    y_before = g["y"].clone() if isinstance(g["y"], torch.Tensor) else None
    with pytest.raises(exc, match=match):
        add_lora(g.pop("y"), g.pop("x"), g.pop("lora_a"), g.pop("lora_b"), g.pop("slots"), **g)
    del y_before


def test_sliced_form_errors():
    g = _good()
    with pytest.raises(ValueError, match="all tuples of the same length"):
        add_lora((g["y"],), g["x"], g["lora_a"], (g["lora_b"],), g["slots"])
    with pytest.raises(ValueError, match="must have the same length, got 2, 1, 1"):
        add_lora((g["y"], g["y"].clone()), g["x"], (g["lora_a"],), (g["lora_b"],), g["slots"])
    with pytest.raises(ValueError, match=r"lora_b\[1\] must be \[S=3, d_out=7"):
        add_lora((g["y"], g["y"].clone()), g["x"], (g["lora_a"], g["lora_a"]), (g["lora_b"], g["lora_b"][:, :3]),
                 g["slots"])


def test_y_aliasing_x_is_rejected():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="y must not alias x"):
        add_lora(x, x, torch.randn(2, 3, 6), torch.randn(2, 6, 3), torch.tensor([0, 1, 0, -1]))


def test_backend_errors():
    g = _good()
    args = (g["y"], g["x"], g["lora_a"], g["lora_b"], g["slots"])
    with pytest.raises(ValueError, match="backend 'bogus' is not implemented"):
        add_lora(*args, backend="bogus")
    with pytest.raises(BackendUnavailableError):
        add_lora(*args, backend="cuda")
    x64 = torch.randn(5, 6, dtype=torch.float64)
    if TRITON_OK:
        with pytest.raises(ValueError, match="float64, which backend 'triton' does not support"):
            add_lora(g["y"].double(), x64, g["lora_a"].double(), g["lora_b"].double(), g["slots"], backend="triton")


def test_device_mismatch_named():
    if not HAS_GPU:
        pytest.skip("needs a CUDA device to put one argument elsewhere")
    g = _good()
    with pytest.raises(ValueError, match="lora_a is on cuda"):
        add_lora(g["y"], g["x"], g["lora_a"].cuda(), g["lora_b"], g["slots"])


# ----------------------------------------------------------------------------------------------------
# GPU: the same cases for real on CUDA tensors, every GPU backend
# ----------------------------------------------------------------------------------------------------
GPU_BACKENDS = ["torch", "triton", "cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_matches_float64_reference(backend, dtype, case):
    T, S, R, d_in, d_out, slots = CASES[case]
    run_and_check(backend, "cuda", dtype, T, S, R, d_in, d_out, slots)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64, 16, 4096, 4096), (300, 8, 64, 1000, 3000), (2048, 4, 128, 512, 1024),
                                   (513, 256, 8, 1024, 1024)])
def test_gpu_large_shapes(backend, dtype, shape):
    T, S, R, d_in, d_out = shape
    run_and_check(backend, "cuda", dtype, T, S, R, d_in, d_out, mixed_ranks=True, seed=T)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_sliced_and_graph_capture(backend):
    torch.manual_seed(30)
    T, S, R, d_in = 64, 8, 16, 256
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(T, d_in, device=dev, dtype=dt)
    slots = torch.randint(-1, S, (T,), device=dev)
    as_ = tuple((torch.randn(S, R, d_in, device=dev) / 16).to(dt) for _ in range(3))
    bs = tuple(torch.randn(S, d, R, device=dev).to(dt) for d in (256, 64, 64))
    ys = tuple(torch.randn(T, d, device=dev, dtype=dt) for d in (256, 64, 64))
    y0s = tuple(y.clone() for y in ys)
    add_lora(ys, x, as_, bs, slots, backend=backend)
    for y, y0, a, b in zip(ys, y0s, as_, bs):
        assert_matches(y, reference(y0, x, a, b, slots, None, None), slots, dt)
    if backend == "torch":
        return  # the torch backend reads segment bounds on the host: not capturable
    meta = LoraBatchMeta.empty(T, S, dev)
    static_slots = slots.clone()
    build_meta(static_slots, S, out=meta)
    y = y0s[0].clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (compiles kernels) outside capture
        add_lora(y.clone(), x, as_[0], bs[0], static_slots, backend=backend, meta=meta)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        build_meta(static_slots, S, out=meta)
        add_lora(y, x, as_[0], bs[0], static_slots, backend=backend, meta=meta)
    for trial in range(2):
        new_slots = torch.randint(-1, S, (T,), device=dev)
        static_slots.copy_(new_slots)
        y.copy_(y0s[0])
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(y, reference(y0s[0], x, as_[0], bs[0], new_slots, None, None), new_slots, dt)
        assert_bits_equal(y[new_slots < 0], y0s[0][new_slots < 0])


# ----------------------------------------------------------------------------------------------------
# Triton kernels compile for real GPU targets (ahead of time, no GPU needed)
# ----------------------------------------------------------------------------------------------------
_AOT_SCRIPT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import hyperlora.kernels.add_lora as K

INT_PTRS = {"tok_ptr", "seg_slot_ptr", "seg_start_ptr", "seg_count_ptr", "nact_ptr", "ranks_ptr"}

def signature(fn, dtype_ptrs, dt, consts):
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = "*i32" if n in INT_PTRS else (f"*{dt}" if n in dtype_ptrs else "*fp32")
        else:
            sig[n] = "i32"
    return sig

for cc, dt in ((80, "fp32"), (90, "bf16")):
    if True:
        ieee = dt == "fp32"
        full = cc == 90  # sm_90: every option on; sm_80: every option off
        c = dict(NUM_SLICES=3 if full else 1, HAS_RANKS=full, HAS_SCALES=full, BLOCK_M=16, BLOCK_R=32,
                 BLOCK_K=128, SPLIT_K=4 if full else 1, UPCAST=False, IEEE=ieee)
        sig = signature(K._shrink_kernel, {"x_ptr", "a0_ptr", "a1_ptr", "a2_ptr"}, dt, c)
        triton.compile(ASTSource(fn=K._shrink_kernel, signature=sig, constexprs=c),
                       target=GPUTarget("cuda", cc, 32), options={"num_warps": 4})
        c = dict(HAS_RANKS=full, BLOCK_M=64, BLOCK_N=128, BLOCK_R=64, UPCAST=False, IEEE=ieee)
        sig = signature(K._expand_kernel, {"y_ptr", "b_ptr"}, dt, c)
        triton.compile(ASTSource(fn=K._expand_kernel, signature=sig, constexprs=c),
                       target=GPUTarget("cuda", cc, 32), options={"num_warps": 8})
print("compiled")
'''


@pytest.mark.skipif(HAS_GPU, reason="the GPU tests launch the kernels for real")
def test_triton_kernels_compile_for_sm80_and_sm90():
    """Catch what the interpreter cannot: constructs that do not lower to PTX (no GPU or driver needed)."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
