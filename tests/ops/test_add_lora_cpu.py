"""The CPU kernel of add_lora (hyperlora._cpu, csrc/cpu/) against a float64 per-token reference.

Every case runs on both builds of the kernel (AVX2 where the CPU has it, and the generic one), through
the public op (asserting that the kernel, not a torch fallback, ran) or straight through the glue
(long segments, bad metadata). Rows with slot -1 are poisoned with NaN and -0.0 and must come back
bitwise identical. Skipped, saying why, when the extension is not built.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from hyperlora.ops import _cpu_kernel
from hyperlora.ops.add_lora import add_lora
from hyperlora.ops.metadata import build_meta

add_lora_mod = importlib.import_module("hyperlora.ops.add_lora")  # the module (hyperlora.ops.add_lora is the op)
# every test here runs the compiled kernel; where setup.py could not build it (no C++ compiler), the reason
# the build recorded is the skip message
pytestmark = pytest.mark.skipif(not _cpu_kernel.status()["built"], reason=_cpu_kernel.status()["reason"])

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
ISAS = ["auto", "generic"]


# ----------------------------------------------------------------------------------------------------
# oracle and helpers
# ----------------------------------------------------------------------------------------------------
def reference(y, x, a, b, slots, scales, ranks):
    """float64, one token at a time, plus the magnitude |y| + sc |x| |A|^T |B|^T that bounds rounding."""
    out, mag = y.double().clone(), y.double().abs()
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        r = a.shape[1] if ranks is None else int(ranks[s])
        sc = 1.0 if scales is None else float(scales[s])
        a_s, b_s, x_t = a[s, :r].double(), b[s, :, :r].double(), x[t].double()
        out[t] += sc * (x_t @ a_s.T) @ b_s.T
        mag[t] += abs(sc) * (x_t.abs() @ a_s.abs().T) @ b_s.abs().T
    return out, mag


def assert_close(got, want, mag, dtype, rows):
    """float32: accumulation error only (measured < 1e-6 * mag here; bound 32 eps * mag); half dtypes:
    one rounding of the result (<= 1 ulp of |want|) plus the float32 accumulation error."""
    got, want, mag = got[rows].double(), want[rows], mag[rows]
    tol = 32 * EPS[torch.float32] * mag
    if dtype != torch.float32:
        tol = tol + EPS[dtype] * want.abs() + 1e-30
    err = (got - want).abs()
    assert torch.isfinite(got).all()
    assert (err <= tol).all(), f"max error {err.max().item():.3g}, worst ratio {(err / tol).max().item():.3g}"


def assert_bits_equal(a, b):
    view = torch.int32 if a.dtype == torch.float32 else torch.int16
    assert torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def make_case(T, S, R, d_in, d_out, dtype, *, slots=None, mixed_ranks=False, with_scales=True, seed=0):
    """Fresh random inputs; slot -1 rows of y poisoned (NaN, one -0.0); unused rank rows of A/B are NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g).to(dtype)
    a = (torch.randn(S, R, d_in, generator=g) / max(d_in, 1) ** 0.5).to(dtype)
    b = torch.randn(S, d_out, R, generator=g).to(dtype)
    if slots is None:
        slots = torch.randint(-1, S, (T,), generator=g)
        if T:
            slots[0] = S - 1  # at least one token with an adapter
    scales = (torch.rand(S, generator=g) * 1.5 - 0.25) if with_scales else None  # includes negative scales
    ranks = None
    if mixed_ranks:
        ranks = torch.randint(0, R + 1, (S,), generator=g).to(torch.int32)
        ranks[0], ranks[-1] = 0, R
        for s in range(S):  # never read: any use poisons the result
            a[s, int(ranks[s]):] = float("nan")
            b[s, :, int(ranks[s]):] = float("nan")
    y = torch.randn(T, d_out, generator=g).to(dtype)
    dead = (slots < 0).nonzero().squeeze(1)
    if dead.numel():
        y[dead] = float("nan")
        y[dead[0], 0] = -0.0
    return y, x, a, b, slots, scales, ranks


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test on the AVX2 build (where available) and on the generic build."""
    from hyperlora import _cpu  # type: ignore[attr-defined]

    old = _cpu.force_generic(request.param == "generic")
    yield request.param
    _cpu.force_generic(old)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls into the kernel glue, so a test fails if add_lora silently took a torch path. The
    generic build takes only bfloat16 by default; here every dtype, like the AVX2 build."""
    for dt in DTYPES:  # the generic build takes only bfloat16 by default (slower than torch's ops otherwise)
        monkeypatch.setitem(add_lora_mod._CPU_KERNEL_GENERIC_MAX_TOKENS_PER_SLOT, dt, 8)
    calls = []
    real = _cpu_kernel.add_lora_cpu

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_cpu_kernel, "add_lora_cpu", spy)
    return calls


def run_and_check(y, x, a, b, slots, scales, ranks, dtype, calls, expect_kernel=True):
    want, mag = reference(y, x, a, b, slots, scales, ranks)
    y0 = y.clone()
    out = add_lora(y, x, a, b, slots, scales, ranks, backend="torch")
    assert out is y
    assert bool(calls) == expect_kernel
    dead = slots < 0
    if ranks is not None:  # rank-0 slots add nothing: their rows are untouched too
        dead = dead | ((slots >= 0) & (ranks.long()[slots.clamp(min=0)] == 0))
    assert_bits_equal(y[dead], y0[dead])
    assert_close(y, want, mag, dtype, ~dead)


# ----------------------------------------------------------------------------------------------------
# through the public op
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (1, 3, 16, 4096, 4096), (7, 5, 3, 13, 11),
                                   (29, 11, 12, 37, 45), (64, 64, 16, 256, 192), (40, 13, 9, 130, 67)])
def test_matches_reference(shape, dtype, isa, kernel_calls):
    T, S, R, d_in, d_out = shape
    torch.manual_seed(T * 7 + S)
    case = make_case(T, S, R, d_in, d_out, dtype, seed=T + S + R)
    run_and_check(*case, dtype, kernel_calls)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_ranks_scales_and_shuffled_slots(dtype, isa, kernel_calls):
    torch.manual_seed(1)
    T, S = 45, 13
    slots = torch.randperm(T) % (S + 1) - 1   # every slot 3-4 times, some -1, in no order
    case = make_case(T, S, 24, 83, 101, dtype, slots=slots, mixed_ranks=True, seed=2)
    run_and_check(*case, dtype, kernel_calls)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_one_token_per_adapter_int32_slots(dtype, isa, kernel_calls):
    torch.manual_seed(2)
    T = S = 33
    slots = torch.randperm(S).to(torch.int32)
    case = make_case(T, S, 16, 96, 80, dtype, slots=slots, seed=3)
    run_and_check(*case, dtype, kernel_calls)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_scales_no_ranks(dtype, isa, kernel_calls):
    torch.manual_seed(3)
    case = make_case(17, 4, 8, 64, 24, dtype, with_scales=False, seed=4)
    run_and_check(*case, dtype, kernel_calls)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views(dtype, isa, kernel_calls):
    """Row and slot strides are free: y a column window of a wider buffer (other columns poisoned and
    untouched), x a row slice, lora_a/lora_b slices of larger pools."""
    torch.manual_seed(4)
    T, S, R, d_in, d_out = 19, 6, 8, 40, 24
    y, x, a, b, slots, scales, ranks = make_case(T, S, R, d_in, d_out, dtype, seed=5)
    ybig = torch.full((T, d_out + 9), float("nan"), dtype=dtype)
    ybig[:, 5:5 + d_out] = y
    xbig = torch.randn(T, d_in + 3).to(dtype)
    xbig[:, 2:2 + d_in] = x
    abig = torch.randn(S + 2, R + 3, d_in).to(dtype)
    abig[1:1 + S, :R] = a
    bbig = torch.randn(S + 1, d_out + 4, R).to(dtype)
    bbig[1:, 2:2 + d_out] = b
    yv, xv, av, bv = ybig[:, 5:5 + d_out], xbig[:, 2:2 + d_in], abig[1:1 + S, :R], bbig[1:, 2:2 + d_out]
    assert not (yv.is_contiguous() or xv.is_contiguous() or av.is_contiguous() or bv.is_contiguous())
    edges = ybig.clone()
    run_and_check(yv, xv, av, bv, slots, scales, ranks, dtype, kernel_calls)
    assert_bits_equal(ybig[:, :5], edges[:, :5])
    assert_bits_equal(ybig[:, 5 + d_out:], edges[:, 5 + d_out:])


def test_inner_stride_falls_back_to_torch(kernel_calls):
    """A transposed (inner stride != 1) operand is not the kernel's layout: the torch path runs, same result."""
    torch.manual_seed(5)
    y, x, a, b, slots, scales, ranks = make_case(12, 3, 4, 20, 16, torch.float32, seed=6)
    b_t = b.transpose(1, 2).contiguous().transpose(1, 2)   # same values, inner stride R
    run_and_check(y, x, a, b_t, slots, scales, ranks, torch.float32, kernel_calls, expect_kernel=False)


def test_disabled_runs_torch_path(kernel_calls):
    torch.manual_seed(6)
    case = make_case(10, 3, 4, 20, 16, torch.float32, seed=7)
    old = _cpu_kernel.set_enabled(False)
    try:
        run_and_check(*case, torch.float32, kernel_calls, expect_kernel=False)
    finally:
        _cpu_kernel.set_enabled(old)


def test_float64_stays_on_torch(kernel_calls):
    torch.manual_seed(7)
    y, x, a, b, slots, scales, ranks = make_case(9, 3, 4, 12, 10, torch.float32, seed=8)
    y, x, a, b = (t.double() for t in (y, x, a, b))
    want, _ = reference(y, x, a, b, slots, scales, ranks)
    add_lora(y, x, a, b, slots, scales, ranks, backend="torch")
    live = slots >= 0
    # float64 against the float64 reference: only summation order differs (~1e-15 here)
    assert torch.allclose(y[live], want[live], rtol=1e-12, atol=1e-12)
    assert not kernel_calls


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_and_all_unassigned(dtype, isa, kernel_calls):
    torch.manual_seed(8)
    y, x, a, b, _, scales, _ = make_case(0, 3, 4, 12, 10, dtype, seed=9)
    add_lora(y, x, a, b, torch.zeros(0, dtype=torch.int64), scales, backend="torch")
    assert y.shape == (0, 10)
    y, x, a, b, slots, scales, _ = make_case(6, 3, 4, 12, 10, dtype, slots=torch.full((6,), -1), seed=10)
    y0 = y.clone()
    add_lora(y, x, a, b, slots, scales, backend="torch")
    assert_bits_equal(y, y0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sliced_form(dtype, isa, kernel_calls):
    """q, k, v sharing x: one kernel call per slice, each slice its own d_out."""
    torch.manual_seed(9)
    T, S, R, d_in = 21, 5, 8, 48
    slots = torch.randint(-1, S, (T,))
    cases = [make_case(T, S, R, d_in, d_out, dtype, slots=slots, seed=11 + i) for i, d_out in enumerate((48, 16, 16))]
    x, scales = cases[0][1], cases[0][5]
    ys = tuple(c[0] for c in cases)
    y0s = tuple(y.clone() for y in ys)
    add_lora(ys, x, tuple(c[2] for c in cases), tuple(c[3] for c in cases), slots, scales, backend="torch")
    assert kernel_calls
    live = slots >= 0
    for y, y0, c in zip(ys, y0s, cases):
        want, mag = reference(y0, x, c[2], c[3], slots, scales, None)
        assert_bits_equal(y[~live], y0[~live])
        assert_close(y, want, mag, dtype, live)


# ----------------------------------------------------------------------------------------------------
# straight through the glue
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_long_segments_direct(dtype, isa):
    """Segments longer than the kernel's 4-token block (1..23 tokens per slot): add_lora sends these to
    torch's GEMMs, but the kernel itself must be right for any length."""
    torch.manual_seed(10)
    S = 6
    counts = torch.tensor([1, 23, 4, 5, 9, 0])
    slots = torch.repeat_interleave(torch.arange(S), counts)
    slots = torch.cat([slots, torch.full((3,), -1)])
    slots = slots[torch.randperm(slots.numel())]
    y, x, a, b, slots, scales, ranks = make_case(slots.numel(), S, 10, 77, 35, dtype, slots=slots,
                                                 mixed_ranks=True, seed=12)
    ranks[1] = 10  # keep the long segment alive
    a[1], b[1] = torch.randn_like(a[1]), torch.randn_like(b[1])
    want, mag = reference(y, x, a, b, slots, scales, ranks)
    y0 = y.clone()
    meta = build_meta(slots, S)
    _cpu_kernel.add_lora_cpu((y,), x, (a,), (b,), scales, ranks, *meta.tensors()[:4], meta.num_segments)
    dead = (slots < 0) | ((slots >= 0) & (ranks.long()[slots.clamp(min=0)] == 0))
    assert_bits_equal(y[dead], y0[dead])
    assert_close(y, want, mag, dtype, ~dead)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threads_split_segments_bitwise_identically(dtype, isa, monkeypatch):
    """With several threads (segments split into ranges of equal work) the result is bit for bit the
    one-thread result: each segment owns its rows of y. More threads than segments is fine."""
    torch.manual_seed(14)
    monkeypatch.setattr(_cpu_kernel, "MIN_BYTES_PER_THREAD", 1)
    monkeypatch.setattr(_cpu_kernel, "_threads", 0)  # follow torch.get_num_threads()
    S = 11
    slots = torch.cat([torch.arange(S).repeat_interleave(torch.tensor([1, 3, 0, 2, 5, 1, 1, 4, 2, 1, 6])),
                       torch.full((4,), -1)])
    slots = slots[torch.randperm(slots.numel())]
    y, x, a, b, slots, scales, ranks = make_case(slots.numel(), S, 12, 70, 54, dtype, slots=slots,
                                                 mixed_ranks=True, seed=17)
    want, mag = reference(y, x, a, b, slots, scales, ranks)
    meta = build_meta(slots, S)
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 16):
            torch.set_num_threads(threads)
            out = y.clone()
            _cpu_kernel.add_lora_cpu((out,), x, (a,), (b,), scales, ranks, *meta.tensors()[:4], meta.num_segments)
            outs.append(out)
        _cpu_kernel.set_threads(5)  # an explicit count, independent of torch's
        torch.set_num_threads(1)
        out = y.clone()
        _cpu_kernel.add_lora_cpu((out,), x, (a,), (b,), scales, ranks, *meta.tensors()[:4], meta.num_segments)
        outs.append(out)
    finally:
        torch.set_num_threads(old)
    for out in outs[1:]:
        assert_bits_equal(out, outs[0])
    dead = (slots < 0) | ((slots >= 0) & (ranks.long()[slots.clamp(min=0)] == 0))
    assert_bits_equal(outs[0][dead], y[dead])
    assert_close(outs[0], want, mag, dtype, ~dead)


def test_half_rounding_edges(isa):
    """float16/bfloat16 results across the range (subnormals, zeros, near overflow, negative) are the
    float32 sum rounded once to nearest even: exactly torch's own cast of the same float32 sum."""
    torch.manual_seed(11)
    T, S, R, d = 16, 1, 8, 32
    base = torch.tensor([0.0, -0.0, 1e-7, -3e-6, 6e-5, 1.0, -1.5, 3.14159, 1000.0, -2048.5, 60000.0, -65000.0,
                         1e30, 2e-38, 0.5, 7.0])
    for dtype in (torch.float16, torch.bfloat16):
        if dtype == torch.float16:
            base = base.clamp(-65000, 65000)
        x = torch.randn(T, d).to(dtype)
        a = (torch.randn(S, R, d) * 1e-3).to(dtype)
        b = (torch.randn(S, T, R) * 1e-3).to(dtype)
        y = base.view(T, 1).expand(T, T).contiguous().to(dtype)
        slots = torch.zeros(T, dtype=torch.int64)
        meta = build_meta(slots, S)
        # float32 reference in the kernel's order of rounding: delta in float32, one add, one cast
        delta = ((x.double() @ a[0].double().T) @ b[0].double().T).float()
        want = (y.float() + delta).to(dtype)
        got = y.clone()
        _cpu_kernel.add_lora_cpu((got,), x, (a,), (b,), None, None, *meta.tensors()[:4], meta.num_segments)
        view = torch.int16
        diff = (got.view(view).int() - want.view(view).int()).abs()
        assert diff.max() <= 1, f"{dtype}: {int((diff > 0).sum())} values differ by more than 1 ulp"
        # where the float32 sum is far from a rounding tie, the result is bit exact
        exact = (diff == 0).float().mean()
        assert exact > 0.9, f"{dtype}: only {exact:.2f} of the values match torch's rounding exactly"


def test_bad_metadata_is_a_value_error():
    torch.manual_seed(12)
    y, x, a, b, slots, scales, _ = make_case(8, 3, 4, 12, 10, torch.float32, slots=torch.arange(8) % 3, seed=13)
    meta = build_meta(slots, 3)
    token_ids, seg_slots, seg_starts, seg_counts = (t.clone() for t in meta.tensors()[:4])
    y0 = y.clone()
    bad_slot = seg_slots.clone()
    bad_slot[0] = 3
    with pytest.raises(ValueError, match="segment slot"):
        _cpu_kernel.add_lora_cpu((y,), x, (a,), (b,), scales, None, token_ids, bad_slot, seg_starts, seg_counts, 3)
    bad_tok = token_ids.clone()
    bad_tok[-1] = 8
    with pytest.raises(ValueError, match="token id"):
        _cpu_kernel.add_lora_cpu((y,), x, (a,), (b,), scales, None, bad_tok, seg_slots, seg_starts, seg_counts, 3)
    with pytest.raises(ValueError, match="rank"):
        _cpu_kernel.add_lora_cpu((y,), x, (a,), (b,), scales, torch.tensor([1, 5, 1], dtype=torch.int32),
                                 token_ids, seg_slots, seg_starts, seg_counts, 3)
    assert_bits_equal(y, y0)  # checked before any write


def test_set_threads_rejects_bad_values():
    with pytest.raises(ValueError, match="threads"):
        _cpu_kernel.set_threads(-1)


def test_status_reports_the_build():
    st = _cpu_kernel.status()
    assert st["built"] and st["isa"] in ("avx2", "generic") and st["reason"] == ""


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_routes_long_segments_to_torch(dtype, kernel_calls):
    """Many tokens per adapter (prefill) stay on torch's GEMMs."""
    torch.manual_seed(13)
    n = add_lora_mod._CPU_KERNEL_MAX_TOKENS_PER_SLOT[dtype] + 1
    slots = torch.arange(2).repeat_interleave(n)
    case = make_case(2 * n, 2, 4, 16, 12, dtype, slots=slots, seed=14)
    run_and_check(*case, dtype, kernel_calls, expect_kernel=False)


def test_generic_build_defaults_to_bfloat16_only():
    """Without the test override, the generic build runs bfloat16 only; float32 goes to torch's ops."""
    from hyperlora import _cpu  # type: ignore[attr-defined]

    calls = []
    real = _cpu_kernel.add_lora_cpu
    old = _cpu.force_generic(True)
    try:
        _cpu_kernel.add_lora_cpu = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
        for dtype, want in ((torch.bfloat16, [1]), (torch.float32, []), (torch.float16, [])):
            calls.clear()
            y, x, a, b, slots, scales, _ = make_case(6, 6, 4, 16, 12, dtype, slots=torch.arange(6), seed=16)
            add_lora(y, x, a, b, slots, scales, backend="torch")
            assert calls == want, dtype
    finally:
        _cpu_kernel.add_lora_cpu = real
        _cpu.force_generic(old)
