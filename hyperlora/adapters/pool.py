"""AdapterPool: fixed device slots holding LoRA adapters for every target module, keyed by content.

Layout: one pair of buffers per module type, stacked over that type's layers, so one `generate_lora`
launch writes every layer of a type:

    a[type]: [L, S, R_max, d_in]      b[type]: [L, S, d_out, R_max]      (S = max_adapters)

`pool.lora_a(name)` / `pool.lora_b(name)` are the per-layer views [S, R_max, d_in] / [S, d_out, R_max]
that `hyperlora.ops.add_lora` reads. Ranks beyond a slot's rank are zero, and so is every module an
adapter does not cover (a slot never applies a previous tenant's weights). The LoRA scale is folded
into B when written; `pool.scales` is informational (the latent path passes it to `latent_lora`).

Entries are keyed by a content hash (`AdapterPool.content_key`): never by a user-given name. Slots are
evicted least-recently-used, except pinned slots, slots in flight (`with pool.in_flight(slots):`, ref
counted) and slots being written. When nothing can be evicted, `PoolFullError`. Every public method is
thread-safe (one lock for the bookkeeping; tensor writes run outside it on slots reserved for the writer).

A slot's lifecycle is owned by the pool, in one call: `pool.put(key, rank, scale, modules)` validates an
adapter, then reserves, writes and commits a slot; `with pool.reserve(key, rank, scale) as slot:` (or
`reserve_many`) reserves slots for a writer that fills the buffers itself (the fused `generate_lora` path,
`hyperlora.runtime.writing`). On success the slots become ready; on ANY exception in the body (KeyboardInterrupt
included) they are freed and their keys forgotten, so no slot is ever left "writing". A reservation may evict
ready LRU slots to make room: an adapter evicted that way is gone from the device even if the write then
fails (a PEFT adapter is re-written from its host copy on its next use, a generated one regenerated);
`put` validates before it reserves, so an invalid adapter evicts nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
from collections import OrderedDict
from typing import Iterator, Sequence

import torch

from hyperlora.modeling.targets import group_by_type

__all__ = ["AdapterPool", "PoolFullError", "StaleSlotError"]

_FREE, _WRITING, _READY = 0, 1, 2


class PoolFullError(RuntimeError):
    """Every slot is pinned, in flight or being written: nothing may be evicted."""


class StaleSlotError(ValueError):
    """A slot passed to `in_flight` with its key no longer holds that key (it was evicted after `get`)."""


def _as_slot_list(slots: Sequence[int] | torch.Tensor | int) -> list[int]:
    if isinstance(slots, torch.Tensor):
        return [int(s) for s in slots.reshape(-1).tolist()]
    if isinstance(slots, int):
        return [slots]
    return [int(s) for s in slots]


class AdapterPool:
    """Device-resident LoRA slots for every target module (see the module docstring).

    targets: full module name -> (d_in, d_out); names are grouped by type (last name component) and
    ordered by layer. dtype: the buffers' float dtype (what the LoRA kernels read).
    """

    def __init__(self, targets: dict[str, tuple[int, int]], max_adapters: int = 64, max_rank: int = 64,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if not isinstance(targets, dict) or not targets:
            raise ValueError("targets must be a non-empty dict {module name: (d_in, d_out)}, e.g. hypernet.targets()")
        for name, shape in targets.items():
            if not isinstance(name, str) or len(tuple(shape)) != 2 or any(int(d) <= 0 for d in shape):
                raise ValueError(f"targets[{name!r}] must be (d_in, d_out) with positive ints, got {shape!r}")
        if not isinstance(max_adapters, int) or max_adapters <= 0:
            raise ValueError(f"max_adapters must be a positive int, got {max_adapters!r}")
        if not isinstance(max_rank, int) or max_rank <= 0:
            raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a torch float dtype, got {dtype!r}")
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = torch.device(device)
        self._targets = {n: (int(s[0]), int(s[1])) for n, s in targets.items()}
        self._groups = group_by_type(self._targets)
        self._where: dict[str, tuple[str, int]] = {}
        self._a: dict[str, torch.Tensor] = {}
        self._b: dict[str, torch.Tensor] = {}
        S, R = max_adapters, max_rank
        for mtype, names in self._groups.items():
            d_in, d_out = self._targets[names[0]]
            L = len(names)
            self._a[mtype] = torch.zeros(L, S, R, d_in, dtype=dtype, device=self.device)
            self._b[mtype] = torch.zeros(L, S, d_out, R, dtype=dtype, device=self.device)
            for li, n in enumerate(names):
                self._where[n] = (mtype, li)
        self.ranks = torch.zeros(S, dtype=torch.int32, device=self.device)
        self.scales = torch.zeros(S, dtype=torch.float32, device=self.device)
        self._lock = threading.RLock()
        self._lru: "OrderedDict[str, int]" = OrderedDict()  # key -> slot, least recent first
        self._slot_key: list[str | None] = [None] * S
        self._state = [_FREE] * S
        self._rank = [0] * S
        self._scale = [0.0] * S
        self._refs = [0] * S
        self._pinned: set[int] = set()
        self._reserved: set[int] = set()  # slots held by an open reserve()/reserve_many()
        self._stats = {"hits": 0, "misses": 0, "evictions": 0, "generations": 0, "generation_seconds": 0.0,
                       "writes": 0}

    # ---- keys --------------------------------------------------------------------------------

    @staticmethod
    def content_key(hypernet_id: str, policy: str, rank: int, scale: float) -> str:
        """sha256 of (hypernetwork weights id, policy text, rank, scale): changes whenever any of them does."""
        if not isinstance(policy, str):
            raise TypeError(f"policy must be a str, got {type(policy).__name__}")
        payload = json.dumps({"hypernet": str(hypernet_id), "policy": policy, "rank": int(rank),
                              "scale": float(scale).hex()}, sort_keys=True, ensure_ascii=False)
        try:
            data = payload.encode("utf-8")
        except UnicodeEncodeError:
            bad = next((i for i, c in enumerate(policy) if 0xD800 <= ord(c) <= 0xDFFF), None)
            where = f"the policy text at character {bad}" if bad is not None else "the hypernetwork id"
            raise ValueError(f"{where} holds a lone surrogate (not valid Unicode text; JSON \\u escapes can produce "
                             f"these): fix or drop that character") from None
        return hashlib.sha256(data).hexdigest()

    # ---- layout ------------------------------------------------------------------------------

    def module_types(self) -> list[str]:
        """Module types (short names) with a buffer in this pool."""
        return list(self._groups)

    def module_names(self, module_type: str) -> list[str]:
        """Full module names of one type, in buffer (layer) order."""
        self._check_type(module_type)
        return list(self._groups[module_type])

    def targets(self) -> dict[str, tuple[int, int]]:
        return dict(self._targets)

    def shape(self, module_type: str) -> tuple[int, int]:
        """(d_in, d_out) of one module type."""
        self._check_type(module_type)
        return self._targets[self._groups[module_type][0]]

    def buffers(self, module_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(a [L, S, R_max, d_in], b [L, S, d_out, R_max]) of one module type."""
        self._check_type(module_type)
        return self._a[module_type], self._b[module_type]

    def lora_a(self, name: str) -> torch.Tensor:
        """[S, R_max, d_in] view of one module's A buffer."""
        mtype, li = self._locate(name)
        return self._a[mtype][li]

    def lora_b(self, name: str) -> torch.Tensor:
        """[S, d_out, R_max] view of one module's B buffer (scale folded in)."""
        mtype, li = self._locate(name)
        return self._b[mtype][li]

    def _check_type(self, module_type: str) -> None:
        if module_type not in self._groups:
            raise KeyError(f"module type {module_type!r} has no buffer in this pool; types: {list(self._groups)}")

    def _locate(self, name: str) -> tuple[str, int]:
        try:
            return self._where[name]
        except KeyError:
            raise KeyError(f"module {name!r} is not a target of this pool ({len(self._where)} targets, e.g. "
                           f"{next(iter(self._where))!r})") from None

    # ---- lookup and allocation ---------------------------------------------------------------

    def get(self, key: str) -> int | None:
        """The slot holding `key` (a hit, refreshing its LRU position) or None (a miss)."""
        with self._lock:
            slot = self._lru.get(key)
            if slot is not None and self._state[slot] == _READY:
                self._lru.move_to_end(key)
                self._stats["hits"] += 1
                return slot
            self._stats["misses"] += 1
            return None

    def __contains__(self, key: str) -> bool:
        with self._lock:
            slot = self._lru.get(key)
            return slot is not None and self._state[slot] == _READY

    def slot_of(self, key: str) -> int | None:
        """The slot of `key` (ready or being written) without counting a hit or touching the LRU order."""
        with self._lock:
            return self._lru.get(key)

    def key_of(self, slot: int) -> str | None:
        with self._lock:
            self._check_slot(slot)
            return self._slot_key[slot]

    def allocate(self, key: str, rank: int, scale: float) -> int:
        """Low-level: reserve a slot for `key` with `rank` (1..max_rank) and `scale`; the caller must then write
        it with `write` or inside `writing` (until then the slot is "writing" and never evicted). Prefer `put`
        or `reserve`, which commit or free the slot in the same call. A key already present returns its slot.

        Takes a free slot, else evicts the least recently used slot that is not pinned, in flight or being
        written; raises PoolFullError when there is none.
        """
        if not isinstance(key, str) or not key:
            raise TypeError(f"key must be a non-empty str (AdapterPool.content_key(...)), got {key!r}")
        rank = self._check_rank(rank)
        scale = self._check_scale(scale)
        with self._lock:
            slot = self._lru.get(key)
            if slot is not None:
                self._lru.move_to_end(key)
                if (self._rank[slot], self._scale[slot]) != (rank, scale):
                    raise ValueError(f"key {key[:12]}... is already allocated with rank {self._rank[slot]} and scale "
                                     f"{self._scale[slot]}, not {rank} and {scale}: keys must include rank and scale")
                return slot
            return self._claim(key, rank, scale)

    def _claim(self, key: str, rank: int, scale: float) -> int:
        """A free slot (else the LRU evictable one) marked "writing" under `key`; the caller holds the lock."""
        slot = self._free_slot()
        if slot is None:
            slot = self._evict_one()
        self._slot_key[slot] = key
        self._state[slot] = _WRITING
        self._lru[key] = slot
        self._set_meta(slot, rank, scale)
        return slot

    @contextlib.contextmanager
    def reserve_many(self, entries: Sequence[tuple[str, int, float]]) -> Iterator[list[int]]:
        """Acquire one slot per (key, rank, scale), all or none, for a writer that fills them in the body.

        Keys must be distinct and not in the pool (ValueError otherwise: look them up with `get` first).
        Takes free slots, else evicts least-recently-used ready slots that are not pinned or in flight;
        PoolFullError when there are not enough (checked first: nothing is evicted or held then). Inside the body the slots are "writing"
        (invisible to `get`, never evicted); write them with `write` or into `buffers(...)` directly. On
        success they are committed (ready); if the body raises anything, every slot is freed and its key
        forgotten. Adapters evicted to make room stay evicted either way.
        """
        checked: list[tuple[str, int, float]] = []
        for key, rank, scale in entries:
            if not isinstance(key, str) or not key:
                raise TypeError(f"key must be a non-empty str (AdapterPool.content_key(...)), got {key!r}")
            checked.append((key, self._check_rank(rank), self._check_scale(scale)))
        keys = [k for k, _, _ in checked]
        if len(set(keys)) != len(keys):
            raise ValueError("reserve_many: keys must be distinct")
        slots: list[int] = []
        with self._lock:
            for key in keys:
                if key in self._lru:
                    what = "ready" if self._state[self._lru[key]] == _READY else "being written"
                    raise ValueError(f"key {key[:12]}... is already in the pool ({what}): look it up with get() "
                                     f"instead of reserving it again")
            room = sum(1 for x in range(self.max_adapters) if self._state[x] == _FREE or self._evictable(x))
            if room < len(checked):  # all or none: nothing is evicted for a reservation that cannot succeed
                raise self._full_error(len(checked))
            try:
                for key, rank, scale in checked:
                    slot = self._claim(key, rank, scale)
                    self._reserved.add(slot)
                    slots.append(slot)
            except BaseException:
                for slot in slots:
                    self._reserved.discard(slot)
                    self._release(slot)
                raise
        ok = False
        try:
            yield list(slots)
            ok = True
        finally:
            with self._lock:
                for slot, key in zip(slots, keys):
                    self._reserved.discard(slot)
                    if self._slot_key[slot] != key:  # cannot happen: reserved slots are never evicted
                        continue
                    if ok:
                        self._state[slot] = _READY
                    else:
                        self._release(slot)

    @contextlib.contextmanager
    def reserve(self, key: str, rank: int, scale: float) -> Iterator[int]:
        """`with pool.reserve(key, rank, scale) as slot:` one slot; see `reserve_many` (commit on success, freed
        with its key on any exception)."""
        with self.reserve_many([(key, rank, scale)]) as slots:
            yield slots[0]

    def put(self, key: str, rank: int, scale: float, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Validate one adapter ({module name: (A [r, d_in], B [d_out, r])}, scale NOT applied), then reserve,
        write and commit a slot for it in one call; returns the slot. An invalid adapter raises before
        anything is reserved or evicted. A key already ready returns its slot (refreshing its LRU position)."""
        rank = self._check_rank(rank)
        scale = self._check_scale(scale)
        with self._lock:
            slot = self._lru.get(key) if isinstance(key, str) else None
            if slot is not None and self._state[slot] == _READY:
                if (self._rank[slot], self._scale[slot]) != (rank, scale):
                    raise ValueError(f"key {key[:12]}... is already in the pool with rank {self._rank[slot]} and "
                                     f"scale {self._scale[slot]}, not {rank} and {scale}: keys must include them")
                self._lru.move_to_end(key)
                return slot
        checked = self._check_modules(modules, rank, scale, where="put")
        with self.reserve(key, rank, scale) as slot:
            self._write_checked(slot, checked)
        return slot

    def _free_slot(self) -> int | None:
        for s in range(self.max_adapters):
            if self._state[s] == _FREE:
                return s
        return None

    def _evictable(self, slot: int) -> bool:
        return self._state[slot] == _READY and slot not in self._pinned and self._refs[slot] == 0

    def _evict_one(self) -> int:
        for key, slot in self._lru.items():
            if self._evictable(slot):
                self._release(slot)
                self._stats["evictions"] += 1
                return slot
        raise self._full_error()

    def _full_error(self, wanted: int = 1) -> PoolFullError:
        n_pin = len(self._pinned)
        n_fly = sum(1 for r in self._refs if r > 0)
        n_wr = sum(1 for s in self._state if s == _WRITING)
        need = f"{wanted} slots are needed but " if wanted > 1 else ""
        return PoolFullError(
            f"adapter pool is full: {need}all {self.max_adapters} slots are pinned ({n_pin}), used by in-flight "
            f"batches ({n_fly}) or being written ({n_wr}), so none can be evicted; unpin adapters, let batches "
            f"finish, or build the pool with a larger max_adapters")

    def _release(self, slot: int) -> None:
        key = self._slot_key[slot]
        if key is not None:
            self._lru.pop(key, None)
        self._slot_key[slot] = None
        self._state[slot] = _FREE
        self._pinned.discard(slot)
        self._set_meta(slot, 0, 0.0)

    def _set_meta(self, slot: int, rank: int, scale: float) -> None:
        self._rank[slot] = rank
        self._scale[slot] = scale
        self.ranks[slot] = rank
        self.scales[slot] = scale

    def remove(self, key: str) -> None:
        """Free `key`'s slot now. Refused (ValueError) while it is pinned, in flight or being written."""
        with self._lock:
            slot = self._lru.get(key)
            if slot is None:
                raise KeyError(f"key {key[:12]}... is not in the pool")
            if not self._evictable(slot):
                raise ValueError(f"slot {slot} cannot be removed: it is pinned, in flight or being written")
            self._release(slot)

    def pin(self, key: str) -> int:
        """Keep `key`'s slot from eviction until `unpin`; returns the slot."""
        with self._lock:
            slot = self._lru.get(key)
            if slot is None:
                raise KeyError(f"cannot pin key {key[:12]}...: it is not in the pool (allocate it first)")
            self._pinned.add(slot)
            return slot

    def unpin(self, key: str) -> None:
        with self._lock:
            slot = self._lru.get(key)
            if slot is None:
                raise KeyError(f"cannot unpin key {key[:12]}...: it is not in the pool")
            self._pinned.discard(slot)

    def is_pinned(self, key: str) -> bool:
        with self._lock:
            slot = self._lru.get(key)
            return slot is not None and slot in self._pinned

    # ---- in-flight batches -------------------------------------------------------------------

    @contextlib.contextmanager
    def in_flight(self, slots: Sequence[int] | torch.Tensor, keys: Sequence[str] | None = None) -> Iterator[list[int]]:
        """Mark `slots` (-1 entries ignored; repeats fine) as used by a running batch: while inside, they are
        never evicted, removed or overwritten. Ref-counted, so batches may overlap. Each slot must hold a
        written adapter (ValueError otherwise).

        `keys` (one per entry of `slots`, None for -1): checked under the same lock, so a slot evicted between
        `get(key)` and this call raises StaleSlotError (a ValueError) instead of serving another adapter."""
        lst = _as_slot_list(slots)
        uniq = sorted({s for s in lst if s != -1})
        with self._lock:
            if keys is not None:
                keys = list(keys)
                if len(keys) != len(lst):
                    raise ValueError(f"keys must give one key per slot ({len(lst)}), got {len(keys)}")
                for s, k in zip(lst, keys):
                    if s != -1 and self._slot_key[s] != k:
                        raise StaleSlotError(f"slot {s} no longer holds key {str(k)[:12]}... (evicted since get()); "
                                             f"look the key up again")
            for s in uniq:
                self._check_slot(s)
                if self._state[s] != _READY:
                    what = "free" if self._state[s] == _FREE else "still being written"
                    raise ValueError(f"slot {s} is {what}: a batch may only use slots holding a written adapter")
            for s in uniq:
                self._refs[s] += 1
        try:
            yield uniq
        finally:
            with self._lock:
                for s in uniq:
                    self._refs[s] -= 1

    def in_flight_count(self, slot: int) -> int:
        with self._lock:
            self._check_slot(slot)
            return self._refs[slot]

    # ---- writing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self, slots: Sequence[int] | torch.Tensor, keys: Sequence[str | None] | None = None) -> Iterator[list[int]]:
        """Reserve allocated `slots` for writing (used by `write` and `hyperlora.runtime.writing`).

        Inside a `reserve` / `reserve_many` body the reservation commits or frees its slots, not this. Refuses (ValueError) a free slot, a slot in flight, or repeated slots; with `keys`, also a slot that no
        longer holds its key (StaleSlotError). On success they become ready (visible to `get`); if the body
        raises they are freed, since their content is incomplete.
        """
        lst = _as_slot_list(slots)
        if len(set(lst)) != len(lst):
            raise ValueError(f"slots must be distinct, got {lst}")
        with self._lock:
            if keys is not None:
                for s, k in zip(lst, keys, strict=True):
                    self._check_slot(s)
                    if k is not None and self._slot_key[s] != k:
                        raise StaleSlotError(f"slot {s} no longer holds key {str(k)[:12]}... (evicted meanwhile)")
            for s in lst:
                self._check_slot(s)
                if self._state[s] == _FREE:
                    raise ValueError(f"slot {s} is not allocated: call pool.allocate(key, rank, scale) first")
                if self._refs[s] > 0:
                    raise ValueError(f"slot {s} is used by an in-flight batch ({self._refs[s]}): it cannot be "
                                     f"overwritten until that batch finishes")
            nested = {s for s in lst if s in self._reserved}  # the reservation commits or frees these
            for s in lst:
                self._state[s] = _WRITING
        ok = False
        try:
            yield lst
            ok = True
        finally:
            with self._lock:
                for s in lst:
                    if s in nested:
                        continue
                    if ok:
                        self._state[s] = _READY
                    elif self._state[s] == _WRITING:
                        self._release(s)

    def write(self, slot: int, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write one adapter into an allocated slot: {module name: (A [r, d_in], B [d_out, r])}, scale NOT
        applied (the slot's scale is folded into B here). r may differ per module but must not exceed the
        slot's rank. Modules not given are zeroed for this slot. Everything is validated (names, shapes,
        rank, finiteness of A and of the scaled B in the pool's dtype) before anything is written; a
        rejected adapter leaves the slot as it was (inside `reserve`, the reservation then frees it).
        Prefer `put`, which also reserves and commits the slot."""
        with self._lock:
            self._check_slot(slot)
            slot_rank, slot_scale, slot_key = self._rank[slot], self._scale[slot], self._slot_key[slot]
        checked = self._check_modules(modules, slot_rank, slot_scale, where=f"slot {slot}")
        with self.writing([slot], keys=[slot_key]):  # refuses a slot re-assigned since validation
            self._write_checked(slot, checked)

    def validate(self, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, scale: float) -> None:
        """Raise what `put` would raise for this adapter at `rank` and `scale` (names, shapes, rank, NaN/Inf,
        overflow of the scaled B in the pool's dtype); reserves and writes nothing."""
        self._check_modules(modules, self._check_rank(rank), self._check_scale(scale), where="the adapter")

    def _check_modules(self, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], slot_rank: int,
                       slot_scale: float, where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Validated {name: (A, B * scale)} in the pool's dtype, ready to copy into a slot."""
        if not isinstance(modules, dict):
            raise TypeError(f"modules must be a dict {{module name: (A, B)}}, got {type(modules).__name__}")
        checked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, pair in modules.items():
            self._locate(name)
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"modules[{name!r}] must be a pair (A, B)")
            a, b = pair
            if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
                raise TypeError(f"modules[{name!r}]: A and B must be tensors")
            d_in, d_out = self._targets[name]
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
                raise ValueError(f"modules[{name!r}]: need A [r, {d_in}] and B [{d_out}, r], got A {tuple(a.shape)} "
                                 f"and B {tuple(b.shape)}")
            r = int(a.shape[0])
            if r > self.max_rank:
                raise ValueError(f"modules[{name!r}]: rank {r} exceeds the pool's max_rank {self.max_rank}")
            if r > slot_rank:
                raise ValueError(f"modules[{name!r}]: rank {r} exceeds {where}'s rank {slot_rank}; allocate the "
                                 f"slot with the adapter's largest rank")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"modules[{name!r}]: A or B holds NaN or Inf; refusing to load it into the pool")
            a_w = a.detach().to(self.device, self.dtype)
            b_w = (b.detach().to(torch.float32) * slot_scale).to(self.device, self.dtype)
            if not (torch.isfinite(a_w).all() and torch.isfinite(b_w).all()):
                raise ValueError(f"modules[{name!r}]: A, or B times the scale {slot_scale:g}, overflows the pool's "
                                 f"{self.dtype} (largest |B| {float(b.detach().abs().max()):.3g}); refusing to load it")
            checked[name] = (a_w, b_w)
        return checked

    def _write_checked(self, slot: int, checked: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for mtype, names in self._groups.items():
            a_buf, b_buf = self._a[mtype], self._b[mtype]
            for li, name in enumerate(names):
                if name in checked:
                    a, b = checked[name]
                    r = a.shape[0]
                    a_buf[li, slot, :r].copy_(a)
                    a_buf[li, slot, r:].zero_()
                    b_buf[li, slot, :, :r].copy_(b)
                    b_buf[li, slot, :, r:].zero_()
                else:
                    a_buf[li, slot].zero_()
                    b_buf[li, slot].zero_()
        with self._lock:
            self._stats["writes"] += 1

    def zero_slots(self, slots: Sequence[int] | torch.Tensor, module_types: Sequence[str] | None = None) -> None:
        """Zero `slots` in the buffers of `module_types` (default: all). Call inside `writing`."""
        lst = _as_slot_list(slots)
        for s in lst:
            self._check_slot(s)
        idx = torch.as_tensor(lst, dtype=torch.long, device=self.device)
        for t in (module_types if module_types is not None else self.module_types()):
            self._check_type(t)
            self._a[t].index_fill_(1, idx, 0)
            self._b[t].index_fill_(1, idx, 0)

    # ---- stats -------------------------------------------------------------------------------

    def slot_info(self, slot: int) -> dict:
        """{key, state, rank, scale, pinned, in_flight} of one slot (for logs and tests)."""
        with self._lock:
            self._check_slot(slot)
            return {"key": self._slot_key[slot], "state": ("free", "writing", "ready")[self._state[slot]],
                    "rank": self._rank[slot], "scale": self._scale[slot], "pinned": slot in self._pinned,
                    "in_flight": self._refs[slot]}

    def record_generation(self, n: int, seconds: float) -> None:
        """Count `n` generated adapters that took `seconds` of wall time together."""
        with self._lock:
            self._stats["generations"] += int(n)
            self._stats["generation_seconds"] += float(seconds)

    def stats(self) -> dict:
        """hits, misses, evictions, generations, generation_seconds, writes, used, pinned, in_flight, capacity."""
        with self._lock:
            out = dict(self._stats)
            out.update(used=sum(1 for s in self._state if s != _FREE), pinned=len(self._pinned),
                       in_flight=sum(1 for r in self._refs if r > 0), capacity=self.max_adapters)
            return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._a.values(), *self._b.values()))

    # ---- validation helpers ------------------------------------------------------------------

    def _check_slot(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not (0 <= slot < self.max_adapters):
            raise ValueError(f"slot must be an int in [0, {self.max_adapters}), got {slot!r}")

    def _check_rank(self, rank: int) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"rank must be an int, got {rank!r}")
        if not (1 <= rank <= self.max_rank):
            raise ValueError(f"rank {rank} is outside [1, max_rank={self.max_rank}]; build the pool with a larger "
                             f"max_rank or use a smaller adapter")
        return rank

    @staticmethod
    def _check_scale(scale: float) -> float:
        try:
            value = float(scale)
        except (TypeError, ValueError):
            raise TypeError(f"scale must be a float, got {scale!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"scale must be finite, got {scale!r}")
        return value

    def __repr__(self) -> str:
        return (f"AdapterPool(types={self.module_types()}, max_adapters={self.max_adapters}, max_rank={self.max_rank}, "
                f"dtype={self.dtype}, device={self.device}, used={self.stats()['used']})")
