"""decide(): answers from option scoring under each record's adapter (runtime pool, rows of different
policies in one forward), the same scores as evaluation's functional path, calibrated confidence, the
in-context verifier, free-text replies with the judge, escalation flags."""
from __future__ import annotations

import math

import pytest
import torch

from eval_helpers import hash_encoder, tiny_hypernet, tiny_llama, tiny_tokenizer
import hyperlora
from hyperlora.decisions.calibration import Calibrator
from hyperlora.decisions.scoring import ScoreRequest
from hyperlora.evaluation.scoring import option_logprobs
from hyperlora.evaluation.sources import HypernetSource
from hyperlora.modeling.prompts import prompt_text

POLICIES = ["Flag every ticket that mentions a refund; pass the rest.",
            "Route billing questions to billing and everything else to tech.",
            "Approve expenses under fifty dollars, otherwise review."]
RECORDS = ["I want a refund for my order", "My invoice is wrong", "Taxi, $42.50", "The app crashes on start",
           "Refund me now please", "Hotel, $300"]
OPTS = [["flag", "pass"], ["billing", "tech"], ["approve", "review"], ["billing", "tech"], ["flag", "pass"],
        ["approve", "review"]]
POL = [POLICIES[0], POLICIES[1], POLICIES[2], POLICIES[1], POLICIES[0], POLICIES[2]]


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=0)
    hn = tiny_hypernet(model)
    ref_model = tiny_llama(tok, seed=0)  # the same weights, never attached: the functional reference
    rt = hyperlora.attach(model, hn, encoder=hash_encoder, apply_mode="materialized")
    return rt, tok, hn, ref_model


def test_batched_across_policies_equals_each_policy_alone_and_the_functional_path(setup):
    rt, tok, hn, ref_model = setup
    ds = hyperlora.decide(rt, RECORDS, POL, OPTS, tokenizer=tok, verifier=None, bf16=False)
    assert len(ds) == len(RECORDS)
    for i, d in enumerate(ds):
        alone = hyperlora.decide(rt, [RECORDS[i]], POL[i], OPTS[i], tokenizer=tok, verifier=None, bf16=False)[0]
        assert d.answer == alone.answer
        for o in OPTS[i]:
            assert d.raw_probabilities[o] == pytest.approx(alone.raw_probabilities[o], abs=1e-5)
        assert sum(d.probabilities.values()) == pytest.approx(1.0)
        assert d.confidence == pytest.approx(max(d.probabilities.values()))
        assert d.answer == max(d.probabilities, key=d.probabilities.get)
    # evaluation's path: the same hypernetwork's adapters applied with apply_lora over an AdapterSet
    src = HypernetSource(hn, hash_encoder)
    adapters = src(POLICIES)
    reqs = [ScoreRequest(prompt_text(tok, r), o, POLICIES.index(p)) for r, o, p in zip(RECORDS, OPTS, POL)]
    ref = option_logprobs(ref_model, tok, reqs, adapters=adapters, bf16=False)
    for d, s, o in zip(ds, ref, OPTS):
        p = torch.softmax(torch.tensor(s, dtype=torch.float64), 0).tolist()
        assert [d.raw_probabilities[x] for x in o] == pytest.approx(p, abs=1e-4)


def test_verifier_calibration_and_escalation_flags(setup):
    rt, tok, _, _ = setup
    ds = hyperlora.decide(rt, RECORDS, POL, OPTS, tokenizer=tok, bf16=False, budget=1 / 3)
    assert all(d.verdict is not None and 0.0 <= d.verifier_score <= 1.0 for d in ds)
    assert all(d.verdict == (d.verifier_answer == d.answer) for d in ds)
    assert sum(d.escalate for d in ds) == 2  # the least-trusted third of six
    low = sorted(ds, key=lambda d: d.trust)[:2]
    assert all(d.escalate for d in low)
    cal = Calibrator("temperature", {"*": {"t": 3.0}}, thresholds={"budget": {"0.1": 0.99}})
    dc = hyperlora.decide(rt, RECORDS, POL, OPTS, tokenizer=tok, bf16=False, calibrator=cal, verifier=None)
    for d, raw in zip(dc, ds):
        assert d.confidence == pytest.approx(cal.confidence([math.log(raw.raw_probabilities[o]) for o in raw.raw_probabilities]),
                                             abs=1e-5)
        assert d.escalate == (d.trust < 0.99)
    with pytest.raises(ValueError, match="conformal threshold"):
        hyperlora.decide(rt, RECORDS, POL, OPTS, tokenizer=tok, rule="conformal", verifier=None)
    cal.thresholds["conformal"] = {"threshold": None, "certified": False}
    dc = hyperlora.decide(rt, RECORDS, POL, OPTS, tokenizer=tok, calibrator=cal, rule="conformal", verifier=None)
    assert all(d.escalate for d in dc)  # nothing certified: everything goes to a person


def test_free_text_adapter_names_and_bad_input(setup):
    rt, tok, _, _ = setup
    ds = hyperlora.decide(rt, ["Say hello to the customer"], POLICIES[0], None, tokenizer=tok, max_new_tokens=3,
                          bf16=False)
    d = ds[0]
    assert isinstance(d.answer, str) and d.probabilities is None and d.confidence is None
    assert d.verdict is not None and 0.0 <= d.verifier_score <= 1.0  # the judge read policy, record and reply
    name = rt.add_adapter("tiny-name", {n: (torch.zeros(2, rt.pool.targets()[n][0]), torch.zeros(rt.pool.targets()[n][1], 2))
                                        for n in rt.target_names})
    d = hyperlora.decide(rt, RECORDS[:2], name, ["flag", "pass"], tokenizer=tok, bf16=False)
    assert all(x.verdict is None for x in d)  # an adapter name has no text for the verifier to read
    d = hyperlora.decide(rt, RECORDS[:2], name, ["flag", "pass"], tokenizer=tok, bf16=False, policy_text=POLICIES[0])
    assert all(x.verdict is not None for x in d)
    assert hyperlora.decide(rt, [], POLICIES[0], tokenizer=tok) == []
    with pytest.raises(ValueError, match="one per record"):
        hyperlora.decide(rt, RECORDS, POL[:2], OPTS, tokenizer=tok)
    with pytest.raises(ValueError, match="distinct"):
        hyperlora.decide(rt, RECORDS[:1], POLICIES[0], ["flag", "flag"], tokenizer=tok)
    with pytest.raises(TypeError):
        hyperlora.decide(rt, "one record", POLICIES[0], ["a", "b"], tokenizer=tok)
    with pytest.raises(ValueError, match="verifier"):
        hyperlora.decide(rt, RECORDS[:1], POLICIES[0], ["a", "b"], tokenizer=tok, verifier="oracle")
