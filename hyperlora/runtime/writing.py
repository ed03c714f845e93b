"""Writing a source's adapters into the pool: the runtime side of "policy text -> pool slot".

The pool owns a slot's lifecycle (`AdapterPool.reserve_many` / `put`: acquire, write, commit, or free on any
error); this module only decides what is written:

* `write_generated(source, emb, pool, keys)`: a source with a latent head (`supports_latent`, the T2L
  `HyperNetwork`) generated straight into reserved slots, one fused `generate_lora` launch per module type
  (`generate_into_slots`, formerly `HyperNetwork.generate_into_pool`).
* `write_adapters(pool, keys, per_policy, scale)`: adapters already built on the host (a policy reader, a
  PEFT file), each validated, then reserved, written and committed by `pool.put`.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from hyperlora.adapters.pool import AdapterPool
from hyperlora.ops.generate_lora import generate_lora

__all__ = ["generate_into_slots", "write_generated", "write_adapters", "adapter_rank"]


def adapter_rank(modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """The largest rank (rows of A) among an adapter's modules: the rank its slot is reserved with."""
    if not isinstance(modules, dict) or not modules:
        raise ValueError("an adapter must be a non-empty dict {module name: (A [r, d_in], B [d_out, r])}")
    return max(int(a.shape[0]) for a, _ in modules.values())


def _check_compatible(hn: Any, pool: AdapterPool) -> None:
    if hn.config.rank > pool.max_rank:
        raise ValueError(f"the hypernetwork's rank {hn.config.rank} exceeds the pool's max_rank {pool.max_rank}; "
                         f"build the pool with max_rank >= {hn.config.rank}")
    for t in hn.types:
        if t not in pool.module_types():
            raise ValueError(f"the pool has no buffers for module type {t!r}; build it with "
                             f"AdapterPool(hypernet.targets(), ...) or include those modules")
        missing = sorted(set(hn.module_names(t)) - set(pool.module_names(t)))
        if missing:
            raise ValueError(f"the pool's {t!r} modules differ from the hypernetwork's: {len(missing)} of the "
                             f"hypernetwork's modules (first {missing[0]!r}) have no pool buffer; they were "
                             f"built for different base models")
        if tuple(pool.shape(t)) != tuple(int(d) for d in hn.config.module_shapes[t]):
            raise ValueError(f"module type {t!r}: pool shape {pool.shape(t)} != hypernetwork shape "
                             f"{hn.config.module_shapes[t]}")


@torch.no_grad()
def generate_into_slots(hn: Any, task_emb: torch.Tensor, pool: AdapterPool, slots: Sequence[int] | torch.Tensor,
                        scale: float | Sequence[float] | torch.Tensor | None = None,
                        backend: str | None = None) -> None:
    """Generate the adapters of P policies with `hn` (a T2L `HyperNetwork`) straight into `pool` slots.

    task_emb [P, E]; slots [P]: reserved (`pool.reserve_many`) or allocated (`pool.allocate`) with `hn`'s rank,
    not in flight; scale: one float or [P] (default: the scale each slot was reserved with), folded into B.
    One `generate_lora` launch per module type. Pool module types and layers `hn` does not cover are zeroed for
    these slots (a slot must not apply a previous tenant's weights there). Inside a reservation the
    reservation commits the slots; allocated slots become ready here once the device has written them.
    Counts one generation per policy and its wall time in `pool.stats()`.
    """
    t0 = time.perf_counter()
    e = hn._check_task_emb(task_emb)
    P = e.shape[0]
    slots_t = torch.as_tensor(slots, dtype=torch.int64).reshape(-1)
    if slots_t.numel() != P:
        raise ValueError(f"slots must give one slot per policy: {P} task embeddings, {slots_t.numel()} slots")
    _check_compatible(hn, pool)
    keys = []
    for s in slots_t.tolist():
        info = pool.slot_info(s)
        keys.append(info["key"])
        if info["state"] == "free":
            raise ValueError(f"slot {s} is not allocated: reserve it first (pool.reserve(key, rank, scale))")
        if info["rank"] != hn.config.rank:
            raise ValueError(f"slot {s} was allocated with rank {info['rank']}, the hypernetwork generates rank "
                             f"{hn.config.rank}")
    if scale is None:
        scales = torch.tensor([pool.slot_info(s)["scale"] for s in slots_t.tolist()], dtype=torch.float32)
    else:
        scales = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        if scales.numel() == 1:
            scales = scales.expand(P).clone()
    if scales.numel() != P:
        raise ValueError(f"scale must be one float or one per policy ({P}), got {scales.numel()} values")
    dev = pool.device
    with pool.writing(slots_t.tolist(), keys=keys):  # refuses slots re-assigned since the checks above
        z = hn.latents(e)
        slots_dev = slots_t.to(dev)
        scales_dev = scales.to(dev)
        for t in hn.types:
            a_buf, b_buf = pool.buffers(t)
            w_a, w_b = hn.head(t)
            zt = z[t]
            pool_names = pool.module_names(t)
            if pool_names != hn.module_names(t):
                # the hypernetwork covers only some of the pool's layers: z = 0 (bias coordinate included)
                # gives A = B = 0 exactly, so the same launch zeroes the layers it does not generate
                pos = torch.tensor([pool_names.index(n) for n in hn.module_names(t)], device=zt.device)
                full = zt.new_zeros(zt.shape[0], len(pool_names), zt.shape[2])
                full[:, pos] = zt
                zt = full
            generate_lora(a_buf, b_buf, zt.to(dev), w_a.detach().to(dev), w_b.detach().to(dev), slots_dev,
                          scales_dev, backend=backend)
        others = [t for t in pool.module_types() if t not in hn.types]
        if others:
            pool.zero_slots(slots_t.tolist(), others)
        if dev.type == "cuda":  # ready only when written, whichever stream reads them next
            torch.cuda.current_stream(dev).synchronize()
    pool.record_generation(P, time.perf_counter() - t0)


def write_generated(hn: Any, task_emb: torch.Tensor, pool: AdapterPool, keys: Sequence[str],
                    backend: str | None = None) -> list[int]:
    """Reserve one slot per key (none of them in the pool), generate `task_emb`'s adapters into them and
    commit; returns the slots. Any error frees every reserved slot and key (nothing is left "writing")."""
    keys = list(keys)
    rank, scale = int(hn.config.rank), float(hn.config.scale)
    with pool.reserve_many([(k, rank, scale) for k in keys]) as slots:
        generate_into_slots(hn, task_emb, pool, slots, backend=backend)
    return slots


def write_adapters(pool: AdapterPool, keys: Sequence[str], per_policy: Sequence[dict[str, tuple[torch.Tensor,
                   torch.Tensor]]], scale: float = 1.0) -> list[int]:
    """`pool.put` each adapter under its key (validated first, reserved with its own rank, committed);
    returns the slots. A failure leaves the adapters written before it in the pool and holds no slot."""
    keys, per_policy = list(keys), list(per_policy)
    if len(keys) != len(per_policy):
        raise ValueError(f"write_adapters: {len(keys)} keys for {len(per_policy)} adapters")
    return [pool.put(k, adapter_rank(mods), scale, mods) for k, mods in zip(keys, per_policy)]
