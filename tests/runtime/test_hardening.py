"""Runtime hardening (issue 19 rows 1, 4, 8, 9, 11, 13, 16, 18): each test fails on the code before the fix.

Row 1: an adapter whose B overflows only after its scale leaves no name and no slot behind.
Row 4: detach() from another thread while a batch is open is refused.
Row 8: a mistyped, unloaded or single-word adapter name is never generated as a policy text.
Row 9: a second, different adapter under a loaded name is refused unless replace=True.
Row 11: a policy's adapter is bitwise the same whatever it is generated with.
Row 13: a lone surrogate is a ValueError naming the entry.
Row 16: export_peft validates its policy like policies().
Row 18: policies() with fewer entries than batch rows is an error even when every entry is None.
"""
from __future__ import annotations

import threading

import pytest
import torch

from runtime_helpers import (default_types, forward_logits, hash_encoder, make_peft_dir, padded_batch, tiny_hypernet,
                             tiny_model)

import hyperlora
from hyperlora.adapters.pool import AdapterPool

POLICIES = ["Refuse to discuss pricing.", "Answer in French.", "Escalate any mention of a data breach."]


def _rt(max_adapters: int = 8, **kw):
    model = tiny_model("llama")
    hn = tiny_hypernet(model, ["q_proj", "v_proj"])
    kw.setdefault("apply_mode", "materialized")
    rt = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=max_adapters, max_rank=8, **kw)
    return model, hn, rt


def _slot_tensors(pool: AdapterPool, slot: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {t: (pool.buffers(t)[0][:, slot].clone(), pool.buffers(t)[1][:, slot].clone()) for t in pool.module_types()}


def _pool_state(pool: AdapterPool) -> list[dict]:
    return [pool.slot_info(s) for s in range(pool.max_adapters)]


# ---- row 1: overflow after scaling --------------------------------------------------------------

def test_peft_b_overflowing_after_alpha_scaling_registers_nothing_and_holds_no_slot(tmp_path):
    model, hn, rt = _rt(max_adapters=2)
    good = rt.load_peft(make_peft_dir(model, tmp_path / "good", r=4, alpha=8.0))
    bad = make_peft_dir(model, tmp_path / "bad", r=4, alpha=1e308)  # finite B, B * alpha / r = inf
    stats_before, slots_before = rt.pool.stats(), _pool_state(rt.pool)
    for name in ("bad1", "bad2"):  # two such uploads on a 2-slot pool used to leave every slot "writing"
        with pytest.raises(ValueError, match="overflow|NaN or Inf"):
            rt.load_peft(bad, name=name)
    assert rt.peft_names == [good]
    assert _pool_state(rt.pool) == slots_before  # the good adapter was not evicted: validation came first
    assert rt.pool.stats() == stats_before
    assert all(rt.pool.slot_info(s)["state"] != "writing" for s in range(2))
    with rt.policies([good, POLICIES[0]]):  # both slots usable: no PoolFullError
        pass
    rt.prepare(POLICIES[1:])
    assert rt.pool.stats()["used"] == 2


def test_fp16_pool_refuses_b_overflowing_after_its_scale():
    model, hn, rt = _rt(max_adapters=2, dtype=torch.float16)
    q = "model.layers.0.self_attn.q_proj"
    mods = {q: (torch.ones(4, 48) * 0.01, torch.full((48, 4), 3e4))}  # 3e4 * 16 > fp16 max 65504
    before = _pool_state(rt.pool)
    with pytest.raises(ValueError, match="overflow"):
        rt.add_adapter("loud", mods, scale=16.0)
    assert rt.peft_names == [] and _pool_state(rt.pool) == before
    assert not torch.isinf(rt.pool.buffers("q_proj")[1]).any()


def test_pool_put_of_an_overflowing_adapter_evicts_nothing():
    pool = AdapterPool({"a.q_proj": (4, 4)}, max_adapters=1, max_rank=2, dtype=torch.float16)
    ok = {"a.q_proj": (torch.ones(2, 4), torch.ones(4, 2))}
    slot = pool.put("good", 2, 1.0, ok)
    with pytest.raises(ValueError, match="overflows"):
        pool.put("bad", 2, 16.0, {"a.q_proj": (torch.ones(2, 4), torch.full((4, 2), 3e4))})
    assert pool.get("good") == slot and pool.stats()["evictions"] == 0 and pool.stats()["used"] == 1


# ---- row 4: detach from another thread ----------------------------------------------------------

def test_detach_from_another_thread_during_a_batch_is_refused_and_the_batch_keeps_its_adapter():
    model, hn, rt = _rt()
    ids, mask, _ = padded_batch([5, 5])
    with rt.policies([POLICIES[0], None]):
        expected = forward_logits(model, ids, mask)
    inside, release = threading.Event(), threading.Event()
    got: dict[str, torch.Tensor] = {}

    def serve():
        with rt.policies([POLICIES[0], None]):
            inside.set()
            release.wait(30)
            got["out"] = forward_logits(model, ids, mask)

    t = threading.Thread(target=serve)
    t.start()
    assert inside.wait(30)
    try:
        with pytest.raises(RuntimeError, match="other threads"):
            rt.detach()
        assert rt.attached
    finally:
        release.set()
        t.join()
    assert torch.equal(got["out"], expected)
    rt.detach()  # allowed once the batch has finished
    assert not rt.attached


# ---- row 8: names and texts cannot be confused ----------------------------------------------------

def test_mistyped_or_unloaded_adapter_names_are_never_generated(tmp_path):
    model, hn, rt = _rt()
    good = rt.load_peft(make_peft_dir(model, tmp_path / "good"))
    assert good == "good"
    with pytest.raises(KeyError, match="close to"):
        rt.prepare(["goood"])
    with pytest.raises(KeyError, match="single word"):
        rt.prepare(["legal"])
    rt.unload_peft("good")
    with pytest.raises(KeyError, match="unloaded"):
        rt.prepare(["good"])
    with pytest.raises(KeyError, match="unloaded"):
        rt.export_peft("good", tmp_path / "x")
    assert rt.pool.stats()["generations"] == 0
    rt.prepare(["Answer only in French.", "请只用中文回答。"])  # policy texts still are (no spaces in Chinese)
    assert rt.pool.stats()["generations"] == 2


# ---- row 9: one name, one adapter -----------------------------------------------------------------

def test_a_second_adapter_under_a_loaded_name_is_refused_unless_replace(tmp_path):
    model, hn, rt = _rt()
    ids, mask, _ = padded_batch([5])
    d1 = make_peft_dir(model, tmp_path / "a" / "legal", seed=3)
    d2 = make_peft_dir(model, tmp_path / "b" / "legal", seed=4)  # same basename, different weights
    assert rt.load_peft(d1) == "legal"
    with rt.policies(["legal"]):
        first = forward_logits(model, ids, mask)
    with pytest.raises(ValueError, match="already loaded"):
        rt.load_peft(d2)
    with rt.policies(["legal"]):
        assert torch.equal(forward_logits(model, ids, mask), first)  # still the first adapter
    assert rt.load_peft(d1) == "legal"  # the same adapter again: a no-op
    assert rt.load_peft(d2, replace=True) == "legal"
    with rt.policies(["legal"]):
        second = forward_logits(model, ids, mask)
    assert not torch.equal(second, first)
    assert rt.stats()["peft_adapters"] == 1


# ---- row 11: batch-invariant generation -----------------------------------------------------------

def test_a_policy_alone_and_batched_with_others_gives_bitwise_equal_adapters():
    _, _, alone = _rt()
    _, _, mixed = _rt()
    s_alone = alone.prepare([POLICIES[0]])[0]
    s_mixed = mixed.prepare([POLICIES[1], POLICIES[0], POLICIES[2], "Reply in one sentence only."])[1]
    assert alone.pool.key_of(s_alone) == mixed.pool.key_of(s_mixed)  # same content key ...
    a, b = _slot_tensors(alone.pool, s_alone), _slot_tensors(mixed.pool, s_mixed)
    for t in a:  # ... and the same bits
        assert torch.equal(a[t][0], b[t][0]) and torch.equal(a[t][1], b[t][1]), t


# ---- row 13: lone surrogates ----------------------------------------------------------------------

def test_a_lone_surrogate_is_a_value_error_naming_the_entry():
    _, _, rt = _rt()
    with pytest.raises(ValueError, match=r"policies\[1\].*surrogate.*character 7"):
        rt.prepare([POLICIES[0], "Refuse \ud800 to discuss pricing."])
    assert rt.pool.stats()["used"] == 0  # checked before anything was generated
    with pytest.raises(ValueError, match="surrogate"):
        AdapterPool.content_key("hn", "bad \udfff text", 4, 1.0)


# ---- row 16: export_peft validates its policy -----------------------------------------------------

@pytest.mark.parametrize("policy,err,match", [("", ValueError, "empty"), ("   ", ValueError, "empty"),
                                              (None, ValueError, "not None"), (3, TypeError, "policy text")])
def test_export_peft_validates_the_policy_like_policies(tmp_path, policy, err, match):
    _, _, rt = _rt()
    out = tmp_path / "exported"
    with pytest.raises(err, match=match):
        rt.export_peft(policy, out)
    assert not out.exists()


# ---- row 18: one entry per row --------------------------------------------------------------------

def test_fewer_entries_than_rows_is_an_error_even_when_all_are_none():
    model, _, rt = _rt()
    ids, mask, _ = padded_batch([4, 4, 4, 4])
    with pytest.raises(ValueError, match="1 entries"):
        with rt.policies([None]):
            forward_logits(model, ids, mask)
    with rt.policies([None] * 4):  # the right count is fine, and bitwise the base model
        out = forward_logits(model, ids, mask)
    rt.detach()
    assert torch.equal(out, forward_logits(model, ids, mask))


# ---- unload_peft, attached, is_pinned ------------------------------------------------------------

def test_unload_peft_frees_the_slot_unless_a_batch_holds_it(tmp_path):
    model, _, rt = _rt()
    d = make_peft_dir(model, tmp_path / "p")
    name = rt.load_peft(d)
    key = rt._peft[name].key
    assert key in rt.pool and rt.pool.stats()["used"] == 1
    rt.unload_peft(name)
    assert key not in rt.pool and rt.pool.stats()["used"] == 0 and rt.peft_names == []
    with pytest.raises(KeyError, match="no PEFT adapter named"):
        rt.unload_peft(name)
    name = rt.load_peft(d)  # a name can be loaded again after unloading
    with rt.policies([name]):
        rt.unload_peft(name)  # held by the batch: not freed now ...
        assert key in rt.pool
    rt.prepare(POLICIES)
    assert rt.pool.stats()["used"] == 4  # ... but evictable like any other slot afterwards


def test_attached_follows_attach_and_detach():
    model, _, rt = _rt()
    assert rt.attached
    rt.detach()
    assert not rt.attached
    with pytest.raises(RuntimeError, match="detached"):
        rt.prepare([POLICIES[0]])


def test_is_pinned_and_pinned_slots_survive_eviction():
    _, _, rt = _rt(max_adapters=2)
    s0 = rt.prepare([POLICIES[0]])[0]
    k0 = rt.pool.key_of(s0)
    assert not rt.pool.is_pinned(k0)
    rt.pool.pin(k0)
    assert rt.pool.is_pinned(k0) and rt.pool.slot_info(s0)["pinned"]
    rt.prepare([POLICIES[1]])
    rt.prepare([POLICIES[2]])  # evicts POLICIES[1], never the pinned one
    assert rt.pool.key_of(s0) == k0 and rt.pool.stats()["evictions"] == 1
    rt.pool.unpin(k0)
    assert not rt.pool.is_pinned(k0)
    assert not rt.pool.is_pinned("no such key")
