"""Per-row LoRA hooks (hyperlora.adapters.functional) against a float64 reference."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hyperlora.adapters.functional import adapters_from_generated, apply_lora, lora_delta


class Tiny(nn.Module):
    def __init__(self, d_in=13, d_hidden=11, d_out=7):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden)
        self.down = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _ref(model, x, adapters, rows, scale):
    """float64 reference: row by row, y += scale * (x A^T) B^T."""
    m = Tiny().double()
    m.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    outs = []
    for n in range(x.shape[0]):
        xn = x[n].double()
        h = m.up(xn)
        r = rows[n]
        if r >= 0:
            a, b = adapters["up"]
            h = h + scale[r] * (xn @ a[r].double().T) @ b[r].double().T
        h = torch.tanh(h)
        y = m.down(h)
        if r >= 0:
            a, b = adapters["down"]
            y = y + scale[r] * (h @ a[r].double().T) @ b[r].double().T
        outs.append(y)
    return torch.stack(outs)


def _adapters(P, R=3):
    return {"up": (torch.randn(P, R, 13), torch.randn(P, 11, R)),
            "down": (torch.randn(P, R, 11), torch.randn(P, 7, R))}


def test_matches_float64_reference_with_row_map_and_none_rows():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(5, 4, 13)
    ad = _adapters(3)
    rows = [2, -1, 0, 2, 1]
    scale = torch.tensor([0.5, 2.0, 1.5])
    base = model(x).detach()
    with apply_lora(model, ad, scale=scale, rows=torch.tensor(rows)):
        y = model(x)
    ref = _ref(model, x, ad, rows, scale.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y[1], base[1])  # row -1 untouched
    torch.testing.assert_close(model(x), base)  # hooks removed on exit


def test_rows_none_one_adapter_per_row_and_grad_reaches_adapters():
    torch.manual_seed(1)
    model = Tiny().requires_grad_(False)
    x = torch.randn(3, 2, 13)
    ad = {k: (a.requires_grad_(), b.requires_grad_()) for k, (a, b) in _adapters(3).items()}
    with apply_lora(model, ad, scale=2.0):
        y = model(x)
    ref = _ref(model, x, {k: (a.detach(), b.detach()) for k, (a, b) in ad.items()}, [0, 1, 2], torch.full((3,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a, _ in ad.values())


def test_lora_delta_formula():
    torch.manual_seed(2)
    x, a, b = torch.randn(2, 5, 6), torch.randn(2, 4, 6), torch.randn(2, 3, 4)
    s = torch.tensor([0.3, -1.0])
    ref = torch.stack([s[i].double() * (x[i].double() @ a[i].double().T) @ b[i].double().T for i in range(2)])
    torch.testing.assert_close(lora_delta(x, a, b, s).double(), ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_clear_errors():
    torch.manual_seed(3)
    model = Tiny()
    with pytest.raises(ValueError, match="not a module"):
        with apply_lora(model, {"nope": _adapters(2)["up"]}):
            pass
    with pytest.raises(ValueError, match="module is 13->11"):
        with apply_lora(model, {"up": _adapters(2)["down"]}):
            pass
    with pytest.raises(ValueError, match="rows must be in"):
        with apply_lora(model, _adapters(2), rows=torch.tensor([0, 2])):
            pass
    with pytest.raises(ValueError, match="batch has 3 rows"):
        with apply_lora(model, _adapters(2)):
            model(torch.randn(3, 1, 13))


def test_adapters_from_generated_layout():
    torch.manual_seed(4)
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 6, 4)
    out = adapters_from_generated({"q": (a, b)}, {"q": ["l0.q", "l1.q", "l2.q"]})
    assert list(out) == ["l0.q", "l1.q", "l2.q"]
    torch.testing.assert_close(out["l1.q"][0], a[:, 1])
    torch.testing.assert_close(out["l2.q"][1], b[:, 2])
