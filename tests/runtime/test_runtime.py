"""hyperlora.attach / Runtime: drop-in layers, bitwise base behaviour, mixed batches, detach, errors."""
from __future__ import annotations

import importlib
import copy
import os
import sys

import pytest
import torch

from runtime_helpers import (ARCHS, default_types, forward_logits, hash_encoder, padded_batch, tiny_hypernet,  # noqa: E402
                             tiny_model)

import hyperlora  # noqa: E402
from hyperlora.runtime.layers import LoraLayerMixin  # noqa: E402

POLICIES = ["Refuse to discuss pricing.", "Answer in French.", "Escalate any mention of a data breach."]


def _attach(arch, **kw):
    model = tiny_model(arch)
    types = default_types(arch)
    hn = tiny_hypernet(model, types)
    kw.setdefault("apply_mode", "materialized")
    rt = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=8, max_rank=8, **kw)
    return model, hn, rt


# ---------------------------------------------------------------------------------------------
# base behaviour: names, bitwise outputs, detach
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_attach_keeps_state_dict_and_base_outputs_bitwise(arch):
    torch.manual_seed(0)
    model = tiny_model(arch)
    ids, mask, _ = padded_batch([7, 5, 7])
    before_sd = {k: v for k, v in model.state_dict().items()}
    before = forward_logits(model, ids, mask)
    hn = tiny_hypernet(model, default_types(arch))
    rt = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=4, max_rank=8)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraLayerMixin)]
    per_layer = len(default_types(arch)) + (1 if arch == "gpt2" else 0)  # GPT-2's c_proj: attn and mlp
    assert len(wrapped) == per_layer * 2  # every targeted module of both layers
    after_sd = model.state_dict()
    assert list(after_sd) == list(before_sd)
    for k in before_sd:
        assert after_sd[k].data_ptr() == before_sd[k].data_ptr(), k  # the very same tensors
    # no policies() context, and a context of all-None rows: bitwise the unattached model
    assert torch.equal(forward_logits(model, ids, mask), before)
    with rt.policies([None, None, None]):
        assert torch.equal(forward_logits(model, ids, mask), before)
    # a policy row changes its own row only; None rows stay bitwise
    with rt.policies([None, POLICIES[0], None]):
        mixed = forward_logits(model, ids, mask)
    assert torch.equal(mixed[0], before[0]) and torch.equal(mixed[2], before[2])
    assert (mixed[1] - before[1]).abs().max() > 1e-2  # the adapter really acts
    rt.detach()
    assert not any(isinstance(m, LoraLayerMixin) for m in model.modules())
    assert list(model.state_dict()) == list(before_sd)
    assert torch.equal(forward_logits(model, ids, mask), before)


def test_detach_restores_original_module_objects():
    model = tiny_model("llama")
    originals = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    rt = hyperlora.attach(model, target_modules=["q_proj", "down_proj"], max_adapters=2, max_rank=4)
    assert all(type(model.get_submodule(n)).__name__ == "LoraLinear" for n in originals)
    assert isinstance(model.get_submodule(next(iter(originals))), torch.nn.Linear)  # still a Linear
    rt.detach()
    for n, m in originals.items():
        assert model.get_submodule(n) is m
    with pytest.raises(RuntimeError, match="detached"):
        rt.policies([None])
    rt.detach()  # idempotent


def test_model_to_while_attached_is_seen_after_detach():
    model = tiny_model("llama")
    ids, mask, _ = padded_batch([6, 6])
    rt = hyperlora.attach(model, target_modules=["q_proj"], max_adapters=2, max_rank=4)
    model.to(torch.float64)
    out_attached = forward_logits(model, ids, mask)
    rt.detach()
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float64
    assert torch.equal(forward_logits(model, ids, mask), out_attached)


# ---------------------------------------------------------------------------------------------
# mixed batches
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_each_row_alone(arch):
    torch.manual_seed(1)
    model, hn, rt = _attach(arch)
    lengths = [9, 4, 9, 6, 7]
    entries = [POLICIES[0], None, POLICIES[1], POLICIES[0], POLICIES[2]]
    ids, mask, rows = padded_batch(lengths)
    with rt.policies(entries):
        batched = forward_logits(model, ids, mask)
    assert rt.stats()["generations"] == 3  # three distinct texts, generated once each
    for i, (row, pol) in enumerate(zip(rows, entries)):
        with rt.policies([pol]):
            alone = forward_logits(model, row[None], torch.ones_like(row)[None])[0]
        n = lengths[i]
        torch.testing.assert_close(batched[i, -n:], alone, rtol=1e-5, atol=1e-5)
    assert rt.stats()["generations"] == 3  # the alone runs hit the cache


def _merged_copy(model, hn, policy, dtype=torch.float64):
    """A copy of `model` with the policy's adapter merged into its weights: W' = W + scale * B @ A (float64)."""
    from hyperlora.runtime.layers import Conv1D

    merged = copy.deepcopy(model).to(dtype)
    emb = hash_encoder([policy]).to(dtype)
    hn64 = copy.deepcopy(hn).to(dtype)
    with torch.no_grad():
        for mtype, (a, b) in hn64.generate(emb).items():
            for li, name in enumerate(hn64.module_names(mtype)):
                delta = hn64.config.scale * b[0, li] @ a[0, li]  # [d_out, d_in]
                mod = merged.get_submodule(name)
                if Conv1D is not None and isinstance(mod, Conv1D):
                    mod.weight += delta.T
                else:
                    mod.weight += delta
    return merged


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_runtime_matches_merged_weights_float64_oracle(arch):
    torch.manual_seed(2)
    model, hn, rt = _attach(arch)
    ids, mask, _ = padded_batch([8, 8, 8])
    rt.detach()
    oracle = [forward_logits(_merged_copy(model, hn, p), ids[i:i + 1], mask[i:i + 1])[0] for i, p in
              enumerate(POLICIES)]
    base64 = forward_logits(copy.deepcopy(model).to(torch.float64), ids, mask)
    rt = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=8, max_rank=8, apply_mode="materialized")
    with rt.policies(POLICIES):
        got = forward_logits(model, ids, mask)
    for i in range(3):
        assert (oracle[i] - base64[i]).abs().max() > 1e-2  # the oracle's adapter is not a no-op
        torch.testing.assert_close(got[i].double(), oracle[i], rtol=1e-4, atol=1e-4)


def test_metadata_built_once_per_forward_and_shared():
    md = importlib.import_module("hyperlora.ops.metadata")

    model, hn, rt = _attach("llama")
    calls = []
    real = md.build_meta

    def counting(*a, **k):
        calls.append(a[0].shape[0])
        return real(*a, **k)

    ids, mask, _ = padded_batch([5, 5, 5])
    md.build_meta = counting
    try:
        with rt.policies([POLICIES[0], None, POLICIES[1]]) as batch:
            forward_logits(model, ids, mask)
            assert calls == [15]  # 14 layers, one metadata build: 3 rows x 5 tokens
            forward_logits(model, ids, mask)
            assert calls == [15]  # same shape again: reused
            assert batch.meta_builds == 1
    finally:
        md.build_meta = real


def test_policies_context_holds_slots_in_flight_and_releases():
    model, hn, rt = _attach("llama")
    with rt.policies([POLICIES[0], POLICIES[1], None]) as batch:
        slots = [s for s in batch.row_slots.tolist() if s >= 0]
        assert all(rt.pool.in_flight_count(s) == 1 for s in slots)
        with rt.policies([POLICIES[0]]):  # nested / overlapping batches ref-count
            assert rt.pool.in_flight_count(slots[0]) == 2
        with pytest.raises(ValueError, match="cannot be removed"):
            rt.pool.remove(rt.pool.key_of(slots[0]))
    assert all(rt.pool.in_flight_count(s) == 0 for s in slots)


def test_same_text_new_hypernet_weights_regenerates():
    model, hn, rt = _attach("llama")
    ids, mask, _ = padded_batch([6])
    with rt.policies([POLICIES[0]]):
        first = forward_logits(model, ids, mask)
    with torch.no_grad():
        hn.head("q_proj")[1].mul_(2.0)  # a changed hypernetwork must never reuse the stale adapter
    with rt.policies([POLICIES[0]]):
        second = forward_logits(model, ids, mask)
    assert rt.stats()["generations"] == 2
    assert not torch.allclose(first, second)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def test_errors_are_clear():
    model, hn, rt = _attach("llama")
    ids, mask, _ = padded_batch([4, 4])
    with pytest.raises(ValueError, match="2 rows"):
        with rt.policies([POLICIES[0], None, None]):
            forward_logits(model, ids, mask)
    with pytest.raises(TypeError, match="one entry"):
        rt.policies("a single string")
    with pytest.raises(TypeError, match=r"policies\[1\]"):
        with rt.policies([None, 3]):
            pass
    with pytest.raises(ValueError, match="empty"):
        with rt.policies(["   "]):
            pass
    with pytest.raises(ValueError, match="already served"):
        hyperlora.attach(model, target_modules=["q_proj"])
    with rt.policies([None, None]):
        with pytest.raises(RuntimeError, match="exit the context"):
            rt.detach()
    rt.detach()
    with pytest.raises(ValueError, match="apply_mode"):
        hyperlora.attach(model, apply_mode="fast")
    with pytest.raises(ValueError, match="match no module"):
        hyperlora.attach(model, target_modules=["qkv_proj"])
    with pytest.raises(ValueError, match="leave out"):
        hyperlora.attach(model, hn, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="max_rank"):
        hyperlora.attach(model, hn, max_rank=2)
    rt2 = hyperlora.attach(model, target_modules=["q_proj"], max_adapters=2, max_rank=4)
    with pytest.raises(ValueError, match="no hypernetwork"):
        with rt2.policies(["a policy text"]):
            pass
    rt2.detach()


def test_pool_full_of_in_flight_slots_raises_and_leaves_batch_intact():
    from hyperlora import PoolFullError

    model = tiny_model("llama")
    hn = tiny_hypernet(model, ["q_proj", "v_proj"])
    rt = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=2, max_rank=4, apply_mode="materialized")
    ids, mask, _ = padded_batch([5, 5])
    with rt.policies(POLICIES[:2]):
        before = forward_logits(model, ids, mask)
        with pytest.raises(PoolFullError, match="in-flight"):
            rt.prepare([POLICIES[2]])
        assert torch.equal(forward_logits(model, ids, mask), before)
    with pytest.raises(PoolFullError):
        with rt.policies(POLICIES):  # three distinct adapters cannot share two slots
            pass
    assert rt.pool.stats()["in_flight"] == 0
    rt.prepare([POLICIES[2]])  # after the batch: evicts one LRU adapter
    assert rt.pool.stats()["evictions"] == 1


# ---------------------------------------------------------------------------------------------
# apply modes: the latent path (issue 7) against the materialized one
# ---------------------------------------------------------------------------------------------

def test_latent_mode_matches_materialized_and_peft_rows_fall_back(tmp_path, monkeypatch):
    import importlib

    from runtime_helpers import make_peft_dir

    # the layers call the ops through the names they imported: count the calls there
    add_mod = lat_mod = importlib.import_module("hyperlora.runtime.layers")
    model = tiny_model("llama")
    peft_dir = make_peft_dir(model, tmp_path / "p", targets=("q_proj", "v_proj"))
    hn = tiny_hypernet(model, default_types("llama"))
    ids, mask, _ = padded_batch([6, 4, 6, 5])
    results, calls = {}, {}
    for mode in ("materialized", "latent"):
        rt = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=8, max_rank=8, apply_mode=mode)
        peft = rt.load_peft(peft_dir)
        counts = {"latent": 0, "add": 0}
        real_lat, real_add = lat_mod.latent_lora, add_mod.add_lora

        def lat(*a, **k):
            counts["latent"] += 1
            return real_lat(*a, **k)

        def add(*a, **k):
            counts["add"] += 1
            return real_add(*a, **k)

        monkeypatch.setattr(lat_mod, "latent_lora", lat)
        monkeypatch.setattr(add_mod, "add_lora", add)
        with rt.policies([POLICIES[0], None, POLICIES[1], peft]):
            results[mode] = forward_logits(model, ids, mask)
        monkeypatch.setattr(lat_mod, "latent_lora", real_lat)
        monkeypatch.setattr(add_mod, "add_lora", real_add)
        calls[mode] = counts
        rt.detach()
    n_layers = 14
    assert calls["materialized"] == {"latent": 0, "add": n_layers}
    # latent: every layer runs the latent op for the generated rows and add_lora for the PEFT row
    assert calls["latent"] == {"latent": n_layers, "add": n_layers}
    torch.testing.assert_close(results["latent"], results["materialized"], rtol=1e-4, atol=1e-4)
    assert torch.equal(results["latent"][1], results["materialized"][1])


def test_concurrent_threads_each_see_their_own_batch():
    import threading

    model, hn, rt = _attach("llama")
    ids, mask, _ = padded_batch([6, 6])
    plans = [[POLICIES[0], None], [None, POLICIES[1]], [POLICIES[2], POLICIES[0]]]
    expected = []
    for p in plans:
        with rt.policies(p):
            expected.append(forward_logits(model, ids, mask))
    got: dict[int, list] = {i: [] for i in range(len(plans))}
    errors = []

    def worker(i):
        try:
            for _ in range(3):
                with rt.policies(plans[i]):
                    got[i].append(forward_logits(model, ids, mask))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, outs in got.items():
        for out in outs:
            torch.testing.assert_close(out, expected[i], rtol=1e-5, atol=1e-5)
    assert rt.pool.stats()["in_flight"] == 0
