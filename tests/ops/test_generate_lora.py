"""generate_lora: every backend against a float64 oracle written from the contract, on poisoned pools."""
from __future__ import annotations

import importlib
import os

import torch

if not torch.cuda.is_available():  # the Triton kernel runs in the interpreter; must be set before it is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hyperlora.ops.backends import available_backends  # noqa: E402
from hyperlora.ops.generate_lora import generate_lora, generate_lora_reference  # noqa: E402
from hyperlora.runtime.writing import generate_into_slots  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
TRITON_OK = available_backends()["triton"]["available"]
DEV = "cuda" if HAS_CUDA else "cpu"

# (P, L, K, R, R_max, S, d_in, d_out): odd sizes, R == R_max, K == 1 (bias only), a single layer
SHAPES = [
    (3, 2, 5, 3, 4, 5, 24, 10),
    (1, 3, 9, 4, 4, 2, 33, 17),
    (4, 1, 1, 2, 5, 6, 7, 130),
    (2, 5, 17, 1, 3, 3, 130, 9),
    (5, 8, 3, 2, 2, 6, 20, 12),  # 40 rows: several row tiles
]


def oracle(z, w_a, w_b, scales, R):
    """A [P, L, R, d_in], B [P, L, d_out, R] in float64, written element-wise from the contract."""
    z, w_a, w_b = z.double(), w_a.double(), w_b.double()
    P, L, K = z.shape
    A = torch.zeros(P, L, R, w_a.shape[1], dtype=torch.float64)
    B = torch.zeros(P, L, w_b.shape[0], R, dtype=torch.float64)
    for p in range(P):
        for l in range(L):
            for r in range(R):
                for k in range(K):
                    A[p, l, r] += z[p, l, k] * w_a[r * K + k]
                    B[p, l, :, r] += z[p, l, k] * w_b[:, r * K + k]
            B[p, l] *= 1.0 if scales is None else float(scales[p])
    return A, B


def make_case(shape, dtype, seed, device=DEV, with_scales=True):
    P, L, K, R, R_max, S, d_in, d_out = shape
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(P, L, K, generator=g)
    w_a = torch.randn(R * K, d_in, generator=g)
    w_b = torch.randn(d_out, R * K, generator=g)
    slots = torch.randperm(S, generator=g)[:P]
    scales = (torch.rand(P, generator=g) * 3 + 0.1) if with_scales else None
    pool_a = torch.randn(L, S, R_max, d_in, generator=g).to(dtype)  # poison: previous tenants everywhere
    pool_b = torch.randn(L, S, d_out, R_max, generator=g).to(dtype)
    if dtype == torch.float64:  # a float64 pool gets float64 inputs: then the reference computes in float64
        z, w_a, w_b = z.double(), w_a.double(), w_b.double()
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return [to(t) for t in (pool_a, pool_b, z, w_a, w_b, slots, scales)]


# float32 accumulation then one rounding to the pool's dtype: about two units in the last place
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=8e-3, atol=8e-3), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def check(backend, shape, dtype, seed, with_scales=True):
    pool_a, pool_b, z, w_a, w_b, slots, scales = make_case(shape, dtype, seed, with_scales=with_scales)
    before_a, before_b = pool_a.clone(), pool_b.clone()
    generate_lora(pool_a, pool_b, z, w_a, w_b, slots, scales, backend=backend)
    R = shape[3]
    A, B = oracle(z.cpu(), w_a.cpu(), w_b.cpu(), None if scales is None else scales.cpu(), R)
    pa, pb = pool_a.cpu(), pool_b.cpu()
    sl = slots.cpu().tolist()
    for p, s in enumerate(sl):
        torch.testing.assert_close(pa[:, s, :R].double(), A[p], **TOL[dtype])
        torch.testing.assert_close(pb[:, s, :, :R].double(), B[p], **TOL[dtype])
        assert torch.count_nonzero(pa[:, s, R:]) == 0 and torch.count_nonzero(pb[:, s, :, R:]) == 0
    rest = [s for s in range(pool_a.shape[1]) if s not in sl]
    assert torch.equal(pa[:, rest], before_a.cpu()[:, rest]) and torch.equal(pb[:, rest], before_b.cpu()[:, rest])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_torch_reference_matches_oracle(shape, dtype):
    check("torch", shape, dtype, seed=100 + 10 * SHAPES.index(shape) + [torch.float32, torch.bfloat16, torch.float64].index(dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_reference_path_matches_oracle(shape, dtype, monkeypatch):
    # the GPU's torch path (one GEMM + index copy), exercised here on CPU tensors
    gl = importlib.import_module("hyperlora.ops.generate_lora")  # the module: hyperlora.ops.generate_lora names the function

    monkeypatch.setattr(gl, "_reference_per_slot", gl._reference_batched)
    check("torch", shape, dtype, seed=13 + SHAPES.index(shape))


@pytest.mark.skipif(not TRITON_OK, reason="triton unavailable")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_oracle(shape, dtype):
    check("triton", shape, dtype, seed=7 + SHAPES.index(shape))


@pytest.mark.skipif(not TRITON_OK, reason="triton unavailable")
def test_triton_without_scales():
    check("triton", SHAPES[0], torch.float32, seed=11, with_scales=False)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", SHAPES + [(64, 32, 33, 8, 16, 80, 4096, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_oracle(shape, dtype):
    if shape[0] == 64:  # large: compare with the torch reference instead of the slow loop oracle
        a1, b1, z, w_a, w_b, slots, scales = make_case(shape, dtype, seed=3)
        a2, b2 = a1.clone(), b1.clone()
        generate_lora(a1, b1, z, w_a, w_b, slots, scales, backend="cuda")
        generate_lora(a2, b2, z, w_a, w_b, slots, scales, backend="triton")
        ra, rb = a1.clone(), b1.clone()
        generate_lora_reference(ra, rb, z.double(), w_a.double(), w_b.double(), slots, scales.double())
        for got in ((a1, b1), (a2, b2)):
            torch.testing.assert_close(got[0].double(), ra.double(), **TOL[dtype])
            torch.testing.assert_close(got[1].double(), rb.double(), **TOL[dtype])
        return
    check("cuda", shape, dtype, seed=5 + SHAPES.index(shape))


def test_empty_batch_is_a_no_op():
    pool_a, pool_b, z, w_a, w_b, slots, scales = make_case((0, 2, 3, 2, 2, 3, 8, 8), torch.float32, seed=1)
    a0, b0 = pool_a.clone(), pool_b.clone()
    for backend in ["torch"] + (["triton"] if TRITON_OK else []):
        generate_lora(pool_a, pool_b, z, w_a, w_b, slots, scales, backend=backend)
    assert torch.equal(pool_a, a0) and torch.equal(pool_b, b0)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda c: c.__setitem__(5, torch.tensor([1, 1, 2])), ValueError, "distinct"),
    (lambda c: c.__setitem__(5, torch.tensor([0, 1, 5])), ValueError, r"outside \[0, S=5\)"),
    (lambda c: c.__setitem__(5, torch.tensor([0.0, 1.0, 2.0])), TypeError, "slots must be int32 or int64"),
    (lambda c: c.__setitem__(5, torch.tensor([0, 1])), ValueError, r"slots must be \[P=3\]"),
    (lambda c: c.__setitem__(2, torch.randn(3, 3, 5)), ValueError, r"z must be \[P, L=2, K\]"),
    (lambda c: c.__setitem__(3, torch.randn(14, 24)), ValueError, r"w_a must be \[R\*K, d_in=24\]"),
    (lambda c: c.__setitem__(4, torch.randn(10, 14)), ValueError, r"w_b must be \[d_out=10, R\*K=15\]"),
    (lambda c: c.__setitem__(3, torch.randn(25, 24)), ValueError, r"R=5 must be in \[1, R_max=4\]"),
    (lambda c: c.__setitem__(1, torch.randn(2, 5, 4, 10)), ValueError, "does not pair"),
    (lambda c: c.__setitem__(0, torch.randn(2, 5, 24, 4).transpose(2, 3)), ValueError, "contiguous"),
    (lambda c: c.__setitem__(1, c[1].half()), TypeError, "share a dtype"),
    (lambda c: c.__setitem__(6, torch.ones(3, dtype=torch.int64)), TypeError, "scales must be a float"),
    (lambda c: c.__setitem__(0, c[0].int()), TypeError, "pool_a must be float"),
])
def test_bad_inputs_raise_before_writing(mutate, exc, match):
    case = make_case(SHAPES[0], torch.float32, seed=2, device="cpu")
    mutate(case)
    snapshot = [t.clone() for t in case[:2]]
    with pytest.raises(exc, match=match):
        generate_lora(*case, backend="torch")
    assert torch.equal(case[0], snapshot[0]) and torch.equal(case[1], snapshot[1])


def test_registered_as_custom_op_with_fake():
    assert hasattr(torch.ops.hyperlora, "generate_lora")
    pool_a, pool_b, z, w_a, w_b, slots, scales = make_case(SHAPES[0], torch.float32, seed=4, device="cpu")
    torch.library.opcheck(torch.ops.hyperlora.generate_lora.default,
                          (pool_a, pool_b, z, w_a, w_b, slots, scales, "torch"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", [
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="triton unavailable")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]),
])
def test_hypernetwork_generate_into_pool_backend_equals_torch(backend):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hyperlora.hypernets.t2l.hypernet import HyperNetwork
    from hyperlora.adapters.pool import AdapterPool

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    hn = HyperNetwork.for_model(model, rank=2, latent_dim=3, task_emb_dim=8, hidden_dim=16).to(DEV)
    with torch.no_grad():
        for t in hn.types:
            hn.head(t)[1].normal_()
    emb = torch.randn(2, 8, device=DEV)
    pools = []
    for be in ("torch", backend):
        pool = AdapterPool(hn.targets(), max_adapters=3, max_rank=4, device=DEV)
        slots = [pool.allocate(f"k{i}", 2, 0.7) for i in range(2)]
        generate_into_slots(hn, emb, pool, slots, backend=be)
        pools.append(pool)
    for t in hn.types:
        for x, y in zip(pools[0].buffers(t), pools[1].buffers(t)):
            torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5)
