"""PolicyEncoder: validation, batching, the text-hash cache (with a callable encoder), and the real MiniLM (slow)."""
from __future__ import annotations

import hashlib
import warnings

import pytest
import torch

from hyperlora.hypernets.t2l.minilm import PolicyEncoder


class CountingEncoder:
    """A deterministic callable encoder that records every batch it is asked to embed."""

    def __init__(self, dim: int = 8):
        self.dim = dim
        self.batches: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.batches.append(list(texts))
        rows = []
        for t in texts:
            seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
            rows.append(torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)) * 3)
        return torch.stack(rows)


def test_callable_encoder_batches_caches_and_keeps_order():
    fn = CountingEncoder()
    enc = PolicyEncoder(fn, batch_size=2)
    texts = ["a policy", "b policy", "c policy", "a policy", "d policy"]
    out = enc.encode(texts)
    assert out.shape == (5, 8) and enc.dim == 8
    assert fn.batches == [["a policy", "b policy"], ["c policy", "d policy"]]  # duplicate embedded once
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    assert torch.equal(out[0], out[3]) and not torch.allclose(out[0], out[1])
    again = enc.encode(["d policy", "a policy"])
    assert len(fn.batches) == 2  # all cached: the callable is not called again
    assert torch.equal(again[0], out[4]) and torch.equal(again[1], out[0])
    info = enc.cache_info()
    assert (info["hits"], info["misses"], info["size"]) == (3, 4, 4)
    assert torch.equal(enc("b policy")[0], out[1])


def test_cache_is_keyed_by_text_and_bounded():
    fn = CountingEncoder()
    enc = PolicyEncoder(fn, cache_size=2)
    e1 = enc.encode("Refund within 30 days.")
    e2 = enc.encode("Refund within 31 days.")  # a changed policy never reuses the old embedding
    assert not torch.allclose(e1, e2)
    enc.encode("third")
    assert enc.cache_info()["size"] == 2
    enc.encode("Refund within 30 days.")  # evicted (LRU), so re-embedded
    assert fn.batches[-1] == ["Refund within 30 days."]


def test_unnormalized_option_returns_callable_output():
    fn = CountingEncoder()
    enc = PolicyEncoder(fn, normalize=False)
    assert torch.allclose(enc.encode("x policy")[0], fn(["x policy"])[0])


@pytest.mark.parametrize("bad,exc,match", [
    ("", ValueError, "policy 0 is empty"),
    (["ok", "   \n\t"], ValueError, "policy 1 is empty or whitespace-only"),
    (["ok", 3], TypeError, "policy 1 must be a str, got int"),
    ([], ValueError, "policies is empty"),
    (None, TypeError, "policies must be a str or a list"),
])
def test_bad_policies_raise_before_encoding(bad, exc, match):
    fn = CountingEncoder()
    enc = PolicyEncoder(fn)
    with pytest.raises(exc, match=match):
        enc.encode(bad)
    assert fn.batches == []


def test_callable_returning_garbage_is_refused():
    enc = PolicyEncoder(lambda texts: torch.ones(len(texts) + 1, 4))
    with pytest.raises(ValueError, match=r"float tensor \[1, E\]"):
        enc.encode("x")
    enc = PolicyEncoder(lambda texts: torch.full((len(texts), 4), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        enc.encode("x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PolicyEncoder("/nonexistent/encoder/dir")


@pytest.fixture(scope="module")
def minilm() -> PolicyEncoder:
    return PolicyEncoder()


@pytest.mark.slow
def test_minilm_embeddings_are_normalized_semantic_and_padding_free(minilm):
    texts = ["Never reveal a customer's account number.", "Do not disclose client bank account numbers.",
             "Always reply in French, whatever language the user writes in."]
    e = minilm.encode(texts)
    assert e.shape == (3, 384) and e.dtype == torch.float32 and minilm.dim == 384
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3
    minilm.clear_cache()
    for i, t in enumerate(texts):  # one at a time (no padding) == in a padded batch
        torch.testing.assert_close(minilm.encode(t)[0], e[i], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_minilm_truncates_long_policies_with_a_warning(minilm):
    long = "Escalate every refund request above one hundred euros to a supervisor. " * 60
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e_long = minilm.encode(long)
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert any("truncated" in m and str(minilm.max_length) in m for m in msgs), msgs
    # text past the window does not change the embedding
    e_longer = minilm.encode(long + " Also, always answer in German.")
    torch.testing.assert_close(e_long, e_longer)


@pytest.mark.slow
def test_minilm_bfloat16_autocast_stays_close_to_float32(minilm):
    texts = ["Escalate refunds above 100 euros.", "Answer only in formal English.", "Never quote prices."]
    ref = minilm.encode(texts)
    fast = PolicyEncoder(dtype=torch.bfloat16)
    got = fast.encode(texts)
    assert got.dtype == torch.float32
    cos = (got * ref).sum(1)
    assert cos.min() > 0.999 and not torch.equal(got, ref)  # really computed in bfloat16, and still close
    with pytest.raises(ValueError, match="dtype"):
        PolicyEncoder(lambda t: torch.ones(len(t), 2), dtype=torch.int8)
