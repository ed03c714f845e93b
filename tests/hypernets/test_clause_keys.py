"""Clause keys (hyperlora/clause_keys.py): splitting a routing policy into its answer words' clauses, and the
served reader's adapters with routed words' keys read from their own clause."""
from __future__ import annotations

import torch

from hyperlora.hypernets.reader.clause_keys import answer_clauses, word_tokens
from tests.hypernets.test_reader import _trained_like
from tests.training.test_train import tiny_model  # noqa: F401  (fixture)


def _split(policy):
    return [(c.text, c.word) for c in answer_clauses(policy)]


def test_routing_templates_split_into_one_clause_per_answer_word():
    assert _split("Route tickets about refunds to 'billing', about outages to 'tech', and everything else to "
                  "'general'.") == [("Route tickets about refunds to 'billing',", "billing"),
                                    ("about outages to 'tech',", "tech"),
                                    ("and everything else to 'general'.", "general")]
    assert _split("Queues: 'billing' handles refunds; 'tech' handles outages; 'general' takes all other "
                  "messages.") == [("Queues: 'billing' handles refunds;", "billing"),
                                   ("'tech' handles outages;", "tech"),
                                   ("'general' takes all other messages.", "general")]
    assert _split("Send anything about refunds to 'billing' and anything about outages to 'tech'. Otherwise "
                  "use 'general'.") == [("Send anything about refunds to 'billing'", "billing"),
                                        ("and anything about outages to 'tech'.", "tech"),
                                        ("Otherwise use 'general'.", "general")]
    assert _split('Assign each ticket: refunds -> "billing", outages -> "tech", anything else -> "general".') == [
        ('Assign each ticket: refunds -> "billing",', "billing"), ('outages -> "tech",', "tech"),
        ('anything else -> "general".', "general")]


def test_clause_spans_point_at_the_word_in_policy_and_clause():
    policy = "Route the customer's refunds to 'billing', outages to 'tech', and the rest to 'general'."
    clauses = answer_clauses(policy)
    assert [c.word for c in clauses] == ["billing", "tech", "general"]  # the apostrophe is no quote
    for c in clauses:
        assert policy[c.start:c.end] == c.word
        s, e = c.word_span
        assert c.text[s:e] == c.word


def test_policies_that_are_not_routing_rules_are_not_split():
    assert answer_clauses("Answer 'flag' if the message asks for a refund; otherwise answer 'pass'.") is None
    assert answer_clauses("Say 'a' for refunds, 'b' for outages, and 'a' for everything else.") is None  # repeated
    assert answer_clauses("No quoted words at all, just text.") is None
    assert answer_clauses("Say 'a' for refunds, 'b' for outages.", min_words=2) is not None


def test_word_tokens_cover_exactly_the_word(tiny_model):
    from hyperlora.modeling.base_model import load_base_model

    _, tok = load_base_model(tiny_model)
    text = "Route refunds to 'billing', outages to 'technical', and the rest to 'general'."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for c in answer_clauses(text):
        toks = word_tokens(tok, ids, text, c.start, c.end)
        assert toks and c.word in tok.decode([ids[j] for j in toks])
        assert c.word not in tok.decode([ids[j] for j in toks[1:]]) and c.word not in tok.decode(
            [ids[j] for j in toks[:-1]])
    assert word_tokens(tok, ids, "something else entirely", 0, 5) == []  # tokens that do not spell the text


def test_served_routing_adapter_takes_routed_keys_from_the_clause_alone(tiny_model):
    from hyperlora.hypernets.reader.reader import ReaderHypernet

    model, tok, feats, reader = _trained_like(tiny_model, seed=5)
    hn = ReaderHypernet(reader, feats, max_rank=40, min_gate=0.0)  # keep every token: all rows comparable
    routing = "Route refunds to 'billing', outages to 'technical', and everything else to 'general'."
    topic = "Answer 'flag' if the message asks for a refund; otherwise answer 'pass'."
    reader.cfg.clause_keys = False
    before = hn.adapters_for_texts([routing, topic])
    reader.cfg.clause_keys = True
    hn._id = None
    after = hn.adapters_for_texts([routing, topic])
    for n in before[1]:  # a two-answer rule is served as before
        assert torch.equal(before[1][n][0], after[1][n][0]) and torch.equal(before[1][n][1], after[1][n][1])
    full_feats = feats([routing])
    with torch.no_grad():
        _, gates = reader(full_feats)
    assert gates.shape[1] <= 40  # every token kept: served row j is token j
    ids = full_feats[0]["ids"].tolist()
    swapped = set()
    for c in answer_clauses(routing):
        full = word_tokens(tok, ids, routing, c.start, c.end)
        if float(gates[0, full[0]]) <= 0:
            continue  # the default (or a word gated off): keeps the full reading's key
        cf = feats([c.text])
        with torch.no_grad():
            cad, _ = reader(cf)
        cids = cf[0]["ids"].tolist()
        # the word's tokens in the clause reading, found by their text
        start = tok.decode(cids).index("'" + c.word + "'") + 1
        own = word_tokens(tok, cids, c.text, start, start + len(c.word))
        for j, jc in zip(full, own):
            for n, (a, _) in cad.items():
                torch.testing.assert_close(after[0][n][0][j], a[0, jc].float())
                assert not torch.allclose(after[0][n][0][j], before[0][n][0][j])
            swapped.add(j)
    assert swapped, "seed 5 gates at least one routed word positively"
    for n in before[0]:
        torch.testing.assert_close(after[0][n][1], before[0][n][1])  # outputs (B) are the full reading's
        for j in range(before[0][n][0].shape[0]):
            if j not in swapped:
                assert torch.equal(after[0][n][0][j], before[0][n][0][j])
    on = hn.weights_id()
    reader.cfg.clause_keys = False
    assert ReaderHypernet(reader, feats, max_rank=40, min_gate=0.0).weights_id() != on  # other adapters, other id


def test_clause_keys_are_differentiable_and_train(tiny_model, tmp_path, monkeypatch):
    import json

    from hyperlora.hypernets.reader.clause_keys import clause_texts, with_clause_keys
    from tests.hypernets.test_reader import _reader_args
    from tests.training.test_train import _run

    model, tok, feats, reader = _trained_like(tiny_model, seed=5)
    routing = "Route refunds to 'billing', outages to 'technical', and everything else to 'general'."
    assert clause_texts(feats, [routing, "Answer 'a' if so; otherwise 'b'."]) == [
        c.text for c in answer_clauses(routing)]
    ad, gates = reader(feats([routing]))
    swapped = with_clause_keys(reader, feats, [routing], ad, gates.detach())
    n = next(iter(ad))
    changed = (swapped[n][0] != ad[n][0]).any(-1)[0].nonzero().flatten()
    assert changed.numel() > 0
    reader.zero_grad()
    swapped[n][0][0, changed].sum().backward()  # these rows come from the clause readings only
    assert reader.U[next(t for t, m in reader.names.items() if m == n)].grad.abs().sum() > 0

    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert _run([*_reader_args(tiny_model, out), "--steps", "2", "--set", "reader_clause_keys=true"]) == 0
    assert json.loads((out / "final" / "config.json").read_text())["clause_keys"] is True
