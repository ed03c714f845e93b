"""Per-batch token -> adapter-slot metadata, built once per forward and shared by every LoRA layer.

Tokens are stably sorted by slot (tokens with slot -1 go last), and the slots present in the batch become
*segments*: runs of sorted tokens that share one adapter. Kernels walk segments instead of tokens, so an
adapter's weights are read once per segment, not once per token.

Every tensor has a size fixed by (num_tokens, num_slots) alone, and `build_meta(..., out=meta)` refills an
existing `LoraBatchMeta` in place with no host synchronisation, so the same buffers can be captured in a
CUDA graph. Without `out=` the host-side summary (`num_segments`, `max_segment_len`, per-segment lists)
is read back once, which the torch backend and launch-size heuristics use.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hyperlora.ops._common import capturing as _capturing

_INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass
class LoraBatchMeta:
    """Sorted-segment view of one batch's `slots` [T] over `num_slots` adapter slots.

    Device tensors (all int32, sizes fixed by T and S, so they can live in CUDA-graph buffers):
      token_ids   [T]  token indices ordered by slot (stable); the `num_active_tokens` with a slot come first.
      seg_slots   [S]  slot of segment i for i < num_active; unused entries are the remaining slots.
      seg_starts  [S]  offset of segment i in `token_ids` (exclusive cumsum of seg_counts).
      seg_counts  [S]  tokens in segment i (0 for i >= num_active).
      num_active  [2]  (number of segments, number of tokens with a slot) on the device.
    Host summary (None when built with `out=`, i.e. without a host sync):
      num_segments, num_active_tokens, max_segment_len: ints;
      host_segments: list of (slot, start, count) for the active segments.
    """

    num_tokens: int
    num_slots: int
    token_ids: torch.Tensor
    seg_slots: torch.Tensor
    seg_starts: torch.Tensor
    seg_counts: torch.Tensor
    num_active: torch.Tensor
    num_segments: int | None = None
    num_active_tokens: int | None = None
    max_segment_len: int | None = None
    host_segments: list[tuple[int, int, int]] | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.token_ids.device

    @property
    def has_host_summary(self) -> bool:
        return self.host_segments is not None

    @classmethod
    def empty(cls, num_tokens: int, num_slots: int, device: torch.device | str = "cpu") -> "LoraBatchMeta":
        """Preallocated buffers to refill with `build_meta(slots, num_slots, out=meta)` (CUDA-graph safe)."""
        if num_tokens < 0 or num_slots < 1:
            raise ValueError(f"num_tokens must be >= 0 and num_slots >= 1, got {num_tokens}, {num_slots}")
        kw = dict(dtype=torch.int32, device=device)
        return cls(num_tokens, num_slots, torch.zeros(num_tokens, **kw), torch.zeros(num_slots, **kw),
                   torch.zeros(num_slots, **kw), torch.zeros(num_slots, **kw), torch.zeros(2, **kw))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token_ids, seg_slots, seg_starts, seg_counts, num_active), the order ops pass them in."""
        return self.token_ids, self.seg_slots, self.seg_starts, self.seg_counts, self.num_active

    def with_host_summary(self) -> "LoraBatchMeta":
        """This metadata with the host summary filled in (one device -> host copy)."""
        if self.has_host_summary:
            return self
        return _attach_host_summary(self)


def check_slots(slots: torch.Tensor, num_slots: int, name: str = "slots") -> None:
    """ValueError unless `slots` is a 1-D int32/int64 tensor with values in [-1, num_slots)."""
    if not isinstance(slots, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32/int64 slot indices, got {type(slots).__name__}")
    if slots.dim() != 1:
        raise ValueError(f"{name} must be 1-D [T], got shape {tuple(slots.shape)}")
    if slots.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {slots.dtype}; convert with {name}.to(torch.int32)")
    if slots.numel() and not _capturing():  # no host sync while compiling or capturing a CUDA graph
        lo, hi = torch.aminmax(slots)
        lo, hi = int(lo), int(hi)
        if lo < -1 or hi >= num_slots:
            raise ValueError(f"{name} values must be in [-1, {num_slots - 1}] (-1 = no adapter, S = {num_slots} "
                             f"slots), got min {lo} and max {hi}")


def _fill(slots: torch.Tensor, num_slots: int, meta: LoraBatchMeta) -> None:
    """Compute the segments of `slots` into `meta`'s tensors with fixed-size ops only (no host sync)."""
    dev = slots.device
    key = torch.where(slots < 0, torch.full_like(slots, num_slots), slots).to(torch.int64)
    if key.numel():
        order = torch.sort(key, stable=True).indices
    else:
        order = torch.zeros(0, dtype=torch.int64, device=dev)
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_slots]
    present = counts > 0
    # Present slots first, each group in ascending slot order: the same order as the sorted tokens.
    seg_order = torch.sort((~present).to(torch.int8), stable=True).indices
    seg_counts = counts.index_select(0, seg_order)
    seg_starts = torch.cumsum(seg_counts, 0) - seg_counts
    meta.token_ids.copy_(order)
    meta.seg_slots.copy_(seg_order)
    meta.seg_counts.copy_(seg_counts)
    meta.seg_starts.copy_(seg_starts)
    meta.num_active[0].copy_(present.sum())
    meta.num_active[1].copy_(seg_counts.sum())


def _attach_host_summary(meta: LoraBatchMeta) -> LoraBatchMeta:
    n_seg, n_tok = (int(v) for v in meta.num_active.tolist())
    slots_l = meta.seg_slots[:n_seg].tolist()
    starts_l = meta.seg_starts[:n_seg].tolist()
    counts_l = meta.seg_counts[:n_seg].tolist()
    meta.num_segments = n_seg
    meta.num_active_tokens = n_tok
    meta.max_segment_len = max(counts_l, default=0)
    meta.host_segments = list(zip(slots_l, starts_l, counts_l))
    return meta


def build_meta(slots: torch.Tensor, num_slots: int, *, out: LoraBatchMeta | None = None,
               validate: bool = True) -> LoraBatchMeta:
    """Segments of `slots` [T] (int32/int64, -1 = no adapter) over `num_slots` adapter slots.

    Without `out`: fresh tensors on `slots.device` plus the host summary (one small device->host copy).
    With `out` (from `LoraBatchMeta.empty(T, num_slots, device)`): refilled in place, no host sync, so it
    can run inside CUDA-graph capture; its host summary is cleared. `validate` checks slot values
    (skipped automatically while a CUDA graph is being captured or under torch.compile).
    """
    if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 1:
        raise ValueError(f"num_slots must be a positive int (S, the adapter slots), got {num_slots!r}")
    if validate:
        check_slots(slots, num_slots)
    elif slots.dim() != 1 or slots.dtype not in _INDEX_DTYPES:
        raise ValueError(f"slots must be 1-D int32/int64, got {tuple(slots.shape)} {slots.dtype}")
    t = slots.shape[0]
    if out is None:
        meta = LoraBatchMeta.empty(t, num_slots, slots.device)
        _fill(slots, num_slots, meta)
        if torch.compiler.is_compiling():  # no host sync inside a traced graph
            return meta
        return _attach_host_summary(meta)
    if out.num_tokens != t or out.num_slots != num_slots:
        raise ValueError(f"out was allocated for (T={out.num_tokens}, S={out.num_slots}) but slots has T={t} "
                         f"and num_slots={num_slots}; allocate with LoraBatchMeta.empty({t}, {num_slots}, device)")
    if out.device != slots.device:
        raise ValueError(f"out lives on {out.device} but slots on {slots.device}")
    _fill(slots, num_slots, out)
    out.num_segments = out.num_active_tokens = out.max_segment_len = None
    out.host_segments = None
    return out
