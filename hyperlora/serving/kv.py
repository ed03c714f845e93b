"""The running batch's KV cache: rows join (a new request's prefill) and leave (a finished one) between steps.

One transformers ``DynamicCache`` holds every running row, left padded to a common length, with a 2-D
attention mask [B, T] (0 = padding) and each row's last position id. Positions come from each row's own
mask, so the padding a row carries never shifts its positions, and masked columns get exactly zero
attention weight: a row's tokens do not depend on who it is batched with (the runtime's decode loop,
`hyperlora.modeling.decoding.decode`, relies on the same property).

* `merge(a, b)`: left-pad the shorter batch's keys / values / mask with zeros and stack the rows (a join).
* `select(rows)`: keep some rows, then drop the leading columns that are padding in every kept row (a leave).

Both copy the cache once per membership change, never per decode step. Only plain (non-sliding)
``DynamicLayer`` caches are supported; anything else is refused with a TypeError naming the layer type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["BatchKV", "check_cache"]


def _layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"the model returned a {type(cache).__name__} cache without .layers: the server needs a "
                        f"transformers >= 5 DynamicCache")
    return layers


def check_cache(cache) -> None:
    """TypeError unless `cache` is a DynamicCache of plain DynamicLayers (the kind rows can be re-batched in)."""
    from transformers.cache_utils import DynamicLayer  # the one cache layer type this module knows how to edit

    for layer in _layers(cache):
        if type(layer) is not DynamicLayer:
            raise TypeError(f"cache layer {type(layer).__name__} is not supported by the server's batching (a plain "
                            f"DynamicLayer is needed: sliding-window and static caches are not re-batchable here)")


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, n + T, D] with n zero columns in front."""
    if n == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)


@dataclass
class BatchKV:
    """cache: a DynamicCache over B rows; mask [B, T] long; last_pos [B, 1] long (position id of each row's
    last token)."""

    cache: object
    mask: torch.Tensor
    last_pos: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def append_column(self) -> None:
        """Before a decode step: every row gets one more valid column and the next position."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.last_pos = self.last_pos + 1

    def select(self, rows: Sequence[int]) -> "BatchKV | None":
        """Keep `rows` (in that order); None if there are none left. Leading all-padding columns are dropped."""
        if not rows:
            return None
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        valid = (mask != 0).any(dim=0)
        first = int(valid.to(torch.int8).argmax()) if bool(valid.any()) else 0
        for layer in _layers(self.cache):
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
            layer.values = layer.values.index_select(0, idx)[:, :, first:]
        return BatchKV(self.cache, mask[:, first:].contiguous(), self.last_pos.index_select(0, idx))

    @staticmethod
    def merge(a: "BatchKV | None", b: "BatchKV") -> "BatchKV":
        """Rows of `a` then rows of `b`, left padded to a common length (a's cache object is reused)."""
        if a is None:
            return b
        T = max(a.length, b.length)
        la, lb = _layers(a.cache), _layers(b.cache)
        if len(la) != len(lb):
            raise ValueError(f"caches with {len(la)} and {len(lb)} layers cannot be merged")
        for x, y in zip(la, lb):
            x.keys = torch.cat([_pad_left(x.keys, T - a.length), _pad_left(y.keys, T - b.length)], dim=0)
            x.values = torch.cat([_pad_left(x.values, T - a.length), _pad_left(y.values, T - b.length)], dim=0)
        mask = torch.cat([torch.cat([a.mask.new_zeros(a.rows, T - a.length), a.mask], 1),
                          torch.cat([b.mask.new_zeros(b.rows, T - b.length), b.mask], 1)], 0)
        return BatchKV(a.cache, mask, torch.cat([a.last_pos, b.last_pos], 0))
