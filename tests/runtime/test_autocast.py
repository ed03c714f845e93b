"""Serving under torch.autocast (bf16 on the CPU is ~3x faster): ops keep their own precision, the runtime
mixes dtypes without touching rows that have no adapter."""
import os
import sys

import torch

from eval_helpers import hash_encoder, tiny_hypernet, tiny_llama, tiny_tokenizer  # noqa: E402

import hyperlora  # noqa: E402
from hyperlora.ops import add_lora, latent_lora  # noqa: E402


def test_ops_ignore_an_enclosing_autocast():
    g = torch.Generator().manual_seed(0)
    T, S, R, d_in, d_out, K = 9, 3, 4, 13, 11, 5
    x = torch.randn(T, d_in, generator=g)
    a, b = torch.randn(S, R, d_in, generator=g), torch.randn(S, d_out, R, generator=g)
    slots = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2, 2])
    y0 = torch.randn(T, d_out, generator=g)
    want = add_lora(y0.clone(), x, a, b, slots)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = add_lora(y0.clone(), x, a, b, slots)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    w_a, w_b = torch.randn(R * K, d_in, generator=g), torch.randn(d_out, R * K, generator=g)
    z = torch.cat([torch.randn(S, K - 1, generator=g), torch.ones(S, 1)], 1)
    want = latent_lora(y0.clone(), x, w_a, w_b, z, slots)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = latent_lora(y0.clone(), x, w_a, w_b, z, slots)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_runtime_under_bf16_autocast():
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=2)
    hn = tiny_hypernet(model, b_std=0.5)
    ids = torch.randint(5, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base = model(input_ids=ids).logits
    rt = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=4)
    try:
        with torch.no_grad(), rt.policies(["a policy", None]):
            full = model(input_ids=ids).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                mixed = model(input_ids=ids).logits
    finally:
        rt.detach()
    assert torch.equal(mixed[1], base[1]), "the policy-free row must be bitwise the base model under autocast"
    assert not torch.allclose(full[0], full[1])  # the adapter changes row 0 (else the next check proves little)
    # bf16 rounding of the whole forward (the base layers too): measured 0.015 of the logits' scale here;
    # 2x headroom. A delta dropped or applied twice moves row 0 by the adapter's full effect instead.
    err = (mixed[0].float() - full[0]).abs().max() / full[0].abs().max()
    assert err < 0.03, err
