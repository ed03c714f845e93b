"""`hyperlora.integrations.vllm` without vLLM: the adapter cache (one export per content key, the pool's key, stable
ids, LRU eviction deletes the directory), its exports load in PEFT and reproduce the runtime, the parity settings,
and the errors. The real engine is `tests/integrations/test_vllm.py` (`make test-vllm`)."""
from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from runtime_helpers import forward_logits, hash_encoder, padded_batch, tiny_hypernet, tiny_model

import hyperlora
from hyperlora.adapters.peft_io import read_peft, vllm_problems, vllm_rank
from hyperlora.hypernets.limits import PolicyTooLongError
from hyperlora.integrations import vllm as hv
from hyperlora.integrations.vllm import VLLMAdapterCache, vllm_settings

P = ["Answer 'escalate' if the ticket reports a security problem.",
     "Route refund questions to billing and the rest to support.",
     "Start every reply with the word Noted.",
     "Answer review for expenses over 500 dollars."]
TYPES = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def rt():
    model = tiny_model("llama")
    hn = tiny_hypernet(model, TYPES, rank=4)
    r = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=8, max_rank=16, apply_mode="materialized")
    yield r
    if r.attached:
        r.detach()


@pytest.fixture
def cache(rt, tmp_path):
    c = VLLMAdapterCache(rt, tmp_path / "adapters", max_adapters=2)
    yield c
    c.close()


def _files(d):
    return {p.name: (p.read_bytes(), p.stat().st_ino) for p in sorted(d.iterdir())}


def test_same_text_same_dir_and_id_exported_once(cache, rt, monkeypatch):
    calls = []
    real = rt.export_peft
    monkeypatch.setattr(rt, "export_peft", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    a = cache.adapter(P[0])
    before = _files(a.path)
    b = cache.adapter(P[0])
    assert b == a and calls == [P[0]] and _files(a.path) == before
    assert a.key == rt._policy_key(P[0])  # the runtime pool's own content key, not a second definition
    assert a.path.name == a.key and a.path.parent == cache.root
    assert a.lora_int_id == hv.lora_int_id(a.key) and 1 <= a.lora_int_id < 2**31
    c = cache.adapter(P[1])
    assert c.key != a.key and c.path != a.path and c.lora_int_id != a.lora_int_id and c.lora_name != a.lora_name
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 2 and len(cache) == 2
    assert P[0] in cache and "not cached at all here" not in cache
    # the id is a pure function of the key: another cache (another process) gives the same one
    with VLLMAdapterCache(rt, max_adapters=2) as other:
        assert other.adapter(P[0]).lora_int_id == a.lora_int_id


def test_lru_eviction_deletes_the_directory_and_ids_stay(cache):
    a0, a1 = cache.adapter(P[0]), cache.adapter(P[1])
    cache.adapter(P[0])  # P[0] is now the most recent: P[1] goes first
    a2 = cache.adapter(P[2])
    assert not a1.path.exists() and a0.path.is_dir() and a2.path.is_dir()
    assert P[1] not in cache and len(cache) == 2 and cache.stats()["evictions"] == 1
    back = cache.adapter(P[1])  # re-exported, same key, same id, same place
    assert back == a1 and back.path.is_dir() and not a0.path.exists()
    assert sorted(p.name for p in cache.root.iterdir()) == sorted([a2.key, a1.key])  # no temporary leftovers
    assert cache.evict(P[1]) and not a1.path.exists() and not cache.evict(P[1])
    root = cache.root
    cache.close()
    assert root.is_dir() and not any(root.iterdir())  # a root the caller gave is emptied, not removed


def test_default_root_is_tmpfs_and_close_removes_it(rt):
    with VLLMAdapterCache(rt) as c:
        root = c.root
        c.adapter(P[0])
        assert root.is_dir()
        if sys.platform.startswith("linux"):
            assert root.parent.as_posix() == "/dev/shm"
    assert not root.exists()


def test_exports_are_peft_adapters_that_reproduce_the_runtime(cache, rt):
    from peft import PeftModel

    a = cache.adapter(P[3])
    assert vllm_problems(a.path) == []
    model = rt.model
    ids, mask, _ = padded_batch([6, 6])
    with rt.policies([P[3], P[3]]):
        ours = forward_logits(model, ids, mask)
    rt.detach()  # the plain model again, for PEFT to wrap
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(a.path)).eval()
    # float32, but PEFT computes x@A then @B per module while the runtime runs its fused multi-adapter op: the
    # summation order differs, so logits agree to float32 rounding through the layers (as in tests/runtime/test_peft.py)
    torch.testing.assert_close(forward_logits(pm, ids, mask), ours, rtol=1e-4, atol=1e-4)
    ad = read_peft(a.path, targets={n: s for n, s in rt.hypernet.targets().items()}, max_rank=16)
    assert set(ad.modules) == set(rt.hypernet.targets())


def test_settings_for_exact_parity(rt):
    s = vllm_settings(rt, max_loras=4, model="/models/x")
    names = [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.qkv_proj")]
    assert s == {"model": "/models/x", "dtype": "float32", "enable_lora": True, "max_lora_rank": vllm_rank(4),
                 "max_loras": 4, "lora_target_modules": sorted(names)}
    assert vllm_settings(rt.hypernet, per_layer=False)["lora_target_modules"] == sorted(TYPES)
    assert hv.vllm_module_name("model.layers.3.mlp.up_proj") == "model.layers.3.mlp.gate_up_proj"
    assert hv.vllm_module_name("model.layers.3.self_attn.o_proj") == "model.layers.3.self_attn.o_proj"
    with pytest.raises(ValueError, match="max_loras"):
        vllm_settings(rt, max_loras=0)


def test_request_builds_a_lora_request(cache, monkeypatch):
    made = []

    class LoRARequest:  # vLLM's signature: LoRARequest(lora_name, lora_int_id, lora_path)
        def __init__(self, lora_name, lora_int_id, lora_path):
            made.append((lora_name, lora_int_id, lora_path))

    mod = types.ModuleType("vllm.lora.request")
    mod.LoRARequest = LoRARequest
    for name in ("vllm", "vllm.lora"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", mod)
    reqs = cache.requests([P[0], None, P[1], P[0]])
    assert reqs[1] is None and reqs[0] is reqs[3] and len(made) == 2
    a = cache.adapter(P[0])
    assert made[0] == (a.lora_name, a.lora_int_id, str(a.path))
    with pytest.raises(ValueError, match="3 distinct policies in one batch but max_adapters=2"):
        cache.requests(P[:3])


def test_request_without_vllm_says_so(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError):
        cache.request(P[0])
    assert P[0] not in cache  # nothing exported for nothing


def test_errors_come_from_the_existing_checks_before_any_export(cache, rt, monkeypatch):
    with pytest.raises(ValueError, match="empty or whitespace"):
        cache.adapter("   ")
    with pytest.raises(ValueError, match="lone surrogate"):
        cache.adapter("bad \ud800 text here")
    with pytest.raises(TypeError, match="policy text"):
        cache.adapter(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"policies\[1\]"):
        cache.requests([P[0], 7])

    def too_long(text):
        if text == P[1]:
            raise PolicyTooLongError("policy text has 2000 tokens, more than the 1024 this hypernetwork reads")

    monkeypatch.setattr(rt.hypernet, "check_policy", too_long)
    with pytest.raises(PolicyTooLongError, match="2000 tokens"):
        cache.requests([P[0], P[1]])
    assert len(cache) == 0 and not any(cache.root.iterdir())  # P[0] was not exported either
    with pytest.raises(PolicyTooLongError):
        cache.adapter(P[1])
    assert len(cache) == 0


def test_refuses_peft_names_and_runtimes_without_a_hypernetwork(cache, rt, tmp_path):
    name = rt.add_adapter("ticket-lora", {n: (torch.randn(2, i), torch.randn(o, 2))
                                          for n, (i, o) in rt.hypernet.targets().items()})
    with pytest.raises(ValueError, match="name of a PEFT adapter"):
        cache.adapter(name)
    bare = hyperlora.attach(tiny_model("llama", seed=4), None, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="without a hypernetwork"):
        VLLMAdapterCache(bare)
    with pytest.raises(TypeError, match="Runtime"):
        VLLMAdapterCache(rt.hypernet)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_adapters"):
        VLLMAdapterCache(rt, tmp_path / "x", max_adapters=0)


def test_an_id_collision_never_hands_one_id_to_two_keys(cache, monkeypatch):
    monkeypatch.setattr(hv, "lora_int_id", lambda key: 7)
    a, b = cache.adapter(P[0]), cache.adapter(P[1])
    assert (a.lora_int_id, b.lora_int_id) == (7, 8)
    cache.adapter(P[2])  # evicts P[0]
    assert P[0] not in cache
    assert cache.adapter(P[1]).lora_int_id == 8 and cache.adapter(P[0]).lora_int_id == 7
