"""PEFT adapters in the runtime: load_peft reproduces PeftModel per row (also mixed with generated adapters and
base rows), validation refuses bad adapters before touching the pool, export_peft round-trips."""
from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch

from runtime_helpers import (default_types, forward_logits, hash_encoder, make_peft_dir, padded_batch,  # noqa: E402
                             tiny_hypernet, tiny_model)

import hyperlora  # noqa: E402

POLICY = "Reply only with the ticket's priority."
ATTN = {"llama": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"), "gpt2": ("c_attn",)}


def _peft_reference(model, dirs: dict[str, object], ids, mask, names):
    """PEFT's own mixed-adapter batch: logits of `model` with adapter names[i] ('__base__' = none) on row i."""
    from peft import PeftModel

    items = list(dirs.items())
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(items[0][1]), adapter_name=items[0][0])
    for n, d in items[1:]:
        pm.load_adapter(str(d), adapter_name=n)
    pm.eval()
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return pm(input_ids=ids, attention_mask=mask, position_ids=pos, adapter_names=names).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_peft_adapters_reproduce_peftmodel_mixed_with_generated_and_base_rows(arch, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(arch)
    d1 = make_peft_dir(model, tmp_path / "a1", r=4, alpha=8, targets=ATTN[arch], seed=1)
    extra = ("up_proj", "down_proj") if arch != "gpt2" else ("c_fc",)
    d2 = make_peft_dir(model, tmp_path / "a2", r=6, alpha=3, targets=ATTN[arch] + extra, seed=2)
    ids, mask, rows = padded_batch([7, 5, 7, 6, 4])
    peft_rows = ["a1", "__base__", "a2", "a1", "__base__"]
    ref = _peft_reference(model, {"a1": d1, "a2": d2}, ids, mask, peft_rows)
    base = forward_logits(model, ids, mask)

    hn = tiny_hypernet(model, default_types(arch))
    rt = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=8, max_rank=8, apply_mode="auto")
    assert rt.load_peft(d1) == "a1"
    assert rt.load_peft(d2, name="second") == "second"
    entries = ["a1", None, "second", "a1", POLICY]  # PEFT, base, PEFT, PEFT, generated
    with rt.policies(entries):
        got = forward_logits(model, ids, mask)
    for i in (0, 2, 3):
        assert (ref[i] - base[i]).abs().max() > 1e-2  # the PEFT adapter is not a no-op
        torch.testing.assert_close(got[i], ref[i], rtol=1e-4, atol=1e-4)
    assert torch.equal(got[1], base[1])  # base row: bitwise
    with rt.policies([POLICY]):
        alone = forward_logits(model, rows[4][None], torch.ones_like(rows[4])[None])[0]
    torch.testing.assert_close(got[4, -4:], alone, rtol=1e-5, atol=1e-5)


def test_rank_pattern_alpha_pattern_and_rslora_match_peft(tmp_path):
    model = tiny_model("llama")
    d = make_peft_dir(model, tmp_path / "pat", r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"),
                      rank_pattern={"v_proj": 2, "down_proj": 6}, alpha_pattern={"down_proj": 3.0}, use_rslora=True)
    ids, mask, _ = padded_batch([6, 6])
    ref = _peft_reference(model, {"pat": d}, ids, mask, ["pat", "__base__"])
    rt = hyperlora.attach(model, target_modules=["q_proj", "v_proj", "down_proj"], max_adapters=2, max_rank=8)
    name = rt.load_peft(d)
    with rt.policies([name, None]):
        got = forward_logits(model, ids, mask)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_evicted_peft_adapter_comes_back_and_duplicates_share_a_slot(tmp_path):
    model = tiny_model("llama")
    d = make_peft_dir(model, tmp_path / "x", targets=("q_proj",))
    hn = tiny_hypernet(model, ["q_proj"])
    rt = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=2, max_rank=8, apply_mode="materialized")
    ids, mask, _ = padded_batch([5])
    n1, n2 = rt.load_peft(d, name="one"), rt.load_peft(d, name="two")
    with rt.policies([n1]):
        first = forward_logits(model, ids, mask)
    with rt.policies([n2]):
        assert torch.equal(forward_logits(model, ids, mask), first)
    assert rt.pool.stats()["used"] == 1  # same content -> same key -> one slot
    rt.prepare(["policy one", "policy two"])  # evicts the PEFT adapter
    assert rt.pool.stats()["evictions"] >= 1
    with rt.policies([n1]):
        assert torch.equal(forward_logits(model, ids, mask), first)


# ---------------------------------------------------------------------------------------------
# validation: every refusal leaves the pool and the in-flight batch untouched
# ---------------------------------------------------------------------------------------------

def _edit_tensor(d, fn):
    from safetensors.torch import load_file, save_file

    path = d / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key] = fn(tensors[key])
    save_file(tensors, str(path))


def _bad_adapters(model, tmp):
    """name -> (directory, expected message fragment)."""
    bad = {}
    bad["pickle"] = (make_peft_dir(model, tmp / "pickle", safe=False), "pickle")
    bad["rank"] = (make_peft_dir(model, tmp / "rank", r=16, alpha=16), "max_rank")
    bad["target"] = (make_peft_dir(model, tmp / "target", targets=("q_proj", "gate_proj")), "gate_proj")
    shape = make_peft_dir(model, tmp / "shape")
    _edit_tensor(shape, lambda t: torch.randn(t.shape[0], t.shape[1] + 3))
    bad["shape"] = (shape, "needs lora_A")
    nan = make_peft_dir(model, tmp / "nan")
    _edit_tensor(nan, lambda t: t.index_fill(1, torch.tensor([0]), float("nan")))
    bad["nan"] = (nan, "NaN")
    bad["dora"] = (make_peft_dir(model, tmp / "dora", use_dora=True), "DoRA")
    bad["bias"] = (make_peft_dir(model, tmp / "bias", bias="all"), "bias")
    cfg_r0 = make_peft_dir(model, tmp / "r0")
    cfg = json.loads((cfg_r0 / "adapter_config.json").read_text())
    cfg["r"] = 0
    (cfg_r0 / "adapter_config.json").write_text(json.dumps(cfg))
    bad["r0"] = (cfg_r0, "positive int")
    return bad


def test_every_invalid_adapter_is_refused_with_its_message_and_touches_nothing(tmp_path):
    model = tiny_model("llama")
    bad = _bad_adapters(model, tmp_path)
    good = make_peft_dir(model, tmp_path / "good", seed=9)
    hn = tiny_hypernet(model, ["q_proj", "v_proj"])
    rt = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=3, max_rank=8, apply_mode="materialized")
    name = rt.load_peft(good)
    ids, mask, _ = padded_batch([6, 6, 6])
    with rt.policies([name, POLICY, None]):
        before = forward_logits(model, ids, mask)
        buffers = {t: tuple(b.clone() for b in rt.pool.buffers(t)) for t in rt.pool.module_types()}
        stats = rt.pool.stats()
        slots = [rt.pool.slot_info(s) for s in range(rt.pool.max_adapters)]
        for what, (d, msg) in bad.items():
            with pytest.raises(ValueError, match=msg):
                rt.load_peft(d, name=what)
            assert what not in rt.peft_names
            for t, (a, b) in buffers.items():
                assert torch.equal(rt.pool.buffers(t)[0], a) and torch.equal(rt.pool.buffers(t)[1], b), what
            assert rt.pool.stats() == stats, what
            assert [rt.pool.slot_info(s) for s in range(rt.pool.max_adapters)] == slots, what
            assert torch.equal(forward_logits(model, ids, mask), before), what


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_peft_reproduces_runtime_logits_in_peft_and_back(arch, tmp_path):
    from peft import PeftModel

    model = tiny_model(arch)
    hn = tiny_hypernet(model, default_types(arch))
    ids, mask, _ = padded_batch([6, 6])
    rt = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=4, max_rank=16, apply_mode="materialized")
    with rt.policies([POLICY, None]):
        ours = forward_logits(model, ids, mask)
    out = rt.export_peft(POLICY, tmp_path / "exported")
    rt.detach()
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        peft_logits = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(peft_logits[0], ours[0], rtol=1e-4, atol=1e-4)
    # and back in: the exported directory loaded as a PEFT adapter equals the generated one
    rt = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=4, max_rank=16, apply_mode="materialized")
    name = rt.load_peft(out)
    with rt.policies([name, None]):
        torch.testing.assert_close(forward_logits(model, ids, mask), ours, rtol=1e-5, atol=1e-5)


def test_add_adapter_from_tensors_matches_peft_and_validates_first(tmp_path):
    from safetensors.torch import load_file

    model = tiny_model("llama")
    d = make_peft_dir(model, tmp_path / "t", r=4, alpha=8, targets=("q_proj", "v_proj"))
    ids, mask, _ = padded_batch([5, 5])
    ref = _peft_reference(model, {"t": d}, ids, mask, ["t", "__base__"])
    sd = load_file(str(d / "adapter_model.safetensors"))
    modules = {}
    for k, v in sd.items():
        name = k[len("base_model.model."):].split(".lora_")[0]
        modules.setdefault(name, [None, None])[0 if ".lora_A." in k else 1] = v
    modules = {n: tuple(p) for n, p in modules.items()}
    rt = hyperlora.attach(model, target_modules=["q_proj", "v_proj"], max_adapters=2, max_rank=4)
    name = rt.add_adapter("tensors", modules, scale=8 / 4)
    with rt.policies([name, None]):
        torch.testing.assert_close(forward_logits(model, ids, mask), ref, rtol=1e-4, atol=1e-4)
    used = rt.pool.stats()["used"]
    first = next(iter(modules))
    bad = {
        "not served": ({"model.layers.0.mlp.up_proj": modules[first]}, "not served"),
        "shape": ({first: (modules[first][0][:, :-1], modules[first][1])}, "need A"),
        "rank": ({first: (torch.randn(5, 48), torch.randn(48, 5))}, "max_rank"),
        "nan": ({first: (modules[first][0] * float("nan"), modules[first][1])}, "NaN"),
    }
    for what, (mods, msg) in bad.items():
        with pytest.raises(ValueError, match=msg):
            rt.add_adapter(what, mods)
        assert what not in rt.peft_names and rt.pool.stats()["used"] == used


def test_export_peft_over_another_policy_is_all_or_nothing(tmp_path, monkeypatch):
    """Issue 19 rows 6-7 through the runtime: exporting policy B over policy A's folder needs overwrite=True; a
    failure half-way (the config write) leaves A's folder byte for byte; with overwrite=True the folder holds
    exactly B, which PEFT reproduces."""
    from peft import PeftModel

    from hyperlora.adapters import peft_io

    model = tiny_model("llama")
    hn = tiny_hypernet(model, default_types("llama"))
    rt = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=4, max_rank=16, apply_mode="materialized")
    out = rt.export_peft(POLICY, tmp_path / "exported")
    (out / "README.md").write_text("policy A\n")
    snap = {p.name: p.read_bytes() for p in out.iterdir()}
    other = "Reply in French."
    with pytest.raises(FileExistsError, match="overwrite=True"):
        rt.export_peft(other, out)
    real = peft_io._write_file

    def failing(path, data):
        if path.name == "adapter_config.json":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, data)

    monkeypatch.setattr(peft_io, "_write_file", failing)
    with pytest.raises(PermissionError):
        rt.export_peft(other, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snap
    monkeypatch.setattr(peft_io, "_write_file", real)
    rt.export_peft(other, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    ids, mask, _ = padded_batch([6])
    with rt.policies([other]):
        ours = forward_logits(model, ids, mask)
    rt.detach()
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        torch.testing.assert_close(pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits, ours,
                                   rtol=1e-4, atol=1e-4)
