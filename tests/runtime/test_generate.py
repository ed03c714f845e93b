"""Runtime.generate: greedy / sampled decoding with left padding and a KV cache, row by row equal to running
alone, and adapters loaded / evicted while a generation is in flight (vLLM #47724's bug class)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from runtime_helpers import (ARCHS, default_types, hash_encoder, padded_batch, tiny_hypernet,  # noqa: E402
                             tiny_model)

import hyperlora  # noqa: E402

POLICIES = ["Always answer in haiku.", "Never reveal account numbers.", "Flag transfers over $10k."]


def _rt(arch, **kw):
    model = tiny_model(arch)
    hn = tiny_hypernet(model, default_types(arch), b_std=0.3)
    kw.setdefault("max_adapters", 8)
    return model, hyperlora.attach(model, hn, encoder=hash_encoder, max_rank=8, apply_mode="materialized", **kw)


def _alone(rt, row, pol, n, **kw):
    out = rt.generate(input_ids=row[None], attention_mask=torch.ones_like(row)[None], policies=[pol],
                      max_new_tokens=n, **kw)
    return out[0, row.numel():]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_equals_each_row_alone(arch):
    torch.manual_seed(0)
    model, rt = _rt(arch)
    lengths = [6, 3, 6, 5]
    entries = [POLICIES[0], None, POLICIES[1], POLICIES[0]]
    ids, mask, rows = padded_batch(lengths, seed=11)
    n = 8
    out = rt.generate(input_ids=ids, attention_mask=mask, policies=entries, max_new_tokens=n)
    assert out.shape == (4, ids.shape[1] + n)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    for i, (row, pol) in enumerate(zip(rows, entries)):
        assert torch.equal(out[i, ids.shape[1]:], _alone(rt, row, pol, n)), f"row {i} ({pol})"
    # the policy rows really decode differently from the base model on the same prompt
    base = rt.generate(input_ids=ids, attention_mask=mask, policies=[None] * 4, max_new_tokens=n)
    assert not torch.equal(base[[0, 2, 3]], out[[0, 2, 3]])
    assert torch.equal(base[1], out[1])
    assert rt.pool.stats()["in_flight"] == 0


def test_generate_matches_hf_generate_for_base_rows():
    model, rt = _rt("llama")
    ids, mask, _ = padded_batch([5, 5], seed=3)
    ours = rt.generate(input_ids=ids, attention_mask=mask, policies=[None, None], max_new_tokens=6)
    rt.detach()
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, hf)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sampled_generate_equals_each_row_alone(arch):
    model, rt = _rt(arch)
    lengths = [4, 7, 5]
    entries = [POLICIES[2], POLICIES[0], None]
    ids, mask, rows = padded_batch(lengths, seed=12)
    kw = dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.95)
    out = rt.generate(input_ids=ids, attention_mask=mask, policies=entries, max_new_tokens=7, seed=[1, 2, 3], **kw)
    for i, (row, pol) in enumerate(zip(rows, entries)):
        assert torch.equal(out[i, ids.shape[1]:], _alone(rt, row, pol, 7, seed=i + 1, **kw)), f"row {i}"
    again = rt.generate(input_ids=ids, attention_mask=mask, policies=entries, max_new_tokens=7, seed=[1, 2, 3], **kw)
    assert torch.equal(out, again)
    other = rt.generate(input_ids=ids, attention_mask=mask, policies=entries, max_new_tokens=7, seed=[4, 5, 6], **kw)
    assert not torch.equal(out, other)  # the seeds matter: sampling is really random


def test_generate_eos_pads_finished_rows():
    model, rt = _rt("llama")
    ids, mask, rows = padded_batch([5, 5], seed=4)
    free = rt.generate(input_ids=ids, attention_mask=mask, policies=[POLICIES[0], None], max_new_tokens=6)
    eos = int(free[0, 5 + 1])  # row 0's second new token becomes the EOS
    out = rt.generate(input_ids=ids, attention_mask=mask, policies=[POLICIES[0], None], max_new_tokens=6,
                      eos_token_id=eos, pad_token_id=-1)
    first = int((out[0, 5:] == eos).nonzero()[0])
    assert torch.equal(out[0, 5:5 + first + 1], free[0, 5:5 + first + 1])
    assert bool((out[0, 5 + first + 1:] == -1).all())


def test_generate_rejects_right_padding_and_bad_args():
    model, rt = _rt("llama")
    ids, mask, _ = padded_batch([3, 5])
    with pytest.raises(ValueError, match="left padding"):
        rt.generate(input_ids=ids, attention_mask=mask.flip(1), policies=[None, None], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        rt.generate(input_ids=ids, attention_mask=mask, policies=[None, None], max_new_tokens=-1)
    with pytest.raises(ValueError, match="seed"):
        rt.generate(input_ids=ids, attention_mask=mask, policies=[None, None], do_sample=True, seed=[1, 2, 3])
    with pytest.raises(ValueError, match="2 rows"):
        rt.generate(input_ids=ids, attention_mask=mask, policies=[None], max_new_tokens=2)
    with pytest.raises(ValueError, match="2 rows"):
        rt.generate(input_ids=ids, attention_mask=mask, policies=[POLICIES[0]], max_new_tokens=2)


def test_metadata_built_once_for_prefill_and_once_for_all_decode_steps():
    model, rt = _rt("llama")
    ids, mask, _ = padded_batch([4, 6])
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a: seen.append(rt.state.batch.meta_builds))
    try:
        rt.generate(input_ids=ids, attention_mask=mask, policies=[POLICIES[0], None], max_new_tokens=5)
    finally:
        hook.remove()
    # before the prefill no metadata; every decode step finds the prefill's and the one decode build
    assert seen == [0, 1, 2, 2, 2]


# ---------------------------------------------------------------------------------------------
# churn: the pool changes under a running generation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_churn_during_generation_never_changes_the_batch(arch, tmp_path):
    from runtime_helpers import make_peft_dir

    torch.manual_seed(3)
    model, rt = _rt(arch, max_adapters=4)
    targets = ("q_proj", "v_proj") if arch != "gpt2" else ("c_attn",)
    peft_dirs = [make_peft_dir(model, tmp_path / f"p{i}", targets=targets, seed=20 + i) for i in range(3)]
    ids, mask, rows = padded_batch([5, 6, 4], seed=8)
    entries = [POLICIES[0], None, POLICIES[1]]
    n = 6
    reference = rt.generate(input_ids=ids, attention_mask=mask, policies=entries, max_new_tokens=n)

    # Evict the batch's adapters from the pool before the run, so the run regenerates them and they
    # are the youngest entries: churn then has to work around in-flight slots only.
    churn_texts = iter(f"churn policy {i}" for i in range(1000))
    events = {"steps": 0, "loaded": 0, "refused": 0}

    def churn(module, args):
        events["steps"] += 1
        batch = rt.state.batch
        held = {s for s in batch.row_slots.tolist() if s >= 0}
        snapshot = {s: (rt.pool.lora_a(rt.target_names[0])[s].clone(), rt.pool.key_of(s)) for s in held}
        # load a PEFT adapter and generate two fresh policies: with 4 slots and 2 in flight, this evicts
        rt.load_peft(peft_dirs[events["steps"] % 3], name=f"peft{events['steps'] % 3}")
        try:
            rt.prepare([next(churn_texts), next(churn_texts)])
            events["loaded"] += 1
        except hyperlora.PoolFullError:
            events["refused"] += 1
        for s, (a, key) in snapshot.items():  # the batch's slots are untouched
            assert rt.pool.key_of(s) == key
            assert torch.equal(rt.pool.lora_a(rt.target_names[0])[s], a)

    hook = model.register_forward_pre_hook(churn)
    try:
        churned = rt.generate(input_ids=ids, attention_mask=mask, policies=entries, max_new_tokens=n)
    finally:
        hook.remove()
    assert events["steps"] == n
    assert rt.pool.stats()["evictions"] >= n  # the pool really churned under the batch
    assert torch.equal(churned, reference)
    # and each row still equals its solo run afterwards (the adapters come back after their eviction)
    for i, (row, pol) in enumerate(zip(rows, entries)):
        assert torch.equal(churned[i, ids.shape[1]:], _alone(rt, row, pol, n))


def test_churn_test_detects_a_pool_without_in_flight_protection(tmp_path, monkeypatch):
    """Negative control for the churn test: with the in-flight holds disabled, the same churn overwrites the
    batch's slots mid-generation and the outputs change, so the test above can fail."""
    import contextlib

    model, rt = _rt("llama", max_adapters=4)
    ids, mask, _ = padded_batch([5, 6, 4], seed=8)
    entries = [POLICIES[0], None, POLICIES[1]]
    reference = rt.generate(input_ids=ids, attention_mask=mask, policies=entries, max_new_tokens=6)
    monkeypatch.setattr(rt.pool, "in_flight", lambda slots, keys=None: contextlib.nullcontext(list(slots)))
    texts = iter(f"churn policy {i}" for i in range(1000))
    hook = model.register_forward_pre_hook(lambda m, a: rt.prepare([next(texts), next(texts)]) and None)
    try:
        broken = rt.generate(input_ids=ids, attention_mask=mask, policies=entries, max_new_tokens=6)
    finally:
        hook.remove()
    assert not torch.equal(broken, reference)


def test_hf_generate_inside_policies_context_matches_runtime_generate():
    model, rt = _rt("llama")
    ids, mask, _ = padded_batch([5, 3, 5], seed=6)
    entries = [POLICIES[0], None, POLICIES[1]]
    ours = rt.generate(input_ids=ids, attention_mask=mask, policies=entries, max_new_tokens=5)
    with rt.policies(entries):
        hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(hf, ours)
