"""Triton kernel for `hyperlora.ops.generate_lora`: hypernetwork head -> adapter-pool slots, one launch per module type.

Both halves are one small-K GEMM against the head, with the output columns laid out exactly as the pool
stores them, so each program writes a contiguous run of a slot row (no intermediate tensor, no copy):

    rows  m = p * L + l                          (P policies x L layers)
    A:    column n = r * d_in + i   (r < R_max):  out = sum_k z[m, k] * w_a[(r*K + k) * d_in + i]
          -> pool_a[l, slots[p]].flat[n]          (zero where r >= R)
    B:    column n = o * R_max + r:               out = scales[p] * sum_k z[m, k] * w_b[(o*R + r) * K + k]
          -> pool_b[l, slots[p]].flat[n]          (zero where r >= R)

The grid is (row tiles, A column tiles + B column tiles); a program's column tile index says which half it
writes, and A tiles lying wholly in ranks R..R_max just store zeros. K (latent_dim + 1) fits in one BLOCK_K
tile. z and the head are read as float32 and the dot accumulates in float32 ("ieee"; "tf32" on a GPU when
the pool is bfloat16, whose rounding is coarser than tf32's), so the bf16 interpreter bug (TOOLCHAIN.md)
never arises; the result is cast to the pool's dtype on the store. Under TRITON_INTERPRET=1 (set before import) it runs on the CPU for tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["generate_lora_triton"]


@triton.jit
def _store_rows(out_ptr, acc, slots_ptr, M, L, S, N, offs_m, offs_n):
    """acc [BLOCK_M, BLOCK_N] -> pool rows (l, slots[p]) of the flat per-slot matrix of N columns."""
    m_mask = offs_m < M
    p = offs_m // L
    l = offs_m % L
    slot = tl.load(slots_ptr + p, mask=m_mask, other=0).to(tl.int64)
    row_base = (l.to(tl.int64) * S + slot) * N
    out_ptrs = out_ptr + row_base[:, None] + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_n < N)[None, :])


@triton.jit
def _head_tile(out_ptr, z_ptr, w_ptr, slots_ptr, scales_ptr, M, L, S, K, R, R_MAX, D, N,
               pid_m, pid_n, IS_B: tl.constexpr, APPLY_SCALE: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M rows x BLOCK_N pool columns] tile of A (IS_B=False, D=d_in) or B (IS_B=True, D=d_out)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_mask = offs_k < K
    # latents [BLOCK_M, BLOCK_K]
    z = tl.load(z_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
    z = z.to(tl.float32)
    # head columns [BLOCK_K, BLOCK_N] in pool order; ranks r >= R read nothing and give zeros
    if IS_B:
        o = offs_n // R_MAX
        r = offs_n % R_MAX
        w_off = (o * R + r) * K
        w_ptrs = w_ptr + w_off[None, :] + offs_k[:, None]
    else:
        r = offs_n // D
        i = offs_n % D
        w_ptrs = w_ptr + (r * K)[None, :] * D + offs_k[:, None] * D + i[None, :]
    col_ok = n_mask & (r < R)
    w = tl.load(w_ptrs, mask=k_mask[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    acc = tl.dot(z, w, input_precision=PRECISION)
    if APPLY_SCALE:
        sc = tl.load(scales_ptr + offs_m // L, mask=m_mask, other=0.0)
        acc = acc * sc[:, None]
    _store_rows(out_ptr, acc, slots_ptr, M, L, S, N, offs_m, offs_n)


@triton.jit
def _generate_lora_kernel(pool_a_ptr, pool_b_ptr, z_ptr, wa_ptr, wb_ptr, slots_ptr, scales_ptr,
                          M, L, S, K, R, R_MAX, D_IN, D_OUT, N_A, N_B, TILES_A, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_n < TILES_A:
        if pid_n * BLOCK_N >= R * D_IN:
            # the whole tile lies in ranks R..R_max of A: zeros, no head reads, no dot
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            _store_rows(pool_a_ptr, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), slots_ptr, M, L, S, N_A,
                        offs_m, offs_n)
        else:
            _head_tile(pool_a_ptr, z_ptr, wa_ptr, slots_ptr, scales_ptr, M, L, S, K, R, R_MAX, D_IN, N_A,
                       pid_m, pid_n, False, False, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _head_tile(pool_b_ptr, z_ptr, wb_ptr, slots_ptr, scales_ptr, M, L, S, K, R, R_MAX, D_OUT, N_B,
                   pid_m, pid_n - TILES_A, True, True, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


def generate_lora_triton(pool_a: torch.Tensor, pool_b: torch.Tensor, z: torch.Tensor, w_a: torch.Tensor,
                         w_b: torch.Tensor, slots: torch.Tensor, scales: torch.Tensor,
                         block_m: int = 32, block_n: int = 128) -> None:
    """Launch the kernel. Inputs already validated by `hyperlora.ops.generate_lora`: pool_a [L, S, R_max, d_in]
    and pool_b [L, S, d_out, R_max] contiguous; z [P, L, K], w_a [R*K, d_in], w_b [d_out, R*K] float32
    contiguous; slots [P] int64; scales [P] float32 (all on the pool's device)."""
    P, L, K = z.shape
    if P == 0:
        return
    _, S, R_max, d_in = pool_a.shape
    d_out = pool_b.shape[2]
    R = w_a.shape[0] // K
    M = P * L
    n_a, n_b = R_max * d_in, d_out * R_max
    block_k = max(16, triton.next_power_of_2(K))
    tiles_a, tiles_b = triton.cdiv(n_a, block_n), triton.cdiv(n_b, block_n)
    grid = (triton.cdiv(M, block_m), tiles_a + tiles_b)
    # bf16 pools keep 8 mantissa bits: tf32 products (10 bits, fp32 accumulation) are below their rounding and
    # run on tensor cores; float32/float16 pools get exact fp32 products
    precision = "tf32" if (pool_a.dtype == torch.bfloat16 and pool_a.is_cuda) else "ieee"
    _generate_lora_kernel[grid](pool_a, pool_b, z, w_a, w_b, slots, scales, M, L, S, K, R, R_max, d_in, d_out,
                                n_a, n_b, tiles_a, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
                                BLOCK_K=block_k)
