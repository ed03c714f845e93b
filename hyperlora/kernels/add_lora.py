"""Triton kernels of `hyperlora.ops.add_lora`: shrink and expand over segments of tokens sharing a slot.

Metadata (`hyperlora.ops.metadata.build_meta`) sorts tokens by slot once per forward; segment i covers
sorted positions [seg_starts[i], seg_starts[i] + seg_counts[i]) with adapter seg_slots[i], for
i < num_active[0]. Program (i, m, ·) handles BLOCK_M tokens of segment i, so each adapter tile is loaded
once per token block instead of once per token, and rows with slot -1 are never read or written.

1. `_shrink_kernel`: h[j, p, :r] = scale[s] * x[tok[p]] @ A_j[s, :r].T for up to three slices j that share x
   (q/k/v), so each x tile is loaded once for all of them. h is a small float32 buffer in sorted order.
2. `_expand_kernel`: y_j[tok[p]] += h[j, p, :r] @ B_j[s, :, :r].T, float32 accumulate, one rounding.

Configurations: decode (segments of <= 16 tokens: BLOCK_M 16, wide d tiles) and prefill (BLOCK_M 32/64).
Decode launches one shrink program per adapter, too few to fill a GPU, so the shrink then splits d_in
across programs (`split_k_for`) and adds float32 partial sums atomically into a zeroed h.
Segment bounds are read on the device, so with fixed-size metadata the launches are CUDA-graph safe (the
grid then covers all S slots and T tokens; programs past the active segments exit at once).
Float32 inputs use IEEE float32 dots (no TF32); float16/bfloat16 use tensor cores with float32 accumulation.
Under TRITON_INTERPRET=1 tiles are upcast to float32 (bf16 `tl.dot` is wrong in the interpreter).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from hyperlora.ops.backends import triton_interpreting

__all__ = ["add_lora_triton", "pick_config"]

MAX_RANK = 256


@triton.jit
def _shrink_kernel(
    x_ptr, h_ptr, tok_ptr, seg_slot_ptr, seg_start_ptr, seg_count_ptr, nact_ptr, ranks_ptr, scales_ptr,
    a0_ptr, a1_ptr, a2_ptr,
    sa0_s, sa0_r, sa0_d, sa1_s, sa1_r, sa1_d, sa2_s, sa2_r, sa2_d,
    R0, R1, R2, D_IN, K_PER_SPLIT, NUM_R_BLOCKS, stride_xt, stride_xd, stride_hj, stride_ht,
    NUM_SLICES: tl.constexpr, HAS_RANKS: tl.constexpr, HAS_SCALES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    seg = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    n_seg = tl.load(nact_ptr)
    if seg >= n_seg:
        return
    count = tl.load(seg_count_ptr + seg)
    if m0 >= count:
        return
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    start = tl.load(seg_start_ptr + seg).to(tl.int64)
    rank = 1 << 30
    if HAS_RANKS:
        rank = tl.load(ranks_ptr + slot).to(tl.int32)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    tok = tl.load(tok_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    pid_r = tl.program_id(2) % NUM_R_BLOCKS
    k_begin = (tl.program_id(2) // NUM_R_BLOCKS) * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, D_IN)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r0_mask = offs_r < tl.minimum(rank, R0)
    r1_mask = offs_r < tl.minimum(rank, R1)
    r2_mask = offs_r < tl.minimum(rank, R2)
    acc0 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        xt = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xd,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
        at = tl.load(a0_ptr + slot * sa0_s + offs_r[None, :] * sa0_r + offs_k[:, None] * sa0_d,
                     mask=r0_mask[None, :] & k_mask[:, None], other=0.0)             # [BLOCK_K, BLOCK_R]
        if UPCAST:
            at = at.to(tl.float32)
        if IEEE:
            acc0 = tl.dot(xt, at, acc0, input_precision="ieee")
        else:
            acc0 = tl.dot(xt, at, acc0)
        if NUM_SLICES > 1:
            at = tl.load(a1_ptr + slot * sa1_s + offs_r[None, :] * sa1_r + offs_k[:, None] * sa1_d,
                         mask=r1_mask[None, :] & k_mask[:, None], other=0.0)
            if UPCAST:
                at = at.to(tl.float32)
            if IEEE:
                acc1 = tl.dot(xt, at, acc1, input_precision="ieee")
            else:
                acc1 = tl.dot(xt, at, acc1)
        if NUM_SLICES > 2:
            at = tl.load(a2_ptr + slot * sa2_s + offs_r[None, :] * sa2_r + offs_k[:, None] * sa2_d,
                         mask=r2_mask[None, :] & k_mask[:, None], other=0.0)
            if UPCAST:
                at = at.to(tl.float32)
            if IEEE:
                acc2 = tl.dot(xt, at, acc2, input_precision="ieee")
            else:
                acc2 = tl.dot(xt, at, acc2)
    if HAS_SCALES:
        sc = tl.load(scales_ptr + slot).to(tl.float32)
        acc0 = acc0 * sc
        acc1 = acc1 * sc
        acc2 = acc2 * sc
    h_rows = h_ptr + (start + offs_m)[:, None] * stride_ht + offs_r[None, :]
    if SPLIT_K == 1:
        tl.store(h_rows, acc0, mask=m_mask[:, None] & (offs_r < R0)[None, :])
        if NUM_SLICES > 1:
            tl.store(h_rows + stride_hj, acc1, mask=m_mask[:, None] & (offs_r < R1)[None, :])
        if NUM_SLICES > 2:
            tl.store(h_rows + 2 * stride_hj, acc2, mask=m_mask[:, None] & (offs_r < R2)[None, :])
    else:  # partial sums over a slice of d_in into a zeroed h
        tl.atomic_add(h_rows, acc0, mask=m_mask[:, None] & (offs_r < R0)[None, :])
        if NUM_SLICES > 1:
            tl.atomic_add(h_rows + stride_hj, acc1, mask=m_mask[:, None] & (offs_r < R1)[None, :])
        if NUM_SLICES > 2:
            tl.atomic_add(h_rows + 2 * stride_hj, acc2, mask=m_mask[:, None] & (offs_r < R2)[None, :])


@triton.jit
def _expand_kernel(
    h_ptr, y_ptr, b_ptr, tok_ptr, seg_slot_ptr, seg_start_ptr, seg_count_ptr, nact_ptr, ranks_ptr,
    R, D_OUT, sb_s, sb_o, sb_r, stride_yt, stride_yo, stride_ht,
    HAS_RANKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    seg = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    n_seg = tl.load(nact_ptr)
    if seg >= n_seg:
        return
    count = tl.load(seg_count_ptr + seg)
    if m0 >= count:
        return
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    rank = R
    if HAS_RANKS:
        rank = tl.minimum(tl.load(ranks_ptr + slot).to(tl.int32), R)
    if rank <= 0:
        return
    start = tl.load(seg_start_ptr + seg).to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    tok = tl.load(tok_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < D_OUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        ht = tl.load(h_ptr + (start + offs_m)[:, None] * stride_ht + offs_r[None, :],
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)               # float32 [BLOCK_M, BLOCK_R]
        bt = tl.load(b_ptr + slot * sb_s + offs_n[None, :] * sb_o + offs_r[:, None] * sb_r,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)               # [BLOCK_R, BLOCK_N]
        if UPCAST:
            bt = bt.to(tl.float32)
        else:
            ht = ht.to(bt.dtype)
        if IEEE:
            acc = tl.dot(ht, bt, acc, input_precision="ieee")
        else:
            acc = tl.dot(ht, bt, acc)
    y_ptrs = y_ptr + tok[:, None] * stride_yt + offs_n[None, :] * stride_yo
    mask = m_mask[:, None] & n_mask[None, :]
    yt = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (yt.to(tl.float32) + acc).to(yt.dtype), mask=mask)


# Tests set this to force a split of d_in in the shrink (the interpreter never needs one).
FORCE_SPLIT_K: Optional[int] = None


def split_k_for(programs: int, d_in: int, block_k: int, device: torch.device, interpreting: bool) -> int:
    """How many slices of d_in the shrink splits into, so that decode (few programs: one per adapter)
    still fills the GPU: aim for ~2 programs per SM, each with at least two K tiles. Partial sums are
    added atomically into a zeroed float32 h (summation order, hence the last bits, may vary per run)."""
    if FORCE_SPLIT_K is not None:
        return max(1, min(FORCE_SPLIT_K, triton.cdiv(d_in, block_k)))
    if interpreting or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, d_in // (2 * block_k), 16))


def pick_config(max_seg_len: int, d_in: int, d_out: int, rank: int, interpreting: bool) -> dict:
    """Block sizes for decode (short segments) or prefill (long segments); `max_seg_len` -1 = unknown."""
    block_r = max(16, triton.next_power_of_2(max(rank, 1)))
    if interpreting:  # few, large programs: the interpreter's cost is per program and loop iteration
        bm = max(16, min(64, triton.next_power_of_2(max(max_seg_len, 1))))
        return dict(BLOCK_M=bm, BLOCK_K=max(16, min(256, triton.next_power_of_2(d_in))),
                    BLOCK_N=max(16, min(256, triton.next_power_of_2(d_out))),
                    BLOCK_R_SHRINK=min(block_r, MAX_RANK), BLOCK_R_EXPAND=min(block_r, 64),
                    warps_shrink=4, warps_expand=4)
    decode = 0 <= max_seg_len <= 16
    if decode:
        return dict(BLOCK_M=16, BLOCK_K=256 if block_r <= 32 else 128, BLOCK_N=128,
                    BLOCK_R_SHRINK=min(block_r, 64), BLOCK_R_EXPAND=min(block_r, 64),
                    warps_shrink=4, warps_expand=4)
    bm = 32 if 0 <= max_seg_len <= 32 else 64
    return dict(BLOCK_M=bm, BLOCK_K=64 if block_r <= 64 else 32, BLOCK_N=128,
                BLOCK_R_SHRINK=min(block_r, 64), BLOCK_R_EXPAND=min(block_r, 64),
                warps_shrink=4, warps_expand=8 if bm == 64 else 4)


def add_lora_triton(ys: Sequence[torch.Tensor], x: torch.Tensor, as_: Sequence[torch.Tensor],
                    bs: Sequence[torch.Tensor], scales: Optional[torch.Tensor], ranks: Optional[torch.Tensor],
                    token_ids: torch.Tensor, seg_slots: torch.Tensor, seg_starts: torch.Tensor,
                    seg_counts: torch.Tensor, num_active: torch.Tensor, *, max_seg_len: int = -1,
                    num_segments: int = -1) -> None:
    """Launch shrink + expand for validated inputs (see `hyperlora.ops.add_lora`); updates each y in place.

    `max_seg_len` and `num_segments` (from the metadata's host summary) size the grid; `max_seg_len` picks
    the decode or prefill configuration. -1 (unknown, e.g. CUDA-graph buffers) launches over all S slots
    and T tokens; programs past the active segments exit at once.
    """
    t, d_in = x.shape
    num_slots = as_[0].shape[0]
    if t == 0:
        return
    r_max = max(a.shape[1] for a in as_)
    if r_max > MAX_RANK:
        raise ValueError(f"lora_a rank R={r_max} exceeds the Triton backend's maximum {MAX_RANK}; use backend='torch'")
    if r_max == 0:
        return
    interp = triton_interpreting()
    upcast = interp
    ieee = x.dtype == torch.float32
    known = max_seg_len >= 0
    if known and max_seg_len == 0:
        return
    cfg = pick_config(max_seg_len, d_in, max(y.shape[1] for y in ys), r_max, interp)
    bm = cfg["BLOCK_M"]
    grid_seg = num_segments if num_segments >= 0 else num_slots
    if grid_seg == 0:
        return
    grid_m = triton.cdiv(max_seg_len if known else t, bm)
    r_blocks = triton.cdiv(r_max, cfg["BLOCK_R_SHRINK"])
    split = split_k_for(grid_seg * grid_m * r_blocks, d_in, cfg["BLOCK_K"], x.device, interp)
    k_per_split = triton.cdiv(triton.cdiv(d_in, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split = triton.cdiv(d_in, k_per_split)
    alloc = torch.zeros if split > 1 else torch.empty
    h = alloc((len(ys), t, r_max), dtype=torch.float32, device=x.device)
    dummy = scales if scales is not None else token_ids
    rk = ranks if ranks is not None else token_ids
    for g0 in range(0, len(as_), 3):
        grp = list(range(g0, min(g0 + 3, len(as_))))
        a_l = [as_[j] for j in grp] + [as_[grp[0]]] * (3 - len(grp))
        rs = [a.shape[1] for a in a_l[:len(grp)]] + [0] * (3 - len(grp))
        hv = h[g0:]
        br = cfg["BLOCK_R_SHRINK"]
        grid = (grid_seg, grid_m, r_blocks * split)
        _shrink_kernel[grid](
            x, hv, token_ids, seg_slots, seg_starts, seg_counts, num_active, rk, dummy,
            a_l[0], a_l[1], a_l[2],
            *a_l[0].stride(), *a_l[1].stride(), *a_l[2].stride(),
            rs[0], rs[1], rs[2], d_in, k_per_split, r_blocks, x.stride(0), x.stride(1), hv.stride(0), hv.stride(1),
            NUM_SLICES=len(grp), HAS_RANKS=ranks is not None, HAS_SCALES=scales is not None,
            BLOCK_M=bm, BLOCK_R=br, BLOCK_K=cfg["BLOCK_K"], SPLIT_K=split, UPCAST=upcast, IEEE=ieee,
            num_warps=cfg["warps_shrink"],
        )
    for j, (y, b) in enumerate(zip(ys, bs)):
        d_out, r = y.shape[1], b.shape[2]
        if r == 0 or d_out == 0:
            continue
        grid = (grid_seg, grid_m, triton.cdiv(d_out, cfg["BLOCK_N"]))
        _expand_kernel[grid](
            h[j], y, b, token_ids, seg_slots, seg_starts, seg_counts, num_active, rk,
            r, d_out, *b.stride(), y.stride(0), y.stride(1), h.stride(1),
            HAS_RANKS=ranks is not None, BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R_EXPAND"],
            UPCAST=upcast, IEEE=ieee, num_warps=cfg["warps_expand"],
        )
