"""AdapterPool: layout, content keys, LRU, pinning, in-flight protection, validation before writing, threads."""
from __future__ import annotations

import threading

import pytest
import torch

from hyperlora.adapters.pool import AdapterPool, PoolFullError, StaleSlotError

TARGETS = {
    **{f"model.layers.{i}.self_attn.q_proj": (12, 12) for i in range(3)},
    **{f"model.layers.{i}.self_attn.v_proj": (12, 6) for i in range(3)},
}


def make_pool(**kw) -> AdapterPool:
    return AdapterPool(TARGETS, **{"max_adapters": 3, "max_rank": 4, **kw})


def adapter(rank: int, names=TARGETS, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(rank, TARGETS[n][0], generator=g), torch.randn(TARGETS[n][1], rank, generator=g))
            for n in names}


def ready(pool: AdapterPool, key: str, rank: int = 2, scale: float = 1.0, seed: int = 0) -> int:
    slot = pool.allocate(key, rank, scale)
    pool.write(slot, adapter(rank, seed=seed))
    return slot


def test_layout_and_views_share_storage():
    pool = make_pool()
    a, b = pool.buffers("v_proj")
    assert a.shape == (3, 3, 4, 12) and b.shape == (3, 3, 6, 4)
    assert pool.module_names("q_proj") == [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    view = pool.lora_b("model.layers.2.self_attn.v_proj")
    assert view.shape == (3, 6, 4) and view.data_ptr() == b[2].data_ptr()
    with pytest.raises(KeyError, match="not a target"):
        pool.lora_a("model.layers.9.self_attn.q_proj")


def test_layer_order_is_natural_not_lexicographic():
    targets = {f"m.layers.{i}.q": (4, 4) for i in (10, 2, 1)}
    assert AdapterPool(targets, max_adapters=1, max_rank=1).module_names("q") == ["m.layers.1.q", "m.layers.2.q",
                                                                                   "m.layers.10.q"]


def test_content_key_changes_with_every_field():
    base = AdapterPool.content_key("hn1", "Be polite.", 8, 2.0)
    assert base == AdapterPool.content_key("hn1", "Be polite.", 8, 2.0)
    others = [AdapterPool.content_key("hn2", "Be polite.", 8, 2.0), AdapterPool.content_key("hn1", "Be polite!", 8, 2.0),
              AdapterPool.content_key("hn1", "Be polite.", 16, 2.0), AdapterPool.content_key("hn1", "Be polite.", 8, 2.5)]
    assert len({base, *others}) == 5


def test_write_folds_scale_zero_pads_rank_and_zeroes_uncovered_modules():
    torch.manual_seed(0)
    pool = make_pool()
    for t in pool.module_types():
        for buf in pool.buffers(t):
            buf.normal_()  # poison: a previous tenant's weights
    before = {t: [x.clone() for x in pool.buffers(t)] for t in pool.module_types()}
    slot = pool.allocate("k", 3, 0.5)
    covered = ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]
    ad = adapter(3, covered)
    ad["model.layers.2.self_attn.v_proj"] = tuple(x[:2] if i == 0 else x[:, :2]
                                                   for i, x in enumerate(ad["model.layers.2.self_attn.v_proj"]))
    pool.write(slot, ad)
    for name in TARGETS:
        a, b = pool.lora_a(name)[slot], pool.lora_b(name)[slot]
        if name in ad:
            A, B = ad[name]
            r = A.shape[0]
            assert torch.equal(a[:r], A) and torch.allclose(b[:, :r], 0.5 * B)
            assert torch.count_nonzero(a[r:]) == 0 and torch.count_nonzero(b[:, r:]) == 0
        else:
            assert torch.count_nonzero(a) == 0 and torch.count_nonzero(b) == 0
    for t in pool.module_types():  # other slots untouched
        others = [s for s in range(3) if s != slot]
        for buf, old in zip(pool.buffers(t), before[t]):
            assert torch.equal(buf[:, others], old[:, others])
    assert pool.ranks.tolist()[slot] == 3 and pool.scales.tolist()[slot] == 0.5
    assert pool.get("k") == slot


@pytest.mark.parametrize("mutate,match", [
    (lambda ad: ad["model.layers.1.self_attn.q_proj"][0].__setitem__((0, 0), float("nan")), "NaN or Inf"),
    (lambda ad: ad["model.layers.1.self_attn.v_proj"][1].__setitem__((0, 0), float("inf")), "NaN or Inf"),
    (lambda ad: ad.__setitem__("model.layers.1.self_attn.v_proj", (torch.ones(2, 12), torch.ones(7, 2))), "need A"),
    (lambda ad: ad.__setitem__("model.layers.1.self_attn.v_proj", (torch.ones(5, 12), torch.ones(6, 5))), "max_rank"),
    (lambda ad: ad.__setitem__("model.layers.1.self_attn.v_proj", (torch.ones(3, 12), torch.ones(6, 3))), "slot .* rank 2"),
    (lambda ad: ad.__setitem__("model.layers.1.self_attn.k_proj", (torch.ones(2, 12), torch.ones(6, 2))), "not a target"),
])
def test_bad_adapter_rejected_before_anything_is_written(mutate, match):
    pool = make_pool()
    slot = ready(pool, "old", rank=2, seed=1)
    snapshot = {t: [x.clone() for x in pool.buffers(t)] for t in pool.module_types()}
    ad = adapter(2, seed=2)
    mutate(ad)
    with pytest.raises((ValueError, KeyError), match=match):
        pool.write(slot, ad)
    for t in pool.module_types():
        for buf, old in zip(pool.buffers(t), snapshot[t]):
            assert torch.equal(buf, old)


def test_allocate_validates_rank_and_scale():
    pool = make_pool()
    with pytest.raises(ValueError, match="max_rank=4"):
        pool.allocate("k", 5, 1.0)
    with pytest.raises(ValueError, match="outside"):
        pool.allocate("k", 0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        pool.allocate("k", 2, float("nan"))
    with pytest.raises(TypeError, match="key"):
        pool.allocate("", 2, 1.0)


def test_hits_misses_and_lru_eviction_order():
    pool = make_pool()
    s = {k: ready(pool, k) for k in "abc"}
    assert pool.get("a") == s["a"]  # a is now most recent; b is least recent
    assert pool.get("zzz") is None
    d = ready(pool, "d")
    assert d == s["b"] and pool.get("b") is None and "b" not in pool
    st = pool.stats()
    assert (st["hits"], st["misses"], st["evictions"], st["writes"]) == (1, 2, 1, 4)


def test_pinned_and_in_flight_slots_are_never_evicted_then_pool_full():
    pool = make_pool()
    s = {k: ready(pool, k) for k in "abc"}
    pool.pin("a")
    with pool.in_flight([s["b"], -1, s["b"]]):
        assert pool.in_flight_count(s["b"]) == 1
        d = ready(pool, "d")
        assert d == s["c"]
        with pool.in_flight([d]):
            with pytest.raises(PoolFullError, match=r"all 3 slots are pinned \(1\), used by in-flight batches \(2\)"):
                pool.allocate("e", 2, 1.0)
            with pytest.raises(ValueError, match="in-flight"):
                pool.write(d, adapter(2))
            with pytest.raises(ValueError, match="cannot be removed"):
                pool.remove("d")
    assert pool.in_flight_count(s["b"]) == 0
    e = pool.allocate("e", 2, 1.0)
    assert e == s["b"]  # b was least recent among evictable (a pinned)
    pool.unpin("a")
    pool.write(e, adapter(2))
    f = pool.allocate("f", 2, 1.0)
    assert f == s["a"]


def test_in_flight_refuses_free_or_unwritten_slots_and_nests():
    pool = make_pool()
    with pytest.raises(ValueError, match="free"):
        with pool.in_flight([0]):
            pass
    slot = pool.allocate("k", 2, 1.0)
    with pytest.raises(ValueError, match="being written"):
        with pool.in_flight([slot]):
            pass
    assert pool.get("k") is None  # allocated but not written: not a hit
    pool.write(slot, adapter(2))
    with pool.in_flight([slot]):
        with pool.in_flight(torch.tensor([slot])):
            assert pool.in_flight_count(slot) == 2
        assert pool.in_flight_count(slot) == 1
    assert pool.in_flight_count(slot) == 0


def test_failed_write_frees_the_slot():
    pool = make_pool()
    slot = pool.allocate("k", 2, 1.0)
    with pytest.raises(RuntimeError, match="boom"):
        with pool.writing([slot]):
            raise RuntimeError("boom")
    assert pool.slot_info(slot)["state"] == "free" and pool.slot_of("k") is None


def test_same_key_allocates_same_slot_and_rank_must_match():
    pool = make_pool()
    s = pool.allocate("k", 2, 1.0)
    assert pool.allocate("k", 2, 1.0) == s
    with pytest.raises(ValueError, match="already allocated"):
        pool.allocate("k", 3, 1.0)


def test_threads_never_share_a_slot():
    pool = AdapterPool(TARGETS, max_adapters=8, max_rank=2)
    errors: list[BaseException] = []
    stale: list[str] = []
    ad = adapter(2)

    def worker(tid: int) -> None:
        try:
            for i in range(30):
                key = f"t{tid}-{i % 6}"
                slot = pool.get(key)
                if slot is None:
                    try:
                        slot = pool.allocate(key, 2, 1.0)
                        pool.write(slot, ad)
                    except (PoolFullError, ValueError):
                        continue
                try:
                    with pool.in_flight([slot], keys=[key]):
                        for _ in range(3):
                            assert pool.key_of(slot) == key  # never evicted or overwritten under us
                except StaleSlotError:
                    stale.append(key)  # evicted between get() and in_flight(): detected, not served
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    keys = [pool.key_of(s) for s in range(8) if pool.key_of(s) is not None]
    assert len(keys) == len(set(keys))
    st = pool.stats()
    assert st["hits"] + st["misses"] == 120 and st["in_flight"] == 0


def test_in_flight_with_keys_detects_eviction_after_get():
    pool = make_pool()
    s = {k: ready(pool, k) for k in "abc"}
    slot = pool.get("a")
    pool.remove("a")
    ready(pool, "d")  # reuses a's slot
    with pytest.raises(StaleSlotError, match="no longer holds"):
        with pool.in_flight([slot], keys=["a"]):
            pass
    with pool.in_flight([s["b"], -1], keys=["b", None]):
        assert pool.in_flight_count(s["b"]) == 1
