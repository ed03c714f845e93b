"""generate_lora: hypernetwork head outputs written straight into adapter-pool slots.

For P new policies and the L layers of one module type (one launch writes them all):

    A[p,l][r, i] = sum_k z[p,l,k] * w_a[r*K + k, i]          pool_a[l, slots[p], :R]     = A[p,l]
    B[p,l][o, r] = sum_k z[p,l,k] * w_b[o, r*K + k]          pool_b[l, slots[p], :, :R]  = scales[p] * B[p,l]

cast to the pool's dtype, with ranks R..R_max zeroed, and nothing else in the pool touched. K = latent_dim + 1
(the hypernetwork folds its head bias in as a last latent coordinate equal to 1; this op does not care).

Backends: "torch" (reference, any device, the oracle in tests), "triton" (`hyperlora.kernels.generate_lora`),
"cuda" (`csrc/generate_lora.cu`). All accumulate in float32 (float64 for float64 inputs on the torch path).
Registered as the torch.library custom op `hyperlora::generate_lora` (mutates pool_a and pool_b).
"""
from __future__ import annotations

import torch

from hyperlora.ops.backends import resolve_backend

__all__ = ["generate_lora", "generate_lora_reference"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _validate(pool_a: torch.Tensor, pool_b: torch.Tensor, z: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor,
              slots: torch.Tensor, scales: torch.Tensor | None) -> tuple[int, int]:
    """Check shapes, dtypes, devices and slot values; return (R, K). Raises ValueError/TypeError naming the argument."""
    for name, t in (("pool_a", pool_a), ("pool_b", pool_b), ("z", z), ("w_a", w_a), ("w_b", w_b), ("slots", slots)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"generate_lora: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("pool_a", pool_a), ("pool_b", pool_b), ("z", z), ("w_a", w_a), ("w_b", w_b)):
        if t.dtype not in _FLOATS:
            raise TypeError(f"generate_lora: {name} must be float32/float16/bfloat16/float64, got {t.dtype}")
    if pool_a.dim() != 4 or pool_b.dim() != 4:
        raise ValueError(f"generate_lora: pool_a must be [L, S, R_max, d_in] and pool_b [L, S, d_out, R_max], got "
                         f"{tuple(pool_a.shape)} and {tuple(pool_b.shape)}")
    L, S, R_max, d_in = pool_a.shape
    d_out = pool_b.shape[2]
    if tuple(pool_b.shape) != (L, S, d_out, R_max):
        raise ValueError(f"generate_lora: pool_b {tuple(pool_b.shape)} does not pair with pool_a {tuple(pool_a.shape)} "
                         f"(expected [L={L}, S={S}, d_out, R_max={R_max}])")
    if pool_a.dtype != pool_b.dtype:
        raise TypeError(f"generate_lora: pool_a and pool_b must share a dtype, got {pool_a.dtype} and {pool_b.dtype}")
    if not (pool_a.is_contiguous() and pool_b.is_contiguous()):
        raise ValueError("generate_lora: pool_a and pool_b must be contiguous (use AdapterPool.buffers(type))")
    if z.dim() != 3 or z.shape[1] != L:
        raise ValueError(f"generate_lora: z must be [P, L={L}, K], got {tuple(z.shape)}")
    P, _, K = z.shape
    if K < 1:
        raise ValueError("generate_lora: z's last dimension K must be >= 1")
    if w_a.dim() != 2 or w_a.shape[1] != d_in or w_a.shape[0] % K != 0:
        raise ValueError(f"generate_lora: w_a must be [R*K, d_in={d_in}] with K={K}, got {tuple(w_a.shape)}")
    R = w_a.shape[0] // K
    if R < 1 or R > R_max:
        raise ValueError(f"generate_lora: the head's rank R={R} must be in [1, R_max={R_max}] of the pool")
    if tuple(w_b.shape) != (d_out, R * K):
        raise ValueError(f"generate_lora: w_b must be [d_out={d_out}, R*K={R * K}], got {tuple(w_b.shape)}")
    if slots.dim() != 1 or slots.shape[0] != P:
        raise ValueError(f"generate_lora: slots must be [P={P}], got {tuple(slots.shape)}")
    if slots.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"generate_lora: slots must be int32 or int64, got {slots.dtype}")
    if scales is not None:
        if not isinstance(scales, torch.Tensor) or scales.dim() != 1 or scales.shape[0] != P:
            raise ValueError(f"generate_lora: scales must be None or a [P={P}] tensor")
        if not scales.is_floating_point():
            raise TypeError(f"generate_lora: scales must be a float tensor, got {scales.dtype}")
    dev = pool_a.device
    for name, t in (("pool_b", pool_b), ("z", z), ("w_a", w_a), ("w_b", w_b), ("slots", slots), ("scales", scales)):
        if t is not None and t.device != dev:
            raise ValueError(f"generate_lora: {name} is on {t.device} but the pool is on {dev}; move it first")
    if P:
        s_list = slots.tolist()
        bad = [s for s in s_list if not (0 <= s < S)]
        if bad:
            raise ValueError(f"generate_lora: slots {bad[:8]} are outside [0, S={S})")
        if len(set(s_list)) != len(s_list):
            raise ValueError("generate_lora: slots must be distinct (two policies cannot share a slot)")
    return R, K


def generate_lora_reference(pool_a: torch.Tensor, pool_b: torch.Tensor, z: torch.Tensor, w_a: torch.Tensor,
                            w_b: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor | None = None) -> None:
    """The torch reference (and the CPU path): no validation, writes in place.

    On the CPU it loops over slots with a cache-resident temporary per policy (2-3x faster than
    materializing all P adapters first); on other devices it uses one batched GEMM and an index copy.
    Both accumulate in float32 (float64 if any input is float64), scale B, then cast to the pool dtype.
    """
    if z.shape[0] == 0:
        return
    if pool_a.device.type == "cpu":
        _reference_per_slot(pool_a, pool_b, z, w_a, w_b, slots, scales)
    else:
        _reference_batched(pool_a, pool_b, z, w_a, w_b, slots, scales)


def _heads_as_gemm(z: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor):
    """(z, W_A [K, R*d_in], W_B [K, d_out*R]) in the accumulation dtype: A.flat = z @ W_A, B.flat = z @ W_B."""
    P, L, K = z.shape
    R = w_a.shape[0] // K
    d_in, d_out = w_a.shape[1], w_b.shape[0]
    acc = torch.float64 if torch.float64 in (z.dtype, w_a.dtype, w_b.dtype) else torch.float32
    wa = w_a.to(acc).reshape(R, K, d_in).permute(1, 0, 2).reshape(K, R * d_in)
    wb = w_b.to(acc).reshape(d_out * R, K).T
    return z.to(acc), wa, wb, R, d_in, d_out


def _reference_per_slot(pool_a, pool_b, z, w_a, w_b, slots, scales) -> None:
    zz, wa, wb, R, d_in, d_out = _heads_as_gemm(z, w_a, w_b)
    L = z.shape[1]
    sc = [1.0] * z.shape[0] if scales is None else scales.tolist()
    for p, s in enumerate(slots.tolist()):
        pool_a[:, s, :R].copy_((zz[p] @ wa).view(L, R, d_in))
        pool_b[:, s, :, :R].copy_((zz[p] @ wb).mul_(sc[p]).view(L, d_out, R))
        pool_a[:, s, R:].zero_()
        pool_b[:, s, :, R:].zero_()


def _reference_batched(pool_a, pool_b, z, w_a, w_b, slots, scales) -> None:
    zz, wa, wb, R, d_in, d_out = _heads_as_gemm(z, w_a, w_b)
    P, L, _ = z.shape
    zt = zz.transpose(0, 1)  # [L, P, K]
    a = (zt @ wa).view(L, P, R, d_in)
    zb = zt if scales is None else zt * scales.to(zz.dtype)[None, :, None]
    b = (zb @ wb).view(L, P, d_out, R)
    idx = slots.long()
    pool_a[:, idx, :R] = a.to(pool_a.dtype)
    pool_b[:, idx, :, :R] = b.to(pool_b.dtype)
    if R < pool_a.shape[2]:
        pool_a[:, idx, R:] = 0
        pool_b[:, idx, :, R:] = 0


def _run(pool_a: torch.Tensor, pool_b: torch.Tensor, z: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor,
         slots: torch.Tensor, scales: torch.Tensor | None, backend: str) -> None:
    if backend == "torch":
        generate_lora_reference(pool_a, pool_b, z, w_a, w_b, slots, scales)
        return
    if z.shape[0] == 0:
        return
    P = z.shape[0]
    z32 = z.to(torch.float32).contiguous()
    wa32 = w_a.to(torch.float32).contiguous()
    wb32 = w_b.to(torch.float32).contiguous()
    sl = slots.to(torch.int64).contiguous()
    sc = (torch.ones(P, dtype=torch.float32, device=z.device) if scales is None
          else scales.to(torch.float32).contiguous())
    if backend == "triton":
        from hyperlora.kernels.generate_lora import generate_lora_triton  # optional: needs triton

        generate_lora_triton(pool_a, pool_b, z32, wa32, wb32, sl, sc)
    elif backend == "cuda":
        from hyperlora.ops import _cuda  # optional: the compiled CUDA extension

        ext = _cuda.extension()
        L, S, R_max, d_in = pool_a.shape
        d_out = pool_b.shape[2]
        K = z.shape[2]
        R = w_a.shape[0] // K
        ext.generate_lora(pool_a.data_ptr(), pool_b.data_ptr(), z32.data_ptr(), wa32.data_ptr(), wb32.data_ptr(),
                          sl.data_ptr(), sc.data_ptr(), P, L, S, K, R, R_max, d_in, d_out, _cuda.dtype_code(pool_a),
                          _cuda.stream_handle(pool_a.device))
    else:  # pragma: no cover - resolve_backend guards this
        raise ValueError(f"unknown backend {backend!r}")


@torch.library.custom_op("hyperlora::generate_lora", mutates_args=("pool_a", "pool_b"))
def _generate_lora_op(pool_a: torch.Tensor, pool_b: torch.Tensor, z: torch.Tensor, w_a: torch.Tensor,
                      w_b: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor | None, backend: str) -> None:
    _run(pool_a, pool_b, z, w_a, w_b, slots, scales, backend)


@_generate_lora_op.register_fake
def _(pool_a, pool_b, z, w_a, w_b, slots, scales, backend) -> None:  # noqa: ANN001
    return None


def generate_lora(pool_a: torch.Tensor, pool_b: torch.Tensor, z: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor,
                  slots: torch.Tensor, scales: torch.Tensor | None = None, *, backend: str | None = None) -> None:
    """Write P generated adapters of one module type into pool slots, for all L layers, in one launch.

    pool_a [L, S, R_max, d_in], pool_b [L, S, d_out, R_max] (contiguous, any float dtype, updated in place);
    z [P, L, K] float latents (K = latent_dim + 1); w_a [R*K, d_in], w_b [d_out, R*K] float head weights;
    slots [P] int32/int64 distinct, in [0, S); scales [P] float or None (= 1), folded into B.
    backend: "torch" | "triton" | "cuda" | None (auto: cuda > triton > torch on GPU, torch on CPU;
    HYPERLORA_BACKEND forces one). Inputs are validated (ValueError/TypeError) before any kernel runs.
    """
    _validate(pool_a, pool_b, z, w_a, w_b, slots, scales)
    name = resolve_backend(backend, pool_a.device)
    if name != "torch" and torch.float64 in (pool_a.dtype, z.dtype, w_a.dtype, w_b.dtype):
        if backend is not None:
            raise TypeError(f"generate_lora: backend {name!r} does not support float64; use backend='torch'")
        name = "torch"
    if z.shape[0] == 0:
        return
    _generate_lora_op(pool_a, pool_b, z, w_a, w_b, slots, scales, name)
