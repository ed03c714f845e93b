"""The LoRA-serving layer that replaces a model's Linear / GPT-2 Conv1D modules in place.

`LoraLinear` (an `nn.Linear`) and `LoraConv1D` (a transformers `Conv1D`) hold the *same* parameter
objects as the module they replace, under the same attribute names, so the model's `state_dict` keys and
values do not change. Their forward is the base forward (the same op on the same tensors, hence bitwise the
same output) followed, only while a batch is active, by the multi-adapter update

    y[t] += B[slot(t)] @ A[slot(t)] @ x[t]        (slot -1: row untouched)

read from the runtime's `AdapterPool`. Every layer of one runtime shares one `LoraState`; the active batch
(`ActiveBatch`) carries the per-row slots, and the per-token metadata (`build_meta`) is built once per
token count and reused by every layer of the forward pass (and by every decode step of `generate`).

`select_apply_path` is the single seam where the materialized / latent choice is made per layer call
(issue 7 plugs its cost model, `hyperlora.ops.path_choice`, in there).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from hyperlora.ops import metadata as _metadata  # build_meta looked up on the module (tests count calls)
from hyperlora.ops.path_choice import choose_path
from hyperlora.ops.add_lora import add_lora
from hyperlora.ops.latent_lora import latent_lora
from hyperlora.modeling.targets import linear_shape, module_type_of

log = logging.getLogger(__name__)

APPLY_MODES = ("auto", "materialized", "latent")

try:  # GPT-2's projection layer; transformers is a hard dependency but keep the import failure clear.
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers missing or broken
    Conv1D = None  # type: ignore[assignment,misc]


# --------------------------------------------------------------------------------------------------
# Active batch: what one `Runtime.policies(...)` context hands to every layer.
# --------------------------------------------------------------------------------------------------

@dataclass
class ActiveBatch:
    """One batch in flight: per-row adapter slots and the shared per-token metadata.

    row_slots   [B] int64 on the model's device: the pool slot of each row, -1 = base model.
    num_slots   S, the pool's slot count (metadata is built over it).
    pool        the runtime's `AdapterPool` (layers read `pool.lora_a(name)` / `pool.lora_b(name)`).
    apply_mode  "auto" | "materialized" | "latent" (see `select_apply_path`).
    latent_rows [B] bool or None: rows whose adapter is a generated one with a stored latent (the only rows
                the latent path may serve; PEFT-loaded adapters are always materialized).
    latents     callable (module name) -> (w_a [R*K, d_in], w_b [d_out, R*K], z [S, K]) for the latent path, or
                None where the hypernetwork does not generate that module (then the materialized path runs).
    """

    row_slots: torch.Tensor
    num_slots: int
    pool: Any
    apply_mode: str = "materialized"
    latent_rows: torch.Tensor | None = None
    latents: Callable[[str], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] | None = None
    hypernet: Any = None
    _cache: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    meta_builds: int = 0

    @property
    def num_rows(self) -> int:
        return int(self.row_slots.shape[0])

    @property
    def any_adapter(self) -> bool:
        return bool(self._any)

    def __post_init__(self) -> None:
        host = self.row_slots.tolist()
        self._any = any(s >= 0 for s in host)
        lat = self.latent_rows.tolist() if self.latent_rows is not None else [False] * len(host)
        self.num_latent_rows = sum(1 for f in lat if f)
        self.num_latent_adapters = len({s for s, f in zip(host, lat) if f})
        self.num_materialized_rows = sum(1 for s, f in zip(host, lat) if s >= 0 and not f)

    def tokens_per_row(self, x: torch.Tensor) -> int:
        """Tokens per row for an activation `x` [B, T, d] (or [B*T, d]); ValueError if it is another batch."""
        b = self.num_rows
        if x.dim() >= 3:
            if x.shape[0] != b:
                raise ValueError(f"policies() was given {b} entries (one per batch row) but the model was called "
                                 f"with a batch of {x.shape[0]} rows; pass exactly one policy (or None) per row")
            t = 1
            for s in x.shape[1:-1]:
                t *= int(s)
            return t
        n = int(x.shape[0]) if x.dim() == 2 else 1
        if b == 0 or n % b:
            raise ValueError(f"policies() was given {b} entries but a layer saw {n} tokens, which is not a "
                             f"multiple of {b}; pass exactly one policy (or None) per batch row")
        return n // b

    def token_slots(self, tokens_per_row: int, which: str = "all") -> tuple[torch.Tensor, Any]:
        """(slots [B*T] int32, LoraBatchMeta) for rows expanded to tokens; built once per (T, which).

        which: "all" (every row's slot), "latent" (only latent rows, others -1), "materialized" (the rest).
        """
        key = (tokens_per_row, which)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                return hit
            rows = self.row_slots
            if which != "all":
                if self.latent_rows is None:
                    raise ValueError("no latent rows in this batch")
                keep = self.latent_rows if which == "latent" else ~self.latent_rows
                rows = torch.where(keep, rows, torch.full_like(rows, -1))
            slots = rows.repeat_interleave(tokens_per_row).to(torch.int32)
            meta = _metadata.build_meta(slots, self.num_slots)
            self.meta_builds += 1
            self._cache[key] = (slots, meta)
            return slots, meta


class PoolViews:
    """A layer's cached (A [S, R, d_in], B [S, d_out, R]) pool views. Not copied with the model: a deep copy of
    an attached model is served by no runtime, so it must not drag the pool's buffers along."""

    def __init__(self, pair: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.pair = pair

    def __deepcopy__(self, memo: dict) -> "PoolViews":
        return PoolViews(None)

    def __reduce__(self):
        return (PoolViews, (None,))


class LoraState:
    """Shared by every layer of one runtime: the batch active in the current thread (or None)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> "LoraState":
        # A deep copy of an attached model is a model of its own: no runtime serves it, so no batch is active.
        return LoraState()

    def __reduce__(self):
        return (LoraState, ())

    @property
    def batch(self) -> ActiveBatch | None:
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else None

    def push(self, batch: ActiveBatch) -> None:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(batch)

    def pop(self, batch: ActiveBatch) -> None:
        stack = getattr(self._local, "stack", None)
        if not stack or stack[-1] is not batch:
            raise RuntimeError("policies() contexts must be exited in the reverse order they were entered")
        stack.pop()


# --------------------------------------------------------------------------------------------------
# The seam: which path applies the adapters for one layer call.
# --------------------------------------------------------------------------------------------------

def select_apply_path(layer: "LoraLayerMixin", batch: ActiveBatch, num_tokens: int,
                      dtype: torch.dtype = torch.float32) -> str:
    """"materialized" or "latent" for this layer call: the one place the choice is made.

    - "materialized": the pool's A/B slots through `hyperlora.ops.add_lora` (always available; the only
      path for PEFT-loaded adapters).
    - "latent": generated rows through `hyperlora.ops.latent_lora` on the hypernetwork's head (PEFT rows of
      the same batch still go through `add_lora`). Needs the op (issue 7), a hypernetwork and stored latents;
      without them (no generated rows in the batch) it falls back to "materialized".
    - "auto": asks `hyperlora.ops.path_choice.choose_path(tokens, policies, d_in, d_out, rank, latent_k, dtype,
      device=...)` (issue 7's cost model) with the batch's generated rows, else "materialized".
    """
    mode = batch.apply_mode
    if mode == "materialized":
        return "materialized"
    latent_ok = batch.num_latent_rows > 0 and batch.latents is not None and batch.hypernet is not None
    if not latent_ok:
        return "materialized"
    if mode == "latent":
        return "latent"
    cfg = batch.hypernet.config
    tokens = batch.num_latent_rows * (num_tokens // max(batch.num_rows, 1))
    choice = choose_path(tokens, batch.num_latent_adapters, layer.hl_d_in, layer.hl_d_out, int(cfg.rank),
                    int(cfg.latent_dim) + 1, dtype, device=batch.row_slots.device)
    path = getattr(choice, "path", choice)
    log.debug("hyperlora: %s (%dx%d, %d tokens, %d generated adapters) -> %s path", layer.hl_name, layer.hl_d_in,
              layer.hl_d_out, tokens, batch.num_latent_adapters, path)
    return path if path in ("materialized", "latent") else "materialized"


def apply_adapters(layer: "LoraLayerMixin", x: torch.Tensor, y: torch.Tensor, batch: ActiveBatch) -> torch.Tensor:
    """Add every row's adapter delta to the base output `y` [..., d_out] for input `x` [..., d_in].

    Rows with slot -1 are left bitwise as the base layer produced them. Returns the updated output.
    """
    t = batch.tokens_per_row(x)
    d_in, d_out = x.shape[-1], y.shape[-1]
    x2 = x.reshape(-1, d_in)
    pool, name = batch.pool, layer.hl_name
    path = select_apply_path(layer, batch, x2.shape[0], x2.dtype)
    inplace = not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad))
    out = y if inplace else y.clone()
    out2 = out.view(-1, d_out)
    pool_dtype = pool.lora_a(name).dtype
    if x2.dtype == out2.dtype == pool_dtype:
        _add_deltas(layer, batch, path, out2, x2, t)
        return out
    # Mixed dtypes (autocast: fp32 input, bf16 output; or a pool kept in another dtype than the model):
    # compute the deltas in the pool's dtype, then add them to the adapted rows only, so rows with slot -1
    # stay bitwise what the base layer produced.
    delta = torch.zeros(out2.shape, dtype=pool_dtype, device=out2.device)
    _add_deltas(layer, batch, path, delta, x2.to(pool_dtype), t)
    rows = batch.token_slots(t, "all")[0] >= 0
    out2[rows] += delta[rows].to(out2.dtype)
    return out


def _add_deltas(layer: "LoraLayerMixin", batch: ActiveBatch, path: str, out2: torch.Tensor, x2: torch.Tensor,
                t: int) -> None:
    """out2 [T, d_out] += every row's adapter applied to x2 [T, d_in] (same dtype), on the chosen path."""
    pool, name = batch.pool, layer.hl_name
    latent = batch.latents(name) if path == "latent" else None
    if latent is not None:
        slots, meta = batch.token_slots(t, "latent")
        w_a, w_b, z = latent
        if w_a.dtype != x2.dtype or w_a.device != x2.device:
            w_a, w_b = w_a.to(x2.device, x2.dtype), w_b.to(x2.device, x2.dtype)
        latent_lora(out2, x2, w_a, w_b, z, slots, pool.scales, meta=meta)
        if batch.num_materialized_rows:
            slots, meta = batch.token_slots(t, "materialized")
            add_lora(out2, x2, pool.lora_a(name), pool.lora_b(name), slots, None, pool.ranks, meta=meta)
        return
    slots, meta = batch.token_slots(t, "all")
    views = layer.hl_views.pair if layer.hl_views is not None else None
    lora_a, lora_b = views if views is not None else (pool.lora_a(name), pool.lora_b(name))
    add_lora(out2, x2, lora_a, lora_b, slots, None, pool.ranks, meta=meta)


# --------------------------------------------------------------------------------------------------
# The layers.
# --------------------------------------------------------------------------------------------------

class LoraLayerMixin:
    """Base forward, then the active batch's adapters. Attributes set by `wrap_module`:

    hl_name  full module path in the model (the pool's key), hl_type its last component,
    hl_d_in / hl_d_out the projection's input / output features, hl_state the runtime's `LoraState`,
    hl_views the pool's per-layer A / B views for this module (set by the runtime; the pool's buffers are
    allocated once and written in place, so the views stay valid).
    """

    hl_name: str
    hl_type: str
    hl_d_in: int
    hl_d_out: int
    hl_state: LoraState
    hl_views: "PoolViews | None" = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = super().forward(x)  # type: ignore[misc]
        batch = self.hl_state.batch
        if batch is None:
            return y
        if not batch.any_adapter:
            batch.tokens_per_row(x)  # one entry per row even when every entry is None (ValueError otherwise)
            return y
        return apply_adapters(self, x, y, batch)


class LoraLinear(LoraLayerMixin, nn.Linear):
    """An `nn.Linear` serving many adapters per batch; same `weight` / `bias` parameters as the original."""


if Conv1D is not None:
    class LoraConv1D(LoraLayerMixin, Conv1D):
        """GPT-2's `Conv1D` (weight [d_in, d_out]) serving many adapters per batch; same parameters."""
else:  # pragma: no cover
    LoraConv1D = None  # type: ignore[assignment,misc]


def _base_kind(module: nn.Module) -> str | None:
    """"linear" / "conv1d" when `module` computes exactly like nn.Linear / Conv1D, else None."""
    if isinstance(module, LoraLayerMixin):
        return None
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    if Conv1D is not None and isinstance(module, Conv1D) and type(module).forward is Conv1D.forward:
        return "conv1d"
    return None


def is_supported(module: nn.Module) -> bool:
    """True for nn.Linear / transformers Conv1D (and subclasses that keep their forward)."""
    return _base_kind(module) is not None


def wrap_module(module: nn.Module, name: str, state: LoraState) -> nn.Module:
    """A LoRA-serving copy of `module` sharing its parameters, buffers and hooks (the original is unchanged).

    The new module's `__dict__` is a shallow copy of the original's with the parameter / buffer / hook
    dicts copied, so `state_dict` names and tensors are identical and the original can be put back as is.
    """
    kind = _base_kind(module)
    if kind is None:
        raise TypeError(f"cannot serve adapters on {name!r}: {type(module).__name__} is not an nn.Linear or a "
                        f"transformers Conv1D with the stock forward; leave it out of target_modules")
    cls = LoraLinear if kind == "linear" else LoraConv1D
    new = cls.__new__(cls)
    d = {}
    for k, v in module.__dict__.items():
        d[k] = v.copy() if isinstance(v, (dict, OrderedDict)) else v
    new.__dict__.update(d)
    d_in, d_out = linear_shape(module)
    new.hl_name = name
    new.hl_type = module_type_of(name)
    new.hl_d_in, new.hl_d_out = d_in, d_out
    new.hl_state = state
    return new


def unwrap_module(layer: nn.Module, original: nn.Module) -> nn.Module:
    """The original module, given back the layer's current parameters and buffers (they may have been
    replaced while attached, e.g. by `model.to(...)` with swapped tensors)."""
    for k, p in layer._parameters.items():
        original._parameters[k] = p
    for k, b in layer._buffers.items():
        original._buffers[k] = b
    original.training = layer.training
    return original


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name` with `module`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
