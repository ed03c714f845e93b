"""The policy reader (hyperlora/reader.py): feature reading, adapter structure, training, resume, eval loading."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_train import TINY_TASKS, _run, tiny_model  # noqa: F401  (fixture)


def _reader_args(tiny_model, out):
    return ["--method", "reader", "--tasks", str(TINY_TASKS), "--eval-tasks", str(TINY_TASKS), "--out", str(out),
            "--set", f"base_model=\"{tiny_model}\"", "--set", "n_upper=1", "--set", "reader_gate_layer=1",
            "--set", "eval_every=2", "--set", "save_every=2", "--set", "policies_per_step=2",
            "--set", "examples_per_policy=2", "--set", "bf16=false"]


def _reader(tiny_model):
    from hyperlora.models import load_base_model
    from hyperlora.reader import PolicyFeatures, PolicyReader, ReaderConfig, module_name

    model, tok = load_base_model(tiny_model)
    names = {t: module_name(model, 2, t) for t in ("o_proj", "down_proj")}
    mods = dict(model.named_modules())
    cfg = ReaderConfig(layer=2, hidden_size=32, features={t: mods[n].in_features for t, n in names.items()},
                       gate_layer=1, max_tokens=40)
    return model, tok, PolicyFeatures(model, tok, cfg), PolicyReader(cfg, model.get_input_embeddings().weight, names)


def test_features_of_a_text_do_not_depend_on_its_batch(tiny_model):
    model, tok, feats, _ = _reader(tiny_model)
    texts = ["Answer 'flag' if the message asks for a refund; otherwise answer 'pass'.", "Say 'x'."]
    both = feats(texts)
    from hyperlora.reader import PolicyFeatures

    alone = PolicyFeatures(model, tok, feats.cfg)([texts[1]])[0]
    for k in ("ids", "h", "o_proj", "down_proj"):
        torch.testing.assert_close(both[1][k], alone[k], rtol=2e-2, atol=2e-2)  # bf16 autocast reading
    assert both[0]["ids"].numel() > both[1]["ids"].numel()
    own = tok(texts[1], add_special_tokens=False)["input_ids"]  # the policy's tokens, then the template's tail
    assert both[1]["ids"][: len(own)].tolist() == own
    with pytest.raises(ValueError, match="empty"):
        feats(["   "])


def test_fresh_reader_is_a_no_op_and_pads_with_zeros(tiny_model):
    torch.manual_seed(0)
    model, tok, feats, reader = _reader(tiny_model)
    texts = ["Answer 'flag' if the message asks for a refund; otherwise answer 'pass'.", "Say 'x'."]
    f = feats(texts)
    adapters, gates = reader(f)
    assert torch.count_nonzero(gates) == 0
    for a, b in adapters.values():
        assert torch.count_nonzero(b) == 0  # zero gates: B == 0, so the base model is untouched
    with torch.no_grad():
        reader.gate.weight.normal_()
    adapters, gates = reader(f)
    n1 = f[1]["ids"].numel()
    for a, b in adapters.values():
        assert a.shape[1] == f[0]["ids"].numel() and b.shape[2] == a.shape[1]
        assert torch.count_nonzero(a[1, n1:]) == 0 and torch.count_nonzero(b[1, :, n1:]) == 0
        assert torch.count_nonzero(b[0]) > 0
    assert torch.count_nonzero(gates[1, n1:]) == 0


def test_record_stats_give_a_constant_direction():
    from hyperlora.reader import PolicyReader, ReaderConfig

    torch.manual_seed(0)
    cfg = ReaderConfig(layer=0, hidden_size=8, features={"o_proj": 16})
    r = PolicyReader(cfg, torch.randn(50, 8), {"o_proj": "x"})
    x = torch.randn(300, 16) + 5.0 * torch.randn(16)  # a large shared component, as real activations have
    r.set_record_stats({"o_proj": x})
    cx = x @ r.c_o_proj
    assert abs(cx.mean().item() - 1) < 0.05 and cx.std().item() < 0.2
    torch.testing.assert_close(r.mu_o_proj, x.mean(0))


def test_reader_trains_checkpoints_resumes_and_loads_for_eval(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "reader"
    assert _run([*_reader_args(tiny_model, out), "--steps", "2"]) == 0
    state = json.loads((out / "checkpoint" / "training_state.json").read_text())
    assert state["step"] == 2
    assert _run([*_reader_args(tiny_model, out), "--steps", "4"]) == 0
    assert json.loads((out / "checkpoint" / "training_state.json").read_text())["step"] == 4
    assert "resumed from" in (out / "log.txt").read_text()
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "reader" and res["eval"]
    from hyperlora.models import load_base_model
    from hyperlora.reader import ReaderSource
    from hyperlora.training.eval_adapters import HypernetSource, find_hypernet_dir

    model, tok = load_base_model(tiny_model)
    d = find_hypernet_dir(out)
    assert d == out / "final"
    src = HypernetSource.from_dir(d, model, tok)
    assert isinstance(src, ReaderSource)
    ad = src(["Answer 'flag' if the message asks for a refund; otherwise answer 'pass'."])
    assert ad.count == 1 and all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in ad.modules.values())
    assert any(torch.count_nonzero(b) > 0 for _, b in ad.modules.values())  # gates moved off zero in 4 steps
