"""bf16 autocast only where the hardware runs it natively (emulated bf16 is ~4x slower than float32 on a CPU)."""
import pytest
import torch

from hyperlora.ops import precision
from tests.training.test_train import tiny_model  # noqa: F401  (fixture)


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpu_and_explicit_choices_win(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.use_bf16(None, "cpu") is native
    assert precision.use_bf16(True, "cpu") is True
    assert precision.use_bf16(False, "cpu") is False
    assert precision.native_bf16(torch.device("cpu")) is native


def test_unknown_device_types_get_float32():
    assert precision.native_bf16("meta") is False


@pytest.mark.parametrize("native", [True, False])
def test_policy_features_autocast_follows_the_cpu(tiny_model, monkeypatch, native):
    from tests.hypernets.test_reader import _reader

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    model, tok, feats, _ = _reader(tiny_model)
    assert feats.bf16 is native
    # an explicit choice wins; float32 reading is what bf16 reading approximates
    from hyperlora.hypernets.reader.reader import PolicyFeatures

    text = "Answer 'flag' if the message asks for a refund; otherwise answer 'pass'."
    f32 = PolicyFeatures(model, tok, feats.cfg, bf16=False)([text])[0]
    b16 = PolicyFeatures(model, tok, feats.cfg, bf16=True)([text])[0]
    for key in ("h", "o_proj", "down_proj"):
        assert not torch.equal(f32[key], b16[key])  # autocast really ran
        # a few bf16 roundings (2^-8 relative each) through the tiny model's 2-3 layers, measured 3.4e-3 of the
        # tensor's scale at worst (o_proj); 4 roundings of that scale is the bound
        err = float((b16[key] - f32[key]).abs().max())
        assert err <= 4 * 2 ** -8 * float(f32[key].abs().max()), (key, err)
