"""Tests for hyperlora.modeling.capture.InputCapture: the one copy of forward-hook input capture."""
from __future__ import annotations

import pytest
import torch
from torch import nn


from hyperlora.modeling.capture import InputCapture


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_captures_each_modules_latest_input_detached():
    model = _model()
    x = torch.randn(2, 4, requires_grad=True)
    with InputCapture(model, {"first": "0", "last": "2"}) as inputs:
        model(x)
        assert torch.equal(inputs["first"], x.detach()) and not inputs["first"].requires_grad
        assert torch.equal(inputs["last"], torch.relu(model[0](x)).detach())
        x2 = torch.randn(5, 4)
        model(x2)
        assert torch.equal(inputs["first"], x2)  # overwritten by the next forward
    assert not model[0]._forward_hooks and not model[2]._forward_hooks


def test_hooks_are_removed_on_an_error_and_by_remove():
    model = _model()
    with pytest.raises(RuntimeError, match="boom"):
        with InputCapture(model, {"x": "2"}):
            raise RuntimeError("boom")
    assert not model[2]._forward_hooks
    cap = InputCapture(model, {"x": "2"})
    model(torch.randn(1, 4))
    cap.remove()
    cap.remove()  # idempotent
    assert not model[2]._forward_hooks and cap.inputs["x"].shape == (1, 6)


def test_unknown_module_is_a_clear_error_and_registers_nothing():
    model = _model()
    with pytest.raises(ValueError, match=r"\['9'\]: not modules of this Sequential"):
        InputCapture(model, {"x": "0", "y": "9"})
    assert not model[0]._forward_hooks
