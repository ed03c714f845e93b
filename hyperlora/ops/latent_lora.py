"""The latent path: apply hypernetwork-generated LoRA adapters without materializing them.

The hypernetwork's head is linear in the per-policy latent z (K = latent_dim + 1 coordinates, the last one
fixed to 1 so the head's bias is folded in), with the layout of ARCHITECTURE.md:

    A[r, i] = sum_k z[k] * w_a[r*K + k, i]        B[o, r] = sum_k z[k] * w_b[o, r*K + k]

so the LoRA update of a token t whose slot is s = slots[t] >= 0 factors into dense GEMMs against the shared
head plus per-token contractions with z[s]:

    u_t = w_a @ x_t                   [R*K]   one dense GEMM for all tokens, no gather
    s_t[r] = sum_k u_t[r*K + k] z[s,k]  [R]     contraction with the token's latent
    y_t += scale[s] * w_b @ vec(s_t ⊗ z[s])     one dense GEMM over the stacked outer products

Bytes read do not grow with the number of distinct policies in the batch; FLOPs grow with R*K.
Rows whose slot is -1 are never written (bitwise untouched, NaN included).

Backends: a torch reference (the CPU path and the test oracle, differentiable), a Triton kernel
(`hyperlora.kernels.latent_lora`) and a CUDA kernel (`csrc/latent_lora.cu`), behind one `torch.library`
custom op `hyperlora::latent_lora` with a fake implementation so `torch.compile` can trace through it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from hyperlora.ops._autocast import no_autocast
from hyperlora.ops._common import acc_dtype as _acc_dtype, capturing as _capturing, pick_backend as _pick_backend
from hyperlora.ops.metadata import LoraBatchMeta

__all__ = ["latent_lora", "latent_lora_reference", "materialize_adapters", "SUPPORTED_BACKENDS"]

SUPPORTED_BACKENDS = ("torch", "triton", "cuda")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
def _check_tensor(name: str, t: object, ndim: int, shape_doc: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"latent_lora: {name} must be a torch.Tensor {shape_doc}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"latent_lora: {name} must be {ndim}-D {shape_doc}, got shape {tuple(t.shape)}")
    return t


def _validate(y: Tensor, x: Tensor, w_a: Tensor, w_b: Tensor, z: Tensor, slots: Tensor,
              scales: Optional[Tensor], check_values: bool) -> tuple[int, int]:
    """Check shapes, dtypes, devices (and slot values when `check_values`); return (R, K)."""
    _check_tensor("x", x, 2, "[T, d_in]")
    _check_tensor("y", y, 2, "[T, d_out]")
    _check_tensor("w_a", w_a, 2, "[R*K, d_in]")
    _check_tensor("w_b", w_b, 2, "[d_out, R*K]")
    _check_tensor("z", z, 2, "[S, K] (per-slot latents, last coordinate 1)")
    _check_tensor("slots", slots, 1, "[T]")
    T, d_in = x.shape
    d_out = y.shape[1]
    S, K = z.shape
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"latent_lora: x must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    for name, t in (("y", y), ("w_a", w_a), ("w_b", w_b)):
        if t.dtype != x.dtype:
            raise TypeError(f"latent_lora: {name} has dtype {t.dtype} but x has {x.dtype}; cast it once with "
                            f".to({x.dtype}) (the head is kept in the model's dtype)")
    if z.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"latent_lora: z must be a floating tensor, got {z.dtype}")
    if slots.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"latent_lora: slots must be int32 or int64 (-1 = no adapter), got {slots.dtype}")
    if y.shape[0] != T:
        raise ValueError(f"latent_lora: y has {y.shape[0]} rows but x has {T}; both are [T, ...]")
    if slots.shape[0] != T:
        raise ValueError(f"latent_lora: slots has {slots.shape[0]} entries but x has {T} rows; give one slot per token")
    if K < 1 or S < 1:
        raise ValueError(f"latent_lora: z must be [S, K] with S >= 1 and K >= 1, got {tuple(z.shape)}")
    if w_a.shape[1] != d_in:
        raise ValueError(f"latent_lora: w_a is {tuple(w_a.shape)} but x has d_in={d_in}; w_a must be [R*K, d_in]")
    RK = w_a.shape[0]
    if RK == 0 or RK % K != 0:
        raise ValueError(f"latent_lora: w_a has {RK} rows, not a positive multiple of K={K} (z.shape[1]); "
                         "w_a must be [R*K, d_in] with z [S, K]")
    if tuple(w_b.shape) != (d_out, RK):
        raise ValueError(f"latent_lora: w_b must be [d_out, R*K] = [{d_out}, {RK}] to match y and w_a, "
                         f"got {tuple(w_b.shape)}")
    if scales is not None:
        _check_tensor("scales", scales, 1, "[S] (or None for 1)")
        if scales.shape[0] != S:
            raise ValueError(f"latent_lora: scales has {scales.shape[0]} entries but z has S={S} slots")
        if scales.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"latent_lora: scales must be a floating tensor, got {scales.dtype}")
    device = x.device
    for name, t in (("y", y), ("w_a", w_a), ("w_b", w_b), ("z", z), ("slots", slots), ("scales", scales)):
        if t is not None and t.device != device:
            raise ValueError(f"latent_lora: {name} is on {t.device} but x is on {device}; move it with .to(x.device)")
    if check_values and T > 0:
        lo, hi = int(slots.min()), int(slots.max())
        if lo < -1 or hi >= S:
            raise ValueError(f"latent_lora: slots must lie in [-1, S) = [-1, {S}), got values in [{lo}, {hi}]")
    return RK // K, K


# --------------------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------------------
def latent_lora_reference(y: Tensor, x: Tensor, w_a: Tensor, w_b: Tensor, z: Tensor, slots: Tensor,
                          scales: Optional[Tensor] = None, rows: Optional[Tensor] = None) -> Tensor:
    """Torch implementation (no validation): two dense GEMMs over the rows with slot >= 0.

    The GEMMs run in x's dtype (as a GPU's tensor cores would); the contraction with z and the outer
    products run in float32 (float64 for float64 inputs). Only rows with slot >= 0 are read or written.
    `rows` [n] int: the indices of those rows when already known (e.g. from LoraBatchMeta), saving a sync.
    Differentiable with respect to x, w_a, w_b, z and scales.
    """
    T = x.shape[0]
    K = z.shape[1]
    R = w_a.shape[0] // K
    if rows is None:
        rows = (slots >= 0).nonzero().squeeze(1)
    n = rows.numel()
    if n == 0:
        return y
    full = n == T
    xs = x if full else x.index_select(0, rows)
    sl = (slots if full else slots.index_select(0, rows)).long()
    acc = _acc_dtype(x.dtype)
    u = xs @ w_a.t()                                                  # [n, R*K]
    zt = z.to(acc).index_select(0, sl)                                # [n, K]
    s = torch.bmm(u.to(acc).view(n, R, K), zt.unsqueeze(-1)).squeeze(-1)  # [n, R]
    if scales is not None:
        s = s * scales.to(acc).index_select(0, sl).unsqueeze(1)
    outer = (s.unsqueeze(-1) * zt.unsqueeze(1)).reshape(n, R * K).to(x.dtype)  # vec(s_t ⊗ z_t)
    v = (outer @ w_b.t()).to(y.dtype)                                 # [n, d_out]
    if full:
        y.add_(v)
    else:
        y.index_add_(0, rows, v)
    return y


def materialize_adapters(z: Tensor, w_a: Tensor, w_b: Tensor) -> tuple[Tensor, Tensor]:
    """The adapters the latent path applies implicitly: A [S, R, d_in], B [S, d_out, R] (dtype of z·w).

    `A[s, r, i] = sum_k z[s, k] w_a[r*K + k, i]`, `B[s, o, r] = sum_k z[s, k] w_b[o, r*K + k]` (no scale).
    Used by tests (the materialized path fed with the same adapters) and by callers that want both paths.
    """
    S, K = z.shape
    RK, d_in = w_a.shape
    R = RK // K
    d_out = w_b.shape[0]
    dt = torch.promote_types(z.dtype, w_a.dtype)
    a = torch.einsum("sk,rki->sri", z.to(dt), w_a.to(dt).view(R, K, d_in))
    b = torch.einsum("sk,ork->sor", z.to(dt), w_b.to(dt).view(d_out, R, K))
    return a, b


# --------------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------------
def _run_triton(y: Tensor, x: Tensor, w_a: Tensor, w_b: Tensor, z: Tensor, slots: Tensor,
                scales: Optional[Tensor]) -> None:
    from hyperlora.kernels.latent_lora import latent_lora_triton  # optional: needs triton

    latent_lora_triton(y, x, w_a, w_b, z, slots, scales)


def _run_cuda(y: Tensor, x: Tensor, w_a: Tensor, w_b: Tensor, z: Tensor, slots: Tensor,
              scales: Optional[Tensor]) -> None:
    from hyperlora.ops._cuda import dtype_code, extension, stream_handle  # optional: the CUDA extension

    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"latent_lora: the cuda backend supports float16/bfloat16/float32, not {x.dtype}; "
                        "use backend='torch' for float64")
    ext = extension()
    T, d_in = x.shape
    d_out = y.shape[1]
    S, K = z.shape
    R = w_a.shape[0] // K
    xc, wac, wbc = x.contiguous(), w_a.contiguous(), w_b.contiguous()
    zc = z.to(torch.float32).contiguous()
    sl = slots.to(torch.int32).contiguous()
    sc = scales.to(torch.float32).contiguous() if scales is not None else None
    out = y if y.is_contiguous() else y.contiguous()
    s_buf = torch.empty(T, R, dtype=torch.float32, device=x.device)
    ext.latent_lora(out.data_ptr(), xc.data_ptr(), wac.data_ptr(), wbc.data_ptr(), zc.data_ptr(), sl.data_ptr(),
                    sc.data_ptr() if sc is not None else 0, s_buf.data_ptr(), T, d_in, d_out, R, K,
                    dtype_code(x), stream_handle(x.device))
    if out is not y:
        y.copy_(out)


def _run_torch(y: Tensor, x: Tensor, w_a: Tensor, w_b: Tensor, z: Tensor, slots: Tensor,
               scales: Optional[Tensor]) -> None:
    latent_lora_reference(y, x, w_a, w_b, z, slots, scales)


_IMPLS: dict[str, Callable[..., None]] = {"torch": _run_torch, "triton": _run_triton, "cuda": _run_cuda}


@torch.library.custom_op("hyperlora::latent_lora", mutates_args=("y",))
def _latent_lora_op(y: Tensor, x: Tensor, w_a: Tensor, w_b: Tensor, z: Tensor, slots: Tensor,
                    scales: Optional[Tensor], backend: str) -> None:
    _IMPLS[backend](y, x, w_a, w_b, z, slots, scales)


@_latent_lora_op.register_fake
def _latent_lora_fake(y: Tensor, x: Tensor, w_a: Tensor, w_b: Tensor, z: Tensor, slots: Tensor,
                      scales: Optional[Tensor], backend: str) -> None:
    return None


def _needs_grad(*ts: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


# --------------------------------------------------------------------------------------------------
# public op
# --------------------------------------------------------------------------------------------------
def latent_lora(y: Tensor, x: Tensor, w_a: Tensor, w_b: Tensor, z: Tensor, slots: Tensor,
                scales: Optional[Tensor] = None, *, backend: Optional[str] = None,
                meta: Optional[object] = None) -> Tensor:
    """Add generated LoRA updates to `y` in place, computed from the head and latents, never from A/B.

    Args:
        y: [T, d_out] output rows, updated in place (rows with slot -1 are left bitwise untouched).
        x: [T, d_in] input rows; float16, bfloat16, float32 (float64 on the torch backend).
        w_a: [R*K, d_in] the head's A part (same dtype as x), `A[r, i] = sum_k z[k] w_a[r*K+k, i]`.
        w_b: [d_out, R*K] the head's B part (same dtype as x), `B[o, r] = sum_k z[k] w_b[o, r*K+k]`.
        z: [S, K] per-slot latents of this layer+module (any float dtype; last coordinate 1 by convention).
        slots: [T] int32/int64, the slot of each token, -1 = no adapter.
        scales: [S] per-slot scale (alpha / r), None = 1.
        backend: "torch", "triton", "cuda" or None (HYPERLORA_BACKEND, else triton > cuda on a GPU, torch on a
            CPU; `hyperlora.ops._common.AUTO_GPU_ORDER` says why triton comes first).
        meta: optional `hyperlora.ops.metadata.LoraBatchMeta` built from these slots once per forward; when
            given, the per-call range check of `slots` (a device sync) is skipped and the torch path takes
            its active rows from it.
    Returns:
        y, after `y[t] += scales[s] * B_s A_s x[t]` for every t with s = slots[t] >= 0.
    """
    compiling = torch.compiler.is_compiling()
    _validate(y, x, w_a, w_b, z, slots, scales, check_values=(meta is None and not _capturing()))
    if meta is not None:
        _check_meta(meta, slots, z.shape[0])
    name = _pick_backend(backend, x.device, SUPPORTED_BACKENDS)
    if name != "torch" and x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"latent_lora: backend {name!r} supports float16/bfloat16/float32, not {x.dtype}; "
                        "use backend='torch'")
    if x.shape[0] == 0:
        return y
    if compiling:  # traced as one opaque custom op (fake impl for shapes), so torch.compile can capture it
        torch.ops.hyperlora.latent_lora(y, x, w_a, w_b, z, slots, scales, name)
        return y
    if name == "torch" or _needs_grad(x, w_a, w_b, z, scales):
        # The CPU path, and training through the latent path (the kernels have no backward). Eager calls skip
        # the custom-op wrapper: it costs ~0.1 ms per call on a CPU, more than a small layer's whole update.
        rows = None
        if meta is not None and getattr(meta, "num_active_tokens", None) is not None:
            rows = meta.token_ids[:meta.num_active_tokens].long()
        with no_autocast(x.device.type):
            return latent_lora_reference(y, x, w_a, w_b, z, slots, scales, rows=rows)
    _IMPLS[name](y, x, w_a, w_b, z, slots, scales)
    return y


def _check_meta(meta: object, slots: Tensor, num_slots: int) -> None:
    """TypeError unless `meta` is a LoraBatchMeta; ValueError unless it was built for these slots' sizes."""
    if not isinstance(meta, LoraBatchMeta):
        raise TypeError(f"latent_lora: meta must be a hyperlora.ops.metadata.LoraBatchMeta "
                        f"(build_meta(slots, S)) or None, got {type(meta).__name__}")
    if meta.num_tokens != slots.shape[0] or meta.num_slots > num_slots:
        raise ValueError(f"latent_lora: meta was built for T={meta.num_tokens} tokens over {meta.num_slots} slots "
                         f"but slots has T={slots.shape[0]} and z has S={num_slots}; rebuild it with "
                         f"build_meta(slots, {num_slots})")
