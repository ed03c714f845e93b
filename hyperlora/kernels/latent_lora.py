"""Triton kernels of the latent path (`hyperlora.ops.latent_lora`): generated adapters never materialized.

Two launches, with the per-token contraction with z fused into the GEMMs so the [T, R*K] intermediate
`u = x @ w_a.T` never reaches memory:

1. `_latent_shrink_kernel` (GEMM epilogue): for a tile of tokens, a contiguous run of ranks
   [r0, r0 + R_PER_PROG) and one slice of d_in, compute u over the run's columns of w_a ([R*K, d_in],
   r-major), multiply by the token's latent z[slot_t, k] (k = column % K) and reduce each K-group into
   s[t, r]. With the per-slot scale folded in, s is a tiny [splits, T, R] float32 buffer: decode batches
   split d_in so every SM has work while token tiles stay large (each re-reads the head), and since the
   contraction is linear in u the partial sums are simply added later (deterministically, no atomics).
2. `_latent_expand_kernel` (GEMM prologue): sum the partial s, build the operand tile
   p[t, j] = s[t, j // K] * z[slot_t, j % K] in registers and multiply by w_b ([d_out, R*K]); add into y
   only where slot_t >= 0, so rows with slot -1 are never written.

Both GEMMs read only the shared head, so bytes do not grow with the number of distinct policies.
Accumulation is float32. Under TRITON_INTERPRET=1 (set before this module is imported) bf16 `tl.dot`
is wrong in the interpreter, so tiles are upcast to float32 there (constexpr UPCAST).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from hyperlora.ops.backends import triton_interpreting

__all__ = ["latent_lora_triton", "launch_config", "LaunchConfig"]


@triton.jit
def _latent_shrink_kernel(
    x_ptr, wa_ptr, z_ptr, slots_ptr, scales_ptr, s_ptr,
    T, D_IN, R, K, stride_xt, stride_zs, D_PER_SPLIT,
    HAS_SCALES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    R_PER_PROG: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)  # split of d_in: partial s (the contraction is linear in u), summed by the expand
    d_lo = pid_s * D_PER_SPLIT
    d_hi = tl.minimum(d_lo + D_PER_SPLIT, D_IN)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    slot = tl.load(slots_ptr + offs_t, mask=t_mask, other=-1).to(tl.int32)
    active = t_mask & (slot >= 0)
    slot_safe = tl.where(active, slot, 0)

    r0 = pid_r * R_PER_PROG
    col_start = r0 * K
    col_end = tl.minimum(r0 + R_PER_PROG, R) * K
    offs_rr = tl.arange(0, R_PER_PROG)
    s_acc = tl.zeros([BLOCK_T, R_PER_PROG], dtype=tl.float32)
    for c0 in range(col_start, col_end, BLOCK_N):
        offs_n = c0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < col_end
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for d0 in range(d_lo, d_hi, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < d_hi
            xt = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_d[None, :],
                         mask=active[:, None] & d_mask[None, :], other=0.0)
            wt = tl.load(wa_ptr + offs_n[None, :] * D_IN + offs_d[:, None],
                         mask=n_mask[None, :] & d_mask[:, None], other=0.0)            # [BLOCK_D, BLOCK_N]
            if UPCAST:
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            if IEEE:
                acc = tl.dot(xt, wt, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, wt, acc)
        # epilogue: contract each K-group of u with the token's latent
        kk = offs_n % K
        zt = tl.load(z_ptr + slot_safe[:, None] * stride_zs + kk[None, :],
                     mask=active[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        p = acc * zt                                                                    # [BLOCK_T, BLOCK_N]
        rr = tl.where(n_mask, offs_n // K - r0, -1)                                    # local rank of a column
        for i in tl.static_range(R_PER_PROG):  # segmented sum of each rank's K columns, in registers
            s_col = tl.sum(tl.where((rr == i)[None, :], p, 0.0), axis=1)                # [BLOCK_T]
            s_acc = tl.where((offs_rr == i)[None, :], s_acc + s_col[:, None], s_acc)
    if HAS_SCALES:
        sc = tl.load(scales_ptr + slot_safe, mask=active, other=0.0).to(tl.float32)
        s_acc = s_acc * sc[:, None]
    r_mask = (r0 + offs_rr) < R
    tl.store(s_ptr + pid_s * T * R + offs_t[:, None] * R + (r0 + offs_rr)[None, :], s_acc,
             mask=t_mask[:, None] & r_mask[None, :])


@triton.jit
def _latent_expand_kernel(
    y_ptr, s_ptr, z_ptr, slots_ptr, wb_ptr,
    T, D_OUT, R, K, stride_yt, stride_zs, SPLITS,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    slot = tl.load(slots_ptr + offs_t, mask=t_mask, other=-1).to(tl.int32)
    active = t_mask & (slot >= 0)
    slot_safe = tl.where(active, slot, 0)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = offs_o < D_OUT
    RK = R * K
    acc = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
    for j0 in range(0, RK, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_mask = offs_j < RK
        pm = active[:, None] & j_mask[None, :]
        # prologue: the stacked outer products s_t ⊗ z_t, built in registers
        s_ptrs = s_ptr + offs_t[:, None] * R + (offs_j // K)[None, :]
        sv = tl.load(s_ptrs, mask=pm, other=0.0)
        for sp in range(1, SPLITS):
            sv += tl.load(s_ptrs + sp * T * R, mask=pm, other=0.0)
        zv = tl.load(z_ptr + slot_safe[:, None] * stride_zs + (offs_j % K)[None, :], mask=pm, other=0.0)
        wt = tl.load(wb_ptr + offs_o[None, :] * RK + offs_j[:, None],
                     mask=o_mask[None, :] & j_mask[:, None], other=0.0)                # [BLOCK_J, BLOCK_O]
        p = (sv * zv.to(tl.float32)).to(wt.dtype)
        if UPCAST:
            p = p.to(tl.float32)
            wt = wt.to(tl.float32)
        if IEEE:
            acc = tl.dot(p, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(p, wt, acc)
    ym = active[:, None] & o_mask[None, :]
    y_ptrs = y_ptr + offs_t[:, None] * stride_yt + offs_o[None, :]
    yv = tl.load(y_ptrs, mask=ym, other=0.0)
    tl.store(y_ptrs, (yv.to(tl.float32) + acc).to(yv.dtype), mask=ym)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes of one launch pair. shrink: token tile, ranks per program, d_in splits; expand: token tile."""

    block_t: int
    block_d: int
    block_n: int
    r_per_prog: int
    splits: int
    expand_block_t: int
    block_o: int = 64
    block_j: int = 64


def launch_config(T: int, d_in: int, d_out: int, R: int, K: int, device: torch.device) -> LaunchConfig:
    """Heuristic tiles. On a GPU: large token tiles (each re-reads the shared head from L2), then as many
    ranks per program and as many d_in splits as it takes to give every SM two programs. Under the
    interpreter, which pays per program and per loop iteration: few, large blocks."""
    rpp_max = min(_pow2(R), 8)  # the epilogue unrolls one segmented sum per rank of the program
    if triton_interpreting():
        bt = min(64, max(16, _pow2(T)))
        return LaunchConfig(bt, 128, min(64, max(16, _pow2(rpp_max * K))), rpp_max, 1, bt)
    want = 2 * _sm_count(device)
    bt = 64 if T > 32 else (32 if T > 16 else 16)
    n_tt = triton.cdiv(T, bt)
    rpp = rpp_max
    while rpp > 1 and n_tt * triton.cdiv(R, rpp) < want:
        rpp //= 2
    block_d = 64
    programs = n_tt * triton.cdiv(R, rpp)
    max_splits = max(1, d_in // (4 * block_d))  # at least 4 d-steps per split
    splits = min(max_splits, triton.cdiv(want, programs)) if programs < want else 1
    ebt = next((b for b in (64, 32) if triton.cdiv(T, b) * triton.cdiv(d_out, 64) >= want // 2), 16)
    return LaunchConfig(bt, block_d, min(64, max(16, _pow2(rpp * K))), rpp, splits, ebt)


def latent_lora_triton(y: torch.Tensor, x: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor, z: torch.Tensor,
                       slots: torch.Tensor, scales: Optional[torch.Tensor] = None,
                       config: Optional[LaunchConfig] = None) -> torch.Tensor:
    """Launch the two latent kernels (inputs already validated by `hyperlora.ops.latent_lora`).

    y [T, d_out] (updated in place, slot -1 rows untouched), x [T, d_in], w_a [R*K, d_in], w_b [d_out, R*K]
    (all one dtype: float16/bfloat16/float32), z [S, K] any float, slots [T] int, scales [S] or None.
    `config` overrides the tile heuristic (tests use it to cover split d_in and odd tilings).
    """
    T, d_in = x.shape
    d_out = y.shape[1]
    S, K = z.shape
    R = w_a.shape[0] // K
    if T == 0:
        return y
    interp = triton_interpreting()
    upcast = interp and x.dtype == torch.bfloat16
    ieee = x.dtype == torch.float32
    x = x if x.stride(-1) == 1 else x.contiguous()
    w_a = w_a.contiguous()
    w_b = w_b.contiguous()
    z32 = z.to(torch.float32).contiguous()
    sl = slots.contiguous()
    sc = scales.to(torch.float32).contiguous() if scales is not None else None
    out = y if y.stride(-1) == 1 else y.contiguous()
    cfg = config or launch_config(T, d_in, d_out, R, K, x.device)
    d_per_split = triton.cdiv(triton.cdiv(d_in, cfg.splits), cfg.block_d) * cfg.block_d
    splits = triton.cdiv(d_in, d_per_split)
    s_buf = torch.empty(splits, T, R, dtype=torch.float32, device=x.device)  # partial s per d_in split

    _latent_shrink_kernel[(triton.cdiv(T, cfg.block_t), triton.cdiv(R, cfg.r_per_prog), splits)](
        x, w_a, z32, sl, sc if sc is not None else z32, s_buf,
        T, d_in, R, K, x.stride(0), z32.stride(0), d_per_split,
        HAS_SCALES=sc is not None, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        R_PER_PROG=cfg.r_per_prog, UPCAST=upcast, IEEE=ieee,
    )
    _latent_expand_kernel[(triton.cdiv(T, cfg.expand_block_t), triton.cdiv(d_out, cfg.block_o))](
        out, s_buf, z32, sl, w_b,
        T, d_out, R, K, out.stride(0), z32.stride(0), splits,
        BLOCK_T=cfg.expand_block_t, BLOCK_O=cfg.block_o, BLOCK_J=cfg.block_j, UPCAST=upcast, IEEE=ieee,
    )
    if out is not y:
        y.copy_(out)
    return y
