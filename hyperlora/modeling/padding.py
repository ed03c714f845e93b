"""Padding token-id lists into batch tensors: the one copy of left and right padding.

    ids, mask = pad_ids(seqs, pad_id)                  right padding: row i is seqs[i] then pads
    ids, mask = pad_ids(seqs, pad_id, side="left")     left padding: every row ends at T-1 (for decoding)
    ids, last = pad_right(seqs, pad_id)                right padding + the index of each row's final token
    ids, mask = left_pad(seqs, pad_id, device)         left padding, on `device`

ids and mask are int64 [N, T_max] with T_max the longest sequence; mask is 1 on real tokens, 0 on pads.
With right padding and causal attention, real positions never see the pads, so a model can run without a
mask and read each row at its own positions; generation wants left padding, so every row's next token is
predicted at the last position.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["pad_ids", "pad_right", "left_pad"]

SIDES = ("right", "left")


def pad_ids(seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "right",
            device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids, attention mask), both int64 [N, T_max], padded with `pad_id` on `side`.

    Empty sequences give rows of pads (mask all 0). Raises ValueError for no sequences or an unknown side.
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if len(seqs) == 0:
        raise ValueError("pad_ids needs at least one sequence (got none)")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
            ids[i, cols] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, cols] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids [N, T_max] right padded, last [N] index of each sequence's final token)."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("pad_right needs at least one non-empty sequence, and no empty ones")
    ids, _ = pad_ids(seqs, pad_id)
    last = torch.as_tensor([len(s) - 1 for s in seqs], dtype=torch.long)
    return ids, last


def left_pad(seqs: Sequence[Sequence[int]], pad: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [N, T] on `device` with every sequence right-aligned after `pad` tokens."""
    return pad_ids(seqs, pad, side="left", device=device)
