"""`add_lora`: many LoRA adapters applied in one batch, each token with its own adapter slot.

    y[t] += scales[s] * (x[t] @ lora_a[s, :r].T) @ lora_b[s, :, :r].T     for s = slots[t] >= 0, r = ranks[s]

Rows whose slot is -1 are left bitwise untouched. Shapes: x [T, d_in], y [T, d_out], lora_a [S, R, d_in],
lora_b [S, d_out, R], slots [T] int32/int64, scales [S] float (None = 1), ranks [S] int (None = R).
Sliced form: `y`, `lora_a`, `lora_b` are equal-length tuples (e.g. q, k, v sharing x); the Triton shrink
reads each x tile once for up to three slices.

Backends: "torch" (grouped by slot, the CPU path and the test oracle, differentiable), "triton" and
"cuda" (GPU kernels over sorted segments). All accumulate in float32 for float16/bfloat16 inputs.
The op is registered with torch.library as `hyperlora::add_lora_` (in-place, with a fake
implementation) so it works under torch.compile; with `meta=` built by
`build_meta(slots, S, out=LoraBatchMeta.empty(...))` it also runs inside CUDA graphs (Triton/CUDA).
When autograd is needed (grad mode on and x, lora_a or lora_b requires grad) the differentiable
functional op `hyperlora::lora_delta` is used instead (torch backend).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from hyperlora.ops.backends import BackendUnavailableError
from hyperlora.ops import _cpu_kernel
from hyperlora.ops._autocast import no_autocast
from hyperlora.ops._common import acc_dtype as _acc_dtype, capturing as _capturing, pick_backend as _pick_backend
from hyperlora.ops.metadata import LoraBatchMeta, build_meta, check_slots

TensorOrTuple = Union[torch.Tensor, Sequence[torch.Tensor]]
BACKENDS = ("torch", "triton", "cuda")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------
def _as_tuple(v: TensorOrTuple, name: str) -> tuple[torch.Tensor, ...]:
    if isinstance(v, torch.Tensor):
        return (v,)
    if isinstance(v, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in v):
        if len(v) == 0:
            raise ValueError(f"{name} is an empty sequence; pass at least one tensor")
        return tuple(v)
    raise TypeError(f"{name} must be a torch.Tensor or a tuple of tensors (sliced form), got {type(v).__name__}")


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16 (float64 on the torch backend), "
                         f"got {t.dtype}")


def validate(y: TensorOrTuple, x: torch.Tensor, lora_a: TensorOrTuple, lora_b: TensorOrTuple,
             slots: torch.Tensor, scales: Optional[torch.Tensor], ranks: Optional[torch.Tensor],
             meta: Optional[LoraBatchMeta] = None) -> tuple[tuple[torch.Tensor, ...], ...]:
    """Check every argument (ValueError/TypeError naming it) and return (ys, as, bs) as tuples."""
    sliced = not isinstance(y, torch.Tensor)
    ys, as_, bs = _as_tuple(y, "y"), _as_tuple(lora_a, "lora_a"), _as_tuple(lora_b, "lora_b")
    if sliced != (not isinstance(lora_a, torch.Tensor)) or sliced != (not isinstance(lora_b, torch.Tensor)):
        raise ValueError("y, lora_a and lora_b must all be tensors, or all tuples of the same length (sliced form)")
    if not (len(ys) == len(as_) == len(bs)):
        raise ValueError(f"sliced form: y, lora_a and lora_b must have the same length, got "
                         f"{len(ys)}, {len(as_)}, {len(bs)}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [T, d_in], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, d_in] (flatten batch and sequence first), got shape {tuple(x.shape)}")
    _check_float(x, "x")
    t, d_in = x.shape
    dev, dt = x.device, x.dtype
    check_slots_shape = isinstance(slots, torch.Tensor) and slots.dim() == 1 and slots.shape[0] != t
    if check_slots_shape:
        raise ValueError(f"slots must have one entry per token of x: shape [{t}], got {tuple(slots.shape)}")
    num_slots = None
    for i, (yi, ai, bi) in enumerate(zip(ys, as_, bs)):
        sfx = f"[{i}]" if sliced else ""
        for name, ten, nd in ((f"y{sfx}", yi, 2), (f"lora_a{sfx}", ai, 3), (f"lora_b{sfx}", bi, 3)):
            if ten.dim() != nd:
                want = {"y": "[T, d_out]", "lora_a": "[S, R, d_in]", "lora_b": "[S, d_out, R]"}[name.split("[")[0]]
                raise ValueError(f"{name} must be {nd}-D {want}, got shape {tuple(ten.shape)}")
            _check_float(ten, name)
            if ten.dtype != dt:
                raise ValueError(f"{name} has dtype {ten.dtype} but x has {dt}; cast it with .to({dt})")
            if ten.device != dev:
                raise ValueError(f"{name} is on {ten.device} but x is on {dev}; move it with .to('{dev}')")
        if yi.shape[0] != t:
            raise ValueError(f"y{sfx} must have T={t} rows like x, got shape {tuple(yi.shape)}")
        s, r, a_in = ai.shape
        if a_in != d_in:
            raise ValueError(f"lora_a{sfx} must be [S, R, d_in={d_in}] (last dim = x's), got {tuple(ai.shape)}")
        if bi.shape != (s, yi.shape[1], r):
            raise ValueError(f"lora_b{sfx} must be [S={s}, d_out={yi.shape[1]}, R={r}] to match lora_a{sfx} "
                             f"{tuple(ai.shape)} and y{sfx} {tuple(yi.shape)}, got {tuple(bi.shape)}")
        if num_slots is None:
            num_slots = s
        elif s != num_slots:
            raise ValueError(f"lora_a{sfx} has S={s} slots but lora_a[0] has {num_slots}; slices share slots")
        if not _capturing() and yi.numel() and x.numel() and yi.data_ptr() == x.data_ptr():
            raise ValueError(f"y{sfx} must not alias x (y is updated in place)")
    assert num_slots is not None
    if num_slots < 1:
        raise ValueError("lora_a must have at least one slot (S >= 1)")
    if isinstance(slots, torch.Tensor) and slots.device != dev:
        raise ValueError(f"slots is on {slots.device} but x is on {dev}; move it with .to('{dev}')")
    if meta is None:
        check_slots(slots, num_slots)
    else:
        if not isinstance(meta, LoraBatchMeta):
            raise TypeError(f"meta must be a LoraBatchMeta from build_meta, got {type(meta).__name__}")
        if meta.num_tokens != t or meta.num_slots != num_slots or meta.device != dev:
            raise ValueError(f"meta was built for T={meta.num_tokens}, S={meta.num_slots} on {meta.device}, "
                             f"but this call has T={t}, S={num_slots} on {dev}; rebuild it with build_meta")
        if not isinstance(slots, torch.Tensor) or slots.dim() != 1:
            raise ValueError("slots must be a 1-D tensor [T]")
    if scales is not None:
        if not isinstance(scales, torch.Tensor):
            raise TypeError(f"scales must be a float tensor [S] or None, got {type(scales).__name__}")
        if scales.shape != (num_slots,) or not scales.is_floating_point():
            raise ValueError(f"scales must be a float tensor of shape [S={num_slots}], got "
                             f"{tuple(scales.shape)} {scales.dtype}")
        if scales.device != dev:
            raise ValueError(f"scales is on {scales.device} but x is on {dev}")
    if ranks is not None:
        if not isinstance(ranks, torch.Tensor):
            raise TypeError(f"ranks must be an int tensor [S] or None, got {type(ranks).__name__}")
        if ranks.shape != (num_slots,) or ranks.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ranks must be an int32/int64 tensor of shape [S={num_slots}], got "
                             f"{tuple(ranks.shape)} {ranks.dtype}")
        if ranks.device != dev:
            raise ValueError(f"ranks is on {ranks.device} but x is on {dev}")
        if ranks.numel() and not _capturing():
            lo, hi = (int(v) for v in torch.aminmax(ranks))
            min_r = min(a.shape[1] for a in as_)
            if lo < 0 or hi > min_r:
                raise ValueError(f"ranks values must be in [0, R={min_r}] (R = lora_a.shape[1]), got min {lo} "
                                 f"and max {hi}")
    return ys, as_, bs


# ----------------------------------------------------------------------------------------------------
# torch backend (grouped by slot; no per-token Python loop)
# ----------------------------------------------------------------------------------------------------
def _host_segments(token_ids: torch.Tensor, seg_slots: torch.Tensor, seg_starts: torch.Tensor,
                   seg_counts: torch.Tensor, num_active: torch.Tensor) -> tuple[list, int]:
    n_seg, n_tok = (int(v) for v in num_active.tolist())
    segs = list(zip(seg_slots[:n_seg].tolist(), seg_starts[:n_seg].tolist(), seg_counts[:n_seg].tolist()))
    return segs, n_tok


def _segment_deltas(x: torch.Tensor, as_: Sequence[torch.Tensor], bs: Sequence[torch.Tensor],
                    scales: Optional[torch.Tensor], ranks: Optional[torch.Tensor], ids: torch.Tensor,
                    segs: list, n_tok: int) -> list[torch.Tensor]:
    """Per slice, the LoRA deltas [n_tok, d_out] (accumulation dtype) of the active tokens in sorted order."""
    acc = _acc_dtype(x.dtype)
    xs = x.index_select(0, ids)
    if xs.dtype != acc:
        xs = xs.to(acc)
    outs = [torch.zeros(n_tok, b.shape[1], dtype=acc, device=x.device) for b in bs]
    scale_l = scales.tolist() if scales is not None else None
    rank_l = ranks.tolist() if ranks is not None else None
    for s, st, n in segs:
        sc = 1.0 if scale_l is None else scale_l[s]
        xseg = xs[st:st + n]
        for a, b, out in zip(as_, bs, outs):
            r = a.shape[1] if rank_l is None else rank_l[s]
            if r == 0:
                continue
            a_s, b_s = a[s, :r], b[s, :, :r]
            if a_s.dtype != acc:
                a_s, b_s = a_s.to(acc), b_s.to(acc)
            h = torch.mm(xseg, a_s.t())
            if sc != 1.0:
                h.mul_(sc)
            torch.mm(h, b_s.t(), out=out[st:st + n])
    return outs


def _apply_rows(y: torch.Tensor, ids: torch.Tensor, delta: torch.Tensor) -> None:
    """y[ids] += delta with one rounding (float32/64 add, then cast); other rows untouched."""
    if y.dtype == delta.dtype:
        y.index_add_(0, ids, delta)
    else:
        rows = y.index_select(0, ids).to(delta.dtype).add_(delta)
        y.index_copy_(0, ids, rows.to(y.dtype))


# The CPU kernel (hyperlora._cpu, a batched GEMV that streams each used adapter once) beats torch's ops
# wherever few tokens share an adapter; with many tokens per adapter MKL's GEMMs win. Measured on the
# 2-core CPU machine (one thread, r=16, d=1024, 64 tokens): float32 kernel/torch 0.14/0.28 ms at 8 tokens
# per adapter, 0.24/0.47 at 8 (128 tokens), 0.53/0.51 at 16; float16 (F16C in the AVX2 build) 0.17/0.47
# at 8 per adapter, 0.29/0.90 at 8 (128 tokens).
# The generic build (CPUs without AVX2, other architectures) loses to torch's own vectorized ops in
# float32 and float16 (forced here, T=64 64 adapters d=4096: 2.6 vs 2.3 ms, float16 with integer bit
# conversions 12.3 vs 3.6 ms) and wins in bfloat16 (2.1 vs 3.6 ms), so it is used for bfloat16 only.
_CPU_KERNEL_MAX_TOKENS_PER_SLOT = {torch.float32: 8, torch.bfloat16: 8, torch.float16: 8}
_CPU_KERNEL_GENERIC_MAX_TOKENS_PER_SLOT = {torch.bfloat16: 8}


def _torch_add_lora(ys, x, as_, bs, scales, ranks, token_ids, seg_slots, seg_starts, seg_counts, num_active) -> None:
    segs, n_tok = _host_segments(token_ids, seg_slots, seg_starts, seg_counts, num_active)
    if n_tok == 0:
        return
    if _cpu_kernel.supports(x, ys, as_, bs) and max(c for _, _, c in segs) <= (
            _CPU_KERNEL_MAX_TOKENS_PER_SLOT if _cpu_kernel.isa() == "avx2"
            else _CPU_KERNEL_GENERIC_MAX_TOKENS_PER_SLOT).get(x.dtype, 0):
        _cpu_kernel.add_lora_cpu(ys, x, as_, bs, scales, ranks, token_ids, seg_slots, seg_starts, seg_counts,
                                 len(segs))
        return
    _torch_add_lora_segments(ys, x, as_, bs, scales, ranks, token_ids, segs, n_tok)


# Decode with many small adapters: gathering them for two bmm beats one small GEMM pair per segment
# (the gather copies the adapter bytes once more; per-segment dispatch costs ~10 us). Measured on the
# 2-core CPU machines (one thread, CPU time, min of 40): r=8, d=1024 float32 (64 KB per adapter) 2.3 ms
# vs 3.3 ms for 256 adapters; at 128 KB the fresh gather buffers page-faulted (~2000 faults, 4x slower)
# and at r=8, d=4096 (256 KB) the loop won 1.6 vs 2.3 ms. Half dtypes skip it (the float32 copies of the
# gathered adapters page-faulted: 5.3 ms vs 1.5 ms for the segment loop at r=16, d=1024, bf16).
_BATCHED_MIN_SEGMENTS = 16
_BATCHED_MAX_ADAPTER_BYTES = 96 * 1024


def _torch_decode_batched(ys, x, as_, bs, scales, ranks, ids, seg_slots) -> None:
    """One token per segment: gather the used adapters, mask ranks past each slot's rank, two bmm
    (in the accumulation dtype), one rounding into y."""
    acc = _acc_dtype(x.dtype)
    xs = x.index_select(0, ids).unsqueeze(1).to(acc)                            # [M, 1, d_in]
    sc = None if scales is None else scales.index_select(0, seg_slots).to(acc).view(-1, 1, 1)
    rk = None if ranks is None else ranks.index_select(0, seg_slots).view(-1, 1)
    for a, b, y in zip(as_, bs, ys):
        ag = a.index_select(0, seg_slots).to(acc)                               # [M, R, d_in]
        bg = b.index_select(0, seg_slots).to(acc)                               # [M, d_out, R]
        if rk is not None:
            dead = torch.arange(a.shape[1], device=x.device).view(1, -1) >= rk   # [M, R]
            ag.masked_fill_(dead.unsqueeze(2), 0)
            bg.masked_fill_(dead.unsqueeze(1), 0)
        h = torch.bmm(xs, ag.transpose(1, 2))                                   # [M, 1, R]
        if sc is not None:
            h.mul_(sc)
        _apply_rows(y, ids, torch.bmm(h, bg.transpose(1, 2)).squeeze(1))


# Decode over most of the pool: two bmm straight over the pool's [S, R, d] buffers (strided views, no
# gather), with each slot's few tokens padded to L rows. Reads every slot's adapter once, so it is used
# only when at least half the slots are in the batch. Measured on the 2-core CPU machines (one thread):
# 64 single-token adapters, r=16: 0.3 ms vs 1.2 ms for the segment loop at d=1024, 2.0 vs 2.5 ms at 4096.
# (One token per slot with the slots in a few runs now takes `_torch_decode_runs` below instead.)
_DENSE_MAX_TOKENS_PER_SLOT = 8
_DENSE_MIN_SEGMENTS = 8  # below that the segment loop's fixed cost is lower


def _dense_ok(as_, segs, rank_l, n_tok) -> bool:
    num_slots, m = as_[0].shape[0], len(segs)
    if 2 * m < num_slots or m < _DENSE_MIN_SEGMENTS:
        return False
    max_len = max(c for _, _, c in segs)
    if max_len > _DENSE_MAX_TOKENS_PER_SLOT or num_slots * max_len > 2 * n_tok + num_slots:
        return False  # long or very uneven segments: padding would waste more than it saves
    if rank_l is not None:  # one common rank among the used slots (unused columns are never read)
        r0 = rank_l[segs[0][0]]
        return r0 > 0 and all(rank_l[s] == r0 for s, _, _ in segs)
    return True


def _torch_decode_dense(ys, x, as_, bs, scales, rank_l, token_ids, segs, n_tok) -> None:
    """x rows scattered into a zero [S, L, d_in] block (L = longest segment), two bmm over the whole pool,
    the used rows added back. Only for float32/float64 and one common rank (see `_dense_ok`)."""
    num_slots, dev = as_[0].shape[0], x.device
    length = max(c for _, _, c in segs)
    flat = torch.tensor([sl * length + j for sl, _, c in segs for j in range(c)], dtype=torch.int64, device=dev)
    ids = token_ids[:n_tok].to(torch.int64)
    xb = x.new_zeros(num_slots * length, x.shape[1])
    xb.index_copy_(0, flat, x.index_select(0, ids))
    xb = xb.view(num_slots, length, x.shape[1])
    sc = None if scales is None else scales.to(x.dtype).view(-1, 1, 1)
    for a, b, y in zip(as_, bs, ys):
        r = a.shape[1] if rank_l is None else rank_l[segs[0][0]]
        h = torch.bmm(xb, a[:, :r].transpose(1, 2))                             # [S, L, r]
        if sc is not None:
            h.mul_(sc)
        out = torch.bmm(h, b[:, :, :r].transpose(1, 2))                          # [S, L, d_out]
        y.index_add_(0, ids, out.view(num_slots * length, -1).index_select(0, flat))


# Decode with one token per adapter whose slots form a few runs of consecutive pool slots (the whole
# pool, or blocks of it): per run, two bmm straight over the pool's [n, R, d] slice: no gather, no padding,
# no unused adapter read. Measured on the 2-core CPU machine (one thread, CPU time, T=64, 64 adapters,
# r=16, adapters read from DRAM): float32 d=4096 2.0-2.4 ms (per-adapter loop 4.1-4.5 ms, the padded
# dense path 2.1-2.6 ms). The two bmm are ~75% of it: MKL's one-row GEMMs stream the 33.6 MB of
# adapters at ~19-22 GB/s where summing them runs at ~27-31 GB/s (benchmarks/bench_add_lora.py (test_decode_bound)).
# Half dtypes upcast each run in float32 chunks of <= 1 MB (larger fresh buffers page-fault):
# bfloat16 d=4096 3.4 ms vs 4.3 ms for the segment loop (6.9 ms for the loop), d=1024 1.0 vs 1.8 ms.
_RUNS_MIN_SEGMENTS = 8
_RUNS_MAX_FRACTION = 0.5  # at most one run per two segments, else per-run dispatch (~10 us) dominates
_RUNS_UPCAST_BYTES = 1 << 20


def _slot_runs(segs, rank_l, full_r: int) -> list[tuple[int, int, int, int]]:
    """Segments (one token each, ascending slots) cut into runs of consecutive slots of equal rank:
    (first sorted position, end position, first slot, rank)."""
    runs: list[tuple[int, int, int, int]] = []
    p0, s0 = 0, segs[0][0]
    r0 = full_r if rank_l is None else rank_l[s0]
    for i in range(1, len(segs) + 1):
        if i < len(segs):
            s = segs[i][0]
            r = full_r if rank_l is None else rank_l[s]
            if s == s0 + (i - p0) and r == r0:
                continue
        runs.append((p0, i, s0, r0))
        if i < len(segs):
            p0, s0, r0 = i, s, r
    return runs


def _torch_decode_runs(ys, x, as_, bs, scales, rank_l, token_ids, segs, n_tok) -> bool:
    """One token per segment: shrink and expand with one bmm pair per run of consecutive slots (views
    into lora_a/lora_b; float32 copies of <= 1 MB per bmm pair for half dtypes) into a [m, d_out]
    accumulation-dtype buffer, then one add into y's rows (one rounding). Rows of rank-0 slots and of
    slot -1 are not written. Returns False (nothing done) when the slots are too scattered for it to pay."""
    m = len(segs)
    if m < _RUNS_MIN_SEGMENTS:
        return False
    runs = [_slot_runs(segs, rank_l, a.shape[1]) for a in as_]
    if max(len(rs) for rs in runs) > _RUNS_MAX_FRACTION * m:
        return False
    acc = _acc_dtype(x.dtype)
    half = x.dtype != acc
    ids = token_ids[:n_tok].to(torch.int64)
    xs = x.index_select(0, ids).unsqueeze(1).to(acc)                               # [m, 1, d_in], slot order
    sc = None if scales is None else scales.to(acc).view(-1, 1, 1)                # [S, 1, 1]; a run's is a slice
    for a, b, y, rs in zip(as_, bs, ys, runs):
        out = torch.empty(m, 1, y.shape[1], dtype=acc, device=x.device)
        for p0, p1, s0, r in rs:
            if r == 0:  # no term: those rows are left out of the update below
                continue
            step = p1 - p0
            if half:  # float32 workspaces, reused across the run's chunks
                step = max(1, _RUNS_UPCAST_BYTES // (4 * r * max(a.shape[2], b.shape[1])))
                a_w = torch.empty(min(step, p1 - p0), r, a.shape[2], dtype=acc, device=x.device)
                b_w = torch.empty(min(step, p1 - p0), b.shape[1], r, dtype=acc, device=x.device)
            for q0 in range(p0, p1, step):
                q1 = min(p1, q0 + step)
                a_v = a[s0 + q0 - p0:s0 + q1 - p0, :r]                            # [n, r, d_in] view
                b_v = b[s0 + q0 - p0:s0 + q1 - p0, :, :r]                         # [n, d_out, r] view
                if half:
                    a_v, b_v = a_w[:q1 - q0].copy_(a_v), b_w[:q1 - q0].copy_(b_v)
                h = torch.bmm(xs[q0:q1], a_v.transpose(1, 2))                     # [n, 1, r]
                if sc is not None:
                    h.mul_(sc[s0 + q0 - p0:s0 + q1 - p0])
                torch.bmm(h, b_v.transpose(1, 2), out=out[q0:q1])                 # [n, 1, d_out]
        delta = out.view(m, -1)
        if any(r == 0 for *_, r in rs):
            pos = torch.tensor([p for p0, p1, _, r in rs if r > 0 for p in range(p0, p1)], dtype=torch.int64,
                               device=x.device)
            if pos.numel():
                _apply_rows(y, ids.index_select(0, pos), delta.index_select(0, pos))
        else:
            _apply_rows(y, ids, delta)
    return True


def _torch_add_lora_segments(ys, x, as_, bs, scales, ranks, token_ids, segs, n_tok) -> None:
    """Per segment, shrink then addmm into y's rows (rows contiguous: the usual case for decode, one
    token per segment, and for prefill, one sequence per segment), else gather / index_add_. float32 and
    float64 add in place; float16/bfloat16 compute in float32 and round each updated row once.

    Per-segment views come from one C++ call each (split/unbind) rather than Python indexing: in decode
    (one token per adapter) the dispatcher, not the arithmetic, is most of the cost."""
    rank_l = ranks.tolist() if ranks is not None else None
    m = len(segs)
    one_token = n_tok == m  # every segment is a single token
    if one_token and _torch_decode_runs(ys, x, as_, bs, scales, rank_l, token_ids, segs, n_tok):
        return
    ids_l = token_ids[:n_tok].tolist()
    scale_l = scales.tolist() if scales is not None else None
    if x.dtype == _acc_dtype(x.dtype) and _dense_ok(as_, segs, rank_l, n_tok):
        _torch_decode_dense(ys, x, as_, bs, scales, rank_l, token_ids, segs, n_tok)
        return
    if one_token and m >= _BATCHED_MIN_SEGMENTS and x.dtype == _acc_dtype(x.dtype):
        r_act = max(full_r for full_r in (a.shape[1] for a in as_))
        per_adapter = r_act * (x.shape[1] + max(y.shape[1] for y in ys)) * x.element_size()
        if per_adapter <= _BATCHED_MAX_ADAPTER_BYTES:
            _torch_decode_batched(ys, x, as_, bs, scales, ranks, token_ids[:n_tok].to(torch.int64),
                                  torch.tensor([sg[0] for sg in segs], dtype=torch.int64, device=x.device))
            return
    acc = _acc_dtype(x.dtype)
    half = x.dtype != acc
    if half:
        x = x.to(acc)
    x_rows = x.split(1) if one_token else None
    y_rows = [y.split(1) for y in ys] if one_token else None
    per_slot = as_[0].shape[0] <= 4 * m  # unbind all S slots only when most are used
    a_views = [a.unbind(0) if per_slot else a for a in as_]
    bt_views = [b.transpose(1, 2).unbind(0) if per_slot else b.transpose(1, 2) for b in bs]
    full = [a.shape[1] for a in as_]
    for s, st, n in segs:
        i0 = ids_l[st]
        contiguous = ids_l[st + n - 1] - i0 == n - 1  # ids ascend within a segment (stable sort)
        idx = None
        if one_token:
            xseg = x_rows[i0]
        elif contiguous:
            xseg = x[i0:i0 + n]
        else:
            idx = token_ids[st:st + n].to(torch.int64)
            xseg = x.index_select(0, idx)
        sc = 1.0 if scale_l is None else scale_l[s]
        for j in range(len(as_)):
            r = full[j] if rank_l is None else rank_l[s]
            if r == 0:
                continue
            a_s, bt_s = a_views[j][s], bt_views[j][s]            # [R, d_in], [R, d_out]
            if r != full[j]:
                a_s, bt_s = a_s[:r], bt_s[:r]
            if half:
                a_s, bt_s = a_s.to(acc), bt_s.to(acc)
            h = F.linear(xseg, a_s)                              # [n, r]
            if half:
                if idx is None:
                    yv = y_rows[j][i0] if one_token else ys[j][i0:i0 + n]
                    yv.copy_(torch.addmm(yv.to(acc), h, bt_s, alpha=sc))
                else:
                    rows = ys[j].index_select(0, idx).to(acc).addmm_(h, bt_s, alpha=sc)
                    ys[j].index_copy_(0, idx, rows.to(ys[j].dtype))
            elif one_token:
                y_rows[j][i0].addmm_(h, bt_s, alpha=sc)
            elif contiguous:
                ys[j][i0:i0 + n].addmm_(h, bt_s, alpha=sc)
            else:
                ys[j].index_add_(0, idx, torch.mm(h, bt_s), alpha=sc)


# ----------------------------------------------------------------------------------------------------
# torch.library registration: in-place op (all backends) + differentiable functional delta (torch)
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("hyperlora::add_lora_", mutates_args=("ys",))
def _add_lora_op(ys: list[torch.Tensor], x: torch.Tensor, lora_as: list[torch.Tensor],
                 lora_bs: list[torch.Tensor], scales: Optional[torch.Tensor], ranks: Optional[torch.Tensor],
                 token_ids: torch.Tensor, seg_slots: torch.Tensor, seg_starts: torch.Tensor,
                 seg_counts: torch.Tensor, num_active: torch.Tensor, backend: str,
                 max_seg_len: int, num_segments: int) -> None:
    """In place: ys[i][t] += scale * (x[t] A_i[s,:r]^T) B_i[s,:,:r]^T over the segments of the metadata."""
    _add_lora_impl(ys, x, lora_as, lora_bs, scales, ranks, token_ids, seg_slots, seg_starts, seg_counts,
                   num_active, backend, max_seg_len, num_segments)


def _add_lora_impl(ys, x, lora_as, lora_bs, scales, ranks, token_ids, seg_slots, seg_starts, seg_counts,
                   num_active, backend, max_seg_len, num_segments) -> None:
    meta_t = (token_ids, seg_slots, seg_starts, seg_counts, num_active)
    if backend == "torch":
        _torch_add_lora(ys, x, lora_as, lora_bs, scales, ranks, *meta_t)
    elif backend == "triton":
        from hyperlora.kernels.add_lora import add_lora_triton  # optional: needs triton

        add_lora_triton(ys, x, lora_as, lora_bs, scales, ranks, *meta_t, max_seg_len=max_seg_len,
                        num_segments=num_segments)
    elif backend == "cuda":
        _cuda_add_lora(ys, x, lora_as, lora_bs, scales, ranks, *meta_t, max_seg_len=max_seg_len,
                       num_segments=num_segments)
    else:
        raise ValueError(f"unknown backend {backend!r}")


@_add_lora_op.register_fake
def _(ys, x, lora_as, lora_bs, scales, ranks, token_ids, seg_slots, seg_starts, seg_counts, num_active,
      backend, max_seg_len, num_segments) -> None:
    return None


@torch.library.custom_op("hyperlora::lora_delta", mutates_args=())
def _lora_delta_op(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: Optional[torch.Tensor],
                   ranks: Optional[torch.Tensor], token_ids: torch.Tensor, seg_slots: torch.Tensor,
                   seg_starts: torch.Tensor, seg_counts: torch.Tensor, num_active: torch.Tensor) -> torch.Tensor:
    """[T, d_out] in the accumulation dtype: the LoRA term per token, zero rows for slot -1."""
    acc = _acc_dtype(x.dtype)
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=acc, device=x.device)
    segs, n_tok = _host_segments(token_ids, seg_slots, seg_starts, seg_counts, num_active)
    if n_tok:
        ids = token_ids[:n_tok].to(torch.int64)
        (d,) = _segment_deltas(x, (lora_a,), (lora_b,), scales, ranks, ids, segs, n_tok)
        out.index_copy_(0, ids, d)
    return out


@_lora_delta_op.register_fake
def _(x, lora_a, lora_b, scales, ranks, token_ids, seg_slots, seg_starts, seg_counts, num_active):
    return x.new_empty((x.shape[0], lora_b.shape[1]), dtype=_acc_dtype(x.dtype))


@torch.library.custom_op("hyperlora::lora_delta_backward", mutates_args=())
def _lora_delta_backward_op(grad: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                            scales: Optional[torch.Tensor], ranks: Optional[torch.Tensor],
                            token_ids: torch.Tensor, seg_slots: torch.Tensor, seg_starts: torch.Tensor,
                            seg_counts: torch.Tensor, num_active: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of lora_delta w.r.t. (x, lora_a, lora_b), each in its input's dtype."""
    acc = _acc_dtype(x.dtype)
    gx = torch.zeros(x.shape, dtype=acc, device=x.device)
    ga = torch.zeros(lora_a.shape, dtype=acc, device=x.device)
    gb = torch.zeros(lora_b.shape, dtype=acc, device=x.device)
    segs, n_tok = _host_segments(token_ids, seg_slots, seg_starts, seg_counts, num_active)
    if n_tok:
        ids = token_ids[:n_tok].to(torch.int64)
        xs, gs = x.index_select(0, ids).to(acc), grad.index_select(0, ids).to(acc)
        gxs = torch.zeros_like(xs)
        scale_l = scales.tolist() if scales is not None else None
        rank_l = ranks.tolist() if ranks is not None else None
        for s, st, n in segs:
            r = lora_a.shape[1] if rank_l is None else rank_l[s]
            if r == 0:
                continue
            sc = 1.0 if scale_l is None else scale_l[s]
            a_s, b_s = lora_a[s, :r].to(acc), lora_b[s, :, :r].to(acc)
            xseg, gseg = xs[st:st + n], gs[st:st + n]
            gh = torch.mm(gseg, b_s) * sc            # [n, r]: d loss / d (x A^T)
            h = torch.mm(xseg, a_s.t()) * sc          # [n, r]
            gxs[st:st + n] = torch.mm(gh, a_s)
            ga[s, :r] = torch.mm(gh.t(), xseg)
            gb[s, :, :r] = torch.mm(gseg.t(), h)
        gx.index_copy_(0, ids, gxs)
    return gx.to(x.dtype), ga.to(lora_a.dtype), gb.to(lora_b.dtype)


@_lora_delta_backward_op.register_fake
def _(grad, x, lora_a, lora_b, scales, ranks, token_ids, seg_slots, seg_starts, seg_counts, num_active):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b)


def _delta_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _delta_backward(ctx, grad):
    x, a, b, scales, ranks, *meta_t = ctx.saved_tensors
    gx, ga, gb = _lora_delta_backward_op(grad, x, a, b, scales, ranks, *meta_t)
    needs = ctx.needs_input_grad
    return (gx if needs[0] else None, ga if needs[1] else None, gb if needs[2] else None,
            None, None, None, None, None, None, None)


_lora_delta_op.register_autograd(_delta_backward, setup_context=_delta_setup_context)


# ----------------------------------------------------------------------------------------------------
# CUDA extension glue
# ----------------------------------------------------------------------------------------------------
def _cuda_add_lora(ys, x, as_, bs, scales, ranks, token_ids, seg_slots, seg_starts, seg_counts, num_active,
                   *, max_seg_len: int, num_segments: int) -> None:
    """One extension call per slice (shrink + expand on the current stream); x is re-read per slice."""
    from hyperlora.ops import _cuda  # optional: the compiled CUDA extension

    ext = _cuda.extension()
    if not hasattr(ext, "add_lora"):
        raise BackendUnavailableError("the built hyperlora._C has no add_lora; rebuild with "
                                      "`pip install --no-build-isolation -e .`")
    r_max = max(a.shape[1] for a in as_)
    if r_max > 256:
        raise ValueError(f"lora_a rank R={r_max} exceeds the CUDA backend's maximum 256; use backend='torch'")
    code = _cuda.dtype_code(x)
    stream = _cuda.stream_handle(x.device)
    t, num_slots = x.shape[0], as_[0].shape[0]
    sc = None if scales is None else scales.to(torch.float32).contiguous()
    rk = None if ranks is None else ranks.to(torch.int32).contiguous()
    for y, a, b in zip(ys, as_, bs):
        r = a.shape[1]
        if t == 0 or r == 0 or y.shape[1] == 0:
            continue
        h = torch.zeros((t, r), dtype=torch.float32, device=x.device)  # the shrink adds into it atomically
        ext.add_lora(
            y.data_ptr(), y.stride(0), y.stride(1), x.data_ptr(), x.stride(0), x.stride(1),
            a.data_ptr(), *a.stride(), b.data_ptr(), *b.stride(), h.data_ptr(), h.stride(0),
            0 if sc is None else sc.data_ptr(), 0 if rk is None else rk.data_ptr(),
            token_ids.data_ptr(), seg_slots.data_ptr(), seg_starts.data_ptr(), seg_counts.data_ptr(),
            num_active.data_ptr(), t, num_slots, r, x.shape[1], y.shape[1], int(max_seg_len), int(num_segments),
            code, stream)


# ----------------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------------
@torch.compiler.assume_constant_result
def _resolve(backend: Optional[str], device_type: str) -> str:
    """_pick_backend as a constant for torch.compile (it reads the environment and the extension)."""
    return _pick_backend(backend, torch.device(device_type))


def _needs_grad(x: torch.Tensor, as_, bs) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in (*as_, *bs)))


def add_lora(y: TensorOrTuple, x: torch.Tensor, lora_a: TensorOrTuple, lora_b: TensorOrTuple,
             slots: torch.Tensor, scales: Optional[torch.Tensor] = None, ranks: Optional[torch.Tensor] = None,
             *, backend: Optional[str] = None, meta: Optional[LoraBatchMeta] = None) -> TensorOrTuple:
    """Add each token's LoRA term to y in place and return y (a tuple in the sliced form).

    x [T, d_in]; y [T, d_out]; lora_a [S, R, d_in]; lora_b [S, d_out, R]; slots [T] int (-1 = none);
    scales [S] float (None = 1); ranks [S] int (None = R). Sliced form: y, lora_a, lora_b are tuples.
    backend: "torch", "triton", "cuda" or None (CUDA tensors: triton > cuda > torch; CPU: torch;
    HYPERLORA_BACKEND forces one).
    meta: metadata from `build_meta(slots, S)`, built once per forward and reused by every layer.
    Autograd (w.r.t. x, lora_a, lora_b) runs through the torch backend.
    """
    ys, as_, bs = validate(y, x, lora_a, lora_b, slots, scales, ranks, meta)
    num_slots = as_[0].shape[0]
    name = _resolve(backend, x.device.type) if torch.compiler.is_compiling() else _pick_backend(backend, x.device)
    grad = _needs_grad(x, as_, bs)
    if grad and name != "torch" and backend is None:
        name = "torch"  # automatic choice: only the torch backend is differentiable
    if name != "torch":
        if grad:
            raise ValueError(f"backend {name!r} has no autograd; use backend='torch' (or None) when x, lora_a or "
                             "lora_b requires grad, or wrap the call in torch.no_grad()")
        if x.dtype == torch.float64:
            raise ValueError(f"x is float64, which backend {name!r} does not support; use float32/16/bfloat16 "
                             "or backend='torch'")
    if meta is None:
        meta = build_meta(slots, num_slots, validate=False)
    if grad:
        mask = (slots >= 0).unsqueeze(1)
        for yi, ai, bi in zip(ys, as_, bs):
            delta = _lora_delta_op(x, ai, bi, scales, ranks, *meta.tensors())
            new = torch.where(mask, (yi.to(delta.dtype) + delta).to(yi.dtype), yi)
            yi.copy_(new)
        return y
    max_seg = meta.max_segment_len if meta.max_segment_len is not None else -1
    n_seg = meta.num_segments if meta.num_segments is not None else -1
    if torch.compiler.is_compiling():  # traced: the registered op (opaque to the compiler, fake impl)
        _add_lora_op(list(ys), x, list(as_), list(bs), scales, ranks, *meta.tensors(), name, max_seg, n_seg)
    else:  # eager: same implementation without the custom-op dispatcher (~0.1 ms per call on a CPU)
        with no_autocast(x.device.type):
            _add_lora_impl(ys, x, as_, bs, scales, ranks, *meta.tensors(), name, max_seg, n_seg)
    return y
