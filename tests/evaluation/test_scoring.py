"""Option log-likelihood scoring, greedy generation with per-row adapters, balanced accuracy."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from eval_helpers import tiny_llama, tiny_tokenizer  # noqa: E402
from hyperlora.modeling.prompts import prompt_text, target_text
from hyperlora.adapters.functional import apply_lora
from hyperlora.evaluation.scoring import (AdapterSet, ScoreRequest, balanced_accuracy, greedy_generate,
                                        macro_balanced_accuracy, option_logprobs, predict_options, regex_pass)


@pytest.fixture(scope="module")
def tm():
    tok = tiny_tokenizer()
    return tiny_llama(tok, seed=0), tok


def _random_adapters(model, P: int, seed: int, rank: int = 3) -> AdapterSet:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for n, m in model.named_modules():
        if n.endswith(("q_proj", "v_proj")):
            mods[n] = (torch.randn(P, rank, m.in_features, generator=g) * 0.3,
                       torch.randn(P, m.out_features, rank, generator=g) * 0.3)
    return AdapterSet(mods, 1.5)


def _reference_logprob(model, tok, prompt: str, option: str) -> float:
    """Float64-accumulated log p(option + eot | prompt) from one unpadded full forward."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    t = tok(target_text(tok, option), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + t])
    logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[len(p) - 1 + i, t[i]] for i in range(len(t))))


REQS = [("Ticket #1 (urgent): refund please", ["flag", "pass"]),
        ("Hi", ["billing", "security", "tech"]),
        ("Expense line: taxi, $42.50.", ["approve", "review"]),
        ("A much longer record about a password reset that never arrives by email.", ["x", "yy"])]


@pytest.mark.parametrize("share_prompt", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_option_logprobs_match_unpadded_reference(tm, batch_size, share_prompt):
    model, tok = tm
    reqs = [ScoreRequest(prompt_text(tok, r), o) for r, o in REQS]
    got = option_logprobs(model, tok, reqs, batch_size=batch_size, bf16=False, share_prompt=share_prompt)
    for r, scores in zip(reqs, got):
        assert len(scores) == len(r.options)
        for o, s in zip(r.options, scores):
            ref = _reference_logprob(model, tok, r.prompt, o)
            assert math.isfinite(s) and s < 0
            assert s == pytest.approx(ref, abs=2e-3), (r.prompt, o)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_per_row_adapters_match_single_adapter_runs(tm, share_prompt):
    model, tok = tm
    ad = _random_adapters(model, P=2, seed=5)
    rows = [0, -1, 1, 0]
    reqs = [ScoreRequest(prompt_text(tok, r), o, row) for (r, o), row in zip(REQS, rows)]
    got = option_logprobs(model, tok, reqs, adapters=ad, batch_size=16, bf16=False, share_prompt=share_prompt)
    base = option_logprobs(model, tok, [ScoreRequest(r.prompt, r.options) for r in reqs], batch_size=16, bf16=False)
    for r, row, scores, b in zip(reqs, rows, got, base):
        if row < 0:
            assert scores == pytest.approx(b, abs=1e-4)  # the row without an adapter is untouched
            continue
        one = {n: (a[row:row + 1], bb[row:row + 1]) for n, (a, bb) in ad.modules.items()}
        with apply_lora(model, one, scale=ad.scale):
            refs = [_reference_logprob(model, tok, r.prompt, o) for o in r.options]
        assert scores == pytest.approx(refs, abs=2e-3)
        assert max(abs(x - y) for x, y in zip(scores, b)) > 1e-2  # the adapter really moved the scores


def test_bf16_close_to_fp32(tm):
    model, tok = tm
    reqs = [ScoreRequest(prompt_text(tok, r), o) for r, o in REQS]
    a = option_logprobs(model, tok, reqs, bf16=False)
    b = option_logprobs(model, tok, reqs, bf16=True)
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=0.05, abs=0.5)


def test_predict_options_and_errors(tm):
    reqs = [ScoreRequest("p", ["a", "b", "c"]), ScoreRequest("q", ["x", "y"])]
    assert predict_options(reqs, [[-3.0, -1.0, -2.0], [-0.5, -0.7]]) == ["b", "x"]
    model, tok = tm
    with pytest.raises(ValueError, match="row >= 0"):
        option_logprobs(model, tok, [ScoreRequest("p", ["a"], row=0)])
    with pytest.raises(ValueError, match="batch_size"):
        option_logprobs(model, tok, reqs, batch_size=0)


def test_greedy_generate_matches_unbatched(tm):
    model, tok = tm
    ad = _random_adapters(model, P=2, seed=9)
    prompts = [prompt_text(tok, r) for r, _ in REQS]
    rows = [1, -1, 0, 1]
    got = greedy_generate(model, tok, prompts, rows, adapters=ad, max_new_tokens=6, batch_size=3, bf16=False)
    for p, row, g in zip(prompts, rows, got):
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        if row >= 0:
            one = {n: (a[row:row + 1], b[row:row + 1]) for n, (a, b) in ad.modules.items()}
            with apply_lora(model, one, scale=ad.scale):
                ref = model.generate(input_ids=ids, **kw)
        else:
            ref = model.generate(input_ids=ids, **kw)
        assert g == tok.decode(ref[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    with pytest.raises(ValueError, match="rows"):
        greedy_generate(model, tok, prompts, [0])


def test_regex_pass():
    assert regex_pass("Noted: thanks", r"^\s*Noted:")
    assert not regex_pass("Thanks. Noted: x", r"^\s*Noted:")
    assert regex_pass('{"Ack": "hi"}', r'^\s*\{\s*"Ack"\s*:')


def test_balanced_accuracy():
    assert balanced_accuracy(["a", "a", "a", "b"], ["a", "a", "a", "a"]) == pytest.approx(50.0)
    assert balanced_accuracy(["a", "b", "c"], ["a", "b", "c"]) == pytest.approx(100.0)
    assert balanced_accuracy(["a", "a", "b", "c"], ["a", "b", "b", "a"]) == pytest.approx(100 * (0.5 + 1 + 0) / 3)
    assert balanced_accuracy(["x", "y", "y", "y"], ["y", "x", "x", "y"]) == pytest.approx(100 * (0 + 1 / 3) / 2)
    assert math.isnan(balanced_accuracy([], []))
    with pytest.raises(ValueError, match="length"):
        balanced_accuracy(["a"], [])
    # per-policy macro average: policies weigh equally whatever their size
    assert macro_balanced_accuracy([(["a", "b"], ["a", "b"]), (["c"] * 10, ["d"] * 10)]) == pytest.approx(50.0)
    assert math.isnan(macro_balanced_accuracy([]))
