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


# ---- the slot lifecycle: reserve / put (commit, or free slot and key on any exception) ----------

@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), ValueError("bad")])
def test_reserve_commits_on_success_and_frees_slot_and_key_on_any_exception(exc):
    pool = make_pool()
    with pool.reserve("k", 2, 0.5) as slot:
        assert pool.slot_info(slot)["state"] == "writing" and pool.get("k") is None  # invisible until committed
        pool.write(slot, adapter(2))
        assert pool.slot_info(slot)["state"] == "writing"  # write inside a reservation does not commit early
    assert pool.get("k") == slot and pool.slot_info(slot)["scale"] == 0.5
    with pytest.raises(type(exc)):
        with pool.reserve("j", 2, 1.0) as s2:
            raise exc
    assert pool.slot_info(s2) == {"key": None, "state": "free", "rank": 0, "scale": 0.0, "pinned": False,
                                  "in_flight": 0}
    assert pool.slot_of("j") is None and pool.stats()["used"] == 1


def test_reserve_many_is_all_or_none_and_refuses_present_keys():
    pool = make_pool()
    ready(pool, "a")
    pool.pin("a")
    with pytest.raises(PoolFullError):
        with pool.reserve_many([("x", 2, 1.0), ("y", 2, 1.0), ("z", 2, 1.0)]):
            pass
    assert pool.stats()["used"] == 1 and all(pool.slot_of(k) is None for k in "xyz")
    with pytest.raises(ValueError, match="already in the pool"):
        with pool.reserve("a", 2, 1.0):
            pass
    with pytest.raises(ValueError, match="distinct"):
        with pool.reserve_many([("x", 2, 1.0), ("x", 2, 1.0)]):
            pass
    with pool.reserve_many([("x", 2, 1.0), ("y", 1, 1.0)]) as slots:
        with pytest.raises(ValueError, match="being written"):
            with pool.reserve("x", 2, 1.0):
                pass
        for s in slots:
            pool.write(s, adapter(pool.slot_info(s)["rank"]))
    assert [pool.get(k) for k in "xy"] == slots


def test_put_validates_before_reserving_and_returns_present_slots():
    pool = make_pool()
    s = {k: pool.put(k, 2, 1.0, adapter(2, seed=i)) for i, k in enumerate("abc")}
    bad = adapter(2)
    bad["model.layers.0.self_attn.q_proj"][1][0, 0] = float("nan")
    before = pool.stats()
    with pytest.raises(ValueError, match="NaN or Inf"):
        pool.put("d", 2, 1.0, bad)
    assert pool.stats() == before and all(k in pool for k in "abc")  # nothing evicted for an invalid adapter
    assert pool.put("a", 2, 1.0, adapter(2)) == s["a"]  # present: its slot, nothing rewritten
    with pytest.raises(ValueError, match="rank 2"):
        pool.put("a", 3, 1.0, adapter(3))
    with pytest.raises(ValueError, match="overflows"):
        pool.put("e", 2, 1e39, adapter(2))  # a finite scale, but B * scale = inf in float32


# ---- property-based: the pool's protocol as a state machine ------------------------------------
# hypothesis is a test-only dependency (the `test` extra): imported here, skipped where it is missing.

import hypothesis  # a test dependency (pyproject [test]): missing, the suite must fail, not skip
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402

import contextlib  # noqa: E402
import os  # noqa: E402

SM_TARGETS = {"l.0.q": (3, 2), "l.1.q": (3, 2)}
SM_KEYS = st.sampled_from([f"k{i}" for i in range(6)])


def _sm_adapter(rank: int, kind: str) -> dict:
    ad = {n: (torch.full((rank, 3), 0.5), torch.full((2, rank), 0.25)) for n in SM_TARGETS}
    if kind == "nan":
        ad["l.1.q"][1][0, 0] = float("nan")
    elif kind == "overflow":
        ad["l.0.q"] = (ad["l.0.q"][0], torch.full((2, rank), 3e4))  # with scale 16, inf in float16
    return ad


class PoolMachine(RuleBasedStateMachine):
    """Random put / reserve (commit, abort, failing write) / get / pin / unpin / hold / release / remove on a
    3-slot float16 pool, checked against a model of which keys must still be there and where."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = AdapterPool(SM_TARGETS, max_adapters=3, max_rank=2, dtype=torch.float16)
        self.present: dict[str, int] = {}  # key -> slot, ready
        self.pinned: set[str] = set()
        self.holds: list[tuple[contextlib.ExitStack, dict[str, int]]] = []
        self.reservation: tuple[contextlib.ExitStack, list[str], list[int]] | None = None
        self.gets = 0
        self.evictions = 0

    # -- helpers --
    def _protected(self) -> set[str]:
        held = {k for _, ks in self.holds for k in ks}
        return self.pinned | held

    def _capacity(self) -> int:
        """Slots a new key could take: free ones plus ready ones neither pinned nor in flight."""
        reserved = len(self.reservation[1]) if self.reservation else 0
        free = self.pool.max_adapters - len(self.present) - reserved
        return free + len(set(self.present) - self._protected())

    def _sync_evictions(self) -> None:
        for k in list(self.present):
            if k not in self.pool:
                assert k not in self._protected(), f"{k} was evicted while pinned or in flight"
                del self.present[k]
                self.evictions += 1

    # -- rules --
    @rule(key=SM_KEYS, rank=st.integers(1, 2), kind=st.sampled_from(["ok", "ok", "nan", "overflow"]))
    def put(self, key: str, rank: int, kind: str) -> None:
        scale = 16.0 if kind == "overflow" else 1.0
        busy = self.reservation is not None and key in self.reservation[1]
        before = self.pool.stats()
        if key in self.present:
            if self.pool.slot_info(self.present[key])["rank"] == rank and self.pool.slot_info(self.present[key])["scale"] == scale:
                assert self.pool.put(key, rank, scale, _sm_adapter(rank, kind)) == self.present[key]
            else:
                with pytest.raises(ValueError):
                    self.pool.put(key, rank, scale, _sm_adapter(rank, kind))
            return
        if kind != "ok" or busy:
            with pytest.raises(ValueError):
                self.pool.put(key, rank, scale, _sm_adapter(rank, kind))
            assert self.pool.stats() == before  # refused before anything was reserved or evicted
            return
        if self._capacity() == 0:
            with pytest.raises(PoolFullError):
                self.pool.put(key, rank, scale, _sm_adapter(rank, kind))
            assert self.pool.stats() == before
            return
        slot = self.pool.put(key, rank, scale, _sm_adapter(rank, kind))
        self._sync_evictions()
        assert slot not in self.present.values()
        self.present[key] = slot

    @precondition(lambda self: self.reservation is None)
    @rule(keys=st.lists(SM_KEYS, min_size=1, max_size=2, unique=True))
    def open_reservation(self, keys: list[str]) -> None:
        stack = contextlib.ExitStack()
        if any(k in self.present for k in keys):
            with pytest.raises(ValueError, match="already in the pool"):
                stack.enter_context(self.pool.reserve_many([(k, 2, 1.0) for k in keys]))
            return
        if self._capacity() < len(keys):
            before = self.pool.stats()
            with pytest.raises(PoolFullError):
                stack.enter_context(self.pool.reserve_many([(k, 2, 1.0) for k in keys]))
            assert self.pool.stats() == before  # all or none: nothing evicted for a reservation that cannot succeed
            return
        slots = stack.enter_context(self.pool.reserve_many([(k, 2, 1.0) for k in keys]))
        self.reservation = (stack, keys, slots)
        self._sync_evictions()
        assert not set(slots) & set(self.present.values())

    @precondition(lambda self: self.reservation is not None)
    @rule(how=st.sampled_from(["commit", "raise", "interrupt", "bad_write"]))
    def close_reservation(self, how: str) -> None:
        stack, keys, slots = self.reservation
        self.reservation = None
        if how == "commit":
            for s in slots:
                self.pool.write(s, _sm_adapter(2, "ok"))
            stack.close()
            self.present.update(zip(keys, slots))
            return
        with pytest.raises((RuntimeError, KeyboardInterrupt, ValueError)):
            with stack:
                if how == "raise":
                    raise RuntimeError("writer failed")
                if how == "interrupt":
                    raise KeyboardInterrupt
                self.pool.write(slots[0], _sm_adapter(2, "nan"))
        for k, s in zip(keys, slots):
            assert self.pool.slot_of(k) is None and self.pool.slot_info(s)["state"] == "free"

    @rule(key=SM_KEYS)
    def get(self, key: str) -> None:
        self.gets += 1
        assert self.pool.get(key) == self.present.get(key)

    @rule(key=SM_KEYS)
    def pin(self, key: str) -> None:
        if key in self.present:
            assert self.pool.pin(key) == self.present[key]
            self.pinned.add(key)
        elif self.reservation is None or key not in self.reservation[1]:
            with pytest.raises(KeyError):
                self.pool.pin(key)

    @rule(key=SM_KEYS)
    def unpin(self, key: str) -> None:
        if key in self.present:
            self.pool.unpin(key)
            self.pinned.discard(key)

    @rule(keys=st.lists(SM_KEYS, min_size=1, max_size=3))
    def hold(self, keys: list[str]) -> None:
        keys = [k for k in keys if k in self.present]
        if not keys:
            return
        stack = contextlib.ExitStack()
        stack.enter_context(self.pool.in_flight([self.present[k] for k in keys], keys=keys))
        self.holds.append((stack, {k: self.present[k] for k in keys}))

    @precondition(lambda self: self.holds)
    @rule(i=st.integers(0, 10))
    def release(self, i: int) -> None:
        stack, _ = self.holds.pop(i % len(self.holds))
        stack.close()

    @rule(key=SM_KEYS)
    def remove(self, key: str) -> None:
        if key not in self.present:
            return
        if key in self._protected():
            with pytest.raises(ValueError, match="cannot be removed"):
                self.pool.remove(key)
            return
        self.pool.remove(key)
        del self.present[key]

    # -- invariants --
    @invariant()
    def no_leaked_slots_and_stats_consistent(self) -> None:
        reserved = dict(zip(self.reservation[1], self.reservation[2])) if self.reservation else {}
        infos = [self.pool.slot_info(s) for s in range(self.pool.max_adapters)]
        for s, info in enumerate(infos):
            if info["state"] == "writing":
                assert s in reserved.values(), f"slot {s} left writing outside a reservation (leaked)"
            if info["state"] == "ready":
                assert self.present.get(info["key"]) == s
            if info["state"] == "free":
                assert info["key"] is None and not info["pinned"] and info["in_flight"] == 0
        for k, s in self.present.items():
            assert infos[s]["key"] == k and infos[s]["state"] == "ready"
        for k in self.pinned & set(self.present):
            assert infos[self.present[k]]["pinned"]
        refs: dict[int, int] = {}
        for _, ks in self.holds:
            for s in set(ks.values()):
                refs[s] = refs.get(s, 0) + 1
        for _, ks in self.holds:
            for k, s in ks.items():
                assert self.present.get(k) == s, f"{k} in flight but no longer at slot {s}"
        assert all(infos[s]["in_flight"] == n for s, n in refs.items())
        st_ = self.pool.stats()
        assert st_["used"] == len(self.present) + len(reserved)
        assert st_["pinned"] == sum(1 for i in infos if i["pinned"])
        assert st_["in_flight"] == len(refs)
        assert st_["hits"] + st_["misses"] == self.gets
        assert st_["evictions"] == self.evictions
        assert (self.pool.ranks == torch.tensor([i["rank"] for i in infos], dtype=torch.int32)).all()

    def teardown(self) -> None:
        if self.reservation is not None:
            self.reservation[0].close()
        for stack, _ in self.holds:
            stack.close()
        assert self.pool.stats()["in_flight"] == 0
        assert all(self.pool.slot_info(s)["state"] != "writing" for s in range(self.pool.max_adapters))


# HYPERLORA_FUZZ_EXAMPLES=10000 runs the long fuzz recorded in docs/RELIABILITY.md (random seed, a 10 s
# deadline per example so a hang fails); the suite runs 50 fixed examples.
_FUZZ = "HYPERLORA_FUZZ_EXAMPLES" in os.environ
PoolMachine.TestCase.settings = settings(max_examples=int(os.environ.get("HYPERLORA_FUZZ_EXAMPLES", "50")),
                                         stateful_step_count=40, deadline=10_000 if _FUZZ else None,
                                         derandomize=not _FUZZ, suppress_health_check=[HealthCheck.too_slow])
test_pool_state_machine = PoolMachine.TestCase
