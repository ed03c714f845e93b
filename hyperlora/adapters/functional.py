"""Per-row LoRA adapters on a frozen base model, differentiable, for training and evaluation.

Every batch row carries its own adapter: for a target Linear ``name`` with adapters
``A [P, R, d_in]`` and ``B [P, d_out, R]`` and a row -> adapter map ``rows [N]`` (-1 = no adapter),

    y[n, t] += scale[rows[n]] * (x[n, t] @ A[rows[n]].T) @ B[rows[n]].T

which is exactly ``hyperlora.ops.add_lora`` with one slot per row (its torch reference), written with
batched matmuls so autograd reaches A and B (and through them the hypernetwork). Applied with forward
hooks inside a context manager, so the base model's module tree and weights are never touched.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

Adapters = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """scale * (x A^T) B^T per row. x [N, T, d_in], a [N, R, d_in], b [N, d_out, R], scale float or [N].

    Returns [N, T, d_out] in x's dtype (the adapter is cast to x's dtype so bf16 autocast stays bf16).
    """
    a = a.to(x.dtype)
    b = b.to(x.dtype)
    h = torch.bmm(x, a.transpose(1, 2))  # [N, T, R]
    if isinstance(scale, torch.Tensor):
        h = h * scale.to(h.dtype).view(-1, 1, 1)
    elif scale != 1.0:
        h = h * scale
    return torch.bmm(h, b.transpose(1, 2))


def _gather_rows(adapters: Adapters, rows: torch.Tensor | None, n_adapters: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    if rows is None:
        return None, torch.ones(0, dtype=torch.bool)
    rows = torch.as_tensor(rows, dtype=torch.long)
    if rows.dim() != 1:
        raise ValueError(f"rows must be a 1-D tensor [N] of adapter indices (-1 = none), got shape {tuple(rows.shape)}")
    if rows.numel() and (int(rows.max()) >= n_adapters or int(rows.min()) < -1):
        raise ValueError(f"rows must be in [-1, {n_adapters}) (one index into the {n_adapters} adapters per row), "
                         f"got range [{int(rows.min())}, {int(rows.max())}]")
    return rows, rows >= 0


def _validate(model: nn.Module, adapters: Adapters) -> tuple[dict[str, nn.Module], int]:
    modules = dict(model.named_modules())
    n = None
    out = {}
    for name, ab in adapters.items():
        if name not in modules:
            raise ValueError(f"adapter target {name!r} is not a module of the base model (names look like "
                             f"'model.layers.0.self_attn.q_proj'); no adapter may be silently dropped")
        mod = modules[name]
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"adapter target {name!r} is a {type(mod).__name__}; per-row LoRA needs nn.Linear")
        if not (isinstance(ab, (tuple, list)) and len(ab) == 2):
            raise TypeError(f"adapters[{name!r}] must be a pair (A [P, R, d_in], B [P, d_out, R])")
        a, b = ab
        if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
            raise ValueError(f"adapters[{name!r}]: A must be [P, R, d_in] and B [P, d_out, R] with the same P and R, "
                             f"got A {tuple(a.shape)}, B {tuple(b.shape)}")
        if a.shape[2] != mod.in_features or b.shape[1] != mod.out_features:
            raise ValueError(f"adapters[{name!r}]: module is {mod.in_features}->{mod.out_features}, adapter is "
                             f"{a.shape[2]}->{b.shape[1]}")
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise ValueError(f"all adapters must have the same number of policies P; {name!r} has {a.shape[0]}, "
                             f"others {n}")
        out[name] = mod
    return out, int(n or 0)


@contextlib.contextmanager
def apply_lora(model: nn.Module, adapters: Adapters, scale: float | torch.Tensor = 1.0,
               rows: torch.Tensor | Sequence[int] | None = None) -> Iterator[None]:
    """Within the block, every forward of ``model`` adds per-row LoRA deltas on the named Linear modules.

    adapters: full module name -> (A [P, R, d_in], B [P, d_out, R]). rows: [N] adapter index per batch row
    (-1 = untouched); None means P == N and row n uses adapter n. scale: float or [P] (alpha / r).
    Hooks are removed on exit, also on error.
    """
    mods, n_adapters = _validate(model, adapters)
    rows_t, keep = _gather_rows(adapters, None if rows is None else torch.as_tensor(rows), n_adapters)
    scale_t = scale if isinstance(scale, torch.Tensor) else None
    if scale_t is not None and scale_t.numel() != n_adapters:
        raise ValueError(f"scale must be a float or one value per adapter ({n_adapters}), got {scale_t.numel()}")
    handles = []

    def make_hook(name: str):
        a_all, b_all = adapters[name]

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            squeeze = x.dim() == 2
            if squeeze:
                x = x.unsqueeze(1)
            N = x.shape[0]
            if rows_t is None:
                if N != n_adapters:
                    raise ValueError(f"batch has {N} rows but {n_adapters} adapters were given and rows=None; "
                                     f"pass rows= to map rows to adapters")
                d = lora_delta(x, a_all, b_all, scale_t if scale_t is not None else scale)
            else:
                if N != rows_t.numel():
                    raise ValueError(f"batch has {N} rows but rows has {rows_t.numel()} entries")
                idx = rows_t.clamp(min=0).to(a_all.device)
                sc = scale_t[idx] if scale_t is not None else torch.full((N,), float(scale), device=x.device)
                sc = sc * keep.to(sc.device, sc.dtype)
                d = lora_delta(x, a_all[idx], b_all[idx], sc)
            if squeeze:
                d = d.squeeze(1)
            return output + d.to(output.dtype)

        return hook

    try:
        for name, mod in mods.items():
            handles.append(mod.register_forward_hook(make_hook(name)))
        yield
    finally:
        for h in handles:
            h.remove()


def adapters_from_generated(generated: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                            module_names: Mapping[str, Sequence[str]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HyperNetwork.generate output (type -> (A [P, L, R, d_in], B [P, L, d_out, R])) -> name -> (A, B) per layer."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for mtype, (a, b) in generated.items():
        names = list(module_names[mtype])
        if a.shape[1] != len(names):
            raise ValueError(f"module type {mtype!r}: {a.shape[1]} generated layers but {len(names)} module names")
        for li, name in enumerate(names):
            out[name] = (a[:, li], b[:, li])
    return out
