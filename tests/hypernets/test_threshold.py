"""Numeric threshold rules (hyperlora/threshold_rule.py): parsing, labels from tasks, the head, the compiled
slot, and the served reader that uses it."""
from __future__ import annotations

import math

import pytest
import torch

from hyperlora.tasks.format import Example, PolicyTask
from hyperlora.hypernets.reader.rules.threshold import (ThresholdHead, compile_threshold, context_features, derive_threshold,
                                      numbers)
from tests.hypernets.test_reader import _trained_like
from tests.training.test_train import tiny_model  # noqa: F401  (fixture)


def test_numbers_are_parsed_with_currency_commas_and_suffixes():
    got = [v for v, _, _ in numbers("Over $10,000 or 2.5k units, 7 days, $99.50 and 3M; not v2 or A1.")]
    assert got == [10000.0, 2500.0, 7.0, 99.5, 3e6]


def _task(policy, rows):
    exs = [Example(input=r, options=["review", "approve"], answer=a) for r, a in rows]
    return PolicyTask(policy=policy, examples=exs)


def test_threshold_labels_come_from_the_records():
    t = _task("Answer 'review' if the expense amount on order 12 is over $500; otherwise answer 'approve'.",
              [("Expense line 7: taxi, $1,240.", "review"), ("Expense line 8: lunch, $35.", "approve"),
               ("Expense line 9: hotel, $900.", "review")])
    # the policy's second number (500) decides, on each record's second number
    assert derive_threshold(t) == (1, "review", "approve", 1)
    # an "under" rule: the answer above the threshold is the default one
    u = _task("Answer 'review' if the amount is under 100; otherwise 'approve'.",
              [("Amount 30.", "review"), ("Amount 300.", "approve")])
    assert derive_threshold(u) == (0, "approve", "review", 0)
    # no number decides the answers, a free-text task, a record without numbers: no label
    assert derive_threshold(_task("Answer 'review' if over 100.", [("Amount 300.", "review"),
                                                                  ("Amount 400.", "approve")])) is None
    free = PolicyTask(policy="Start with 'Ack:' over 5.", examples=[
        Example(input="6", answer="Ack: hi", check={"regex": "^Ack:"}), Example(input="2", answer="Ack: yo",
                                                                                 check={"regex": "^Ack:"})])
    assert derive_threshold(free) is None
    assert derive_threshold(_task("Answer 'review' if over 100.", [("No number.", "review"),
                                                                  ("Amount 4.", "approve")])) is None


def test_context_features_leave_the_word_itself_out():
    h = torch.arange(6, dtype=torch.float32)[:, None].repeat(1, 3)
    spans = [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    f = context_features(h, spans, [("w", 4, 6)], width=2)  # token 2 is the word: context 0, 1, 3, 4
    assert torch.allclose(f[0], torch.full((3,), (0 + 1 + 3 + 4) / 4))


def test_head_round_trips_and_refuses_degenerate_readings(tmp_path):
    torch.manual_seed(0)
    head = ThresholdHead(8, 12)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
        head.probe.normal_()
    head.save(tmp_path)
    back = ThresholdHead.load(tmp_path)
    for (k, v), (k2, v2) in zip(head.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert ThresholdHead.load(tmp_path / "none") is None
    h, spans = torch.randn(4, 8), [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert head.predict("no numbers here at all", h, spans) is None


def test_compiled_slot_moves_the_two_answers_apart_by_the_log_ratio(tiny_model):
    """A = s (w - log T c), B = (E[above] - E[below]) / gamma: the logit of 'above' minus 'below' moves by
    s (w.x - log T c.x) |E_a - E_b|^2-ish; checked through a real forward against a float64 prediction."""
    from hyperlora.modeling.base_model import load_base_model
    from hyperlora.modeling.prompts import prompt_text
    from hyperlora.adapters.functional import apply_lora

    model, tok = load_base_model(tiny_model)
    name = "model.layers.2.mlp.down_proj"
    d_in = dict(model.named_modules())[name].in_features
    torch.manual_seed(1)
    head = ThresholdHead(32, d_in, scale=3.0)
    head.probe.copy_(torch.randn(d_in))
    c = torch.randn(d_in)
    E, g = model.get_input_embeddings().weight.detach(), model.model.norm.weight.detach()
    with pytest.raises(ValueError, match="positive"):
        compile_threshold(head, c, E, g, tok, -1.0, "review", "approve")
    A, B = compile_threshold(head, c, E, g, tok, 500.0, "review", "approve")
    assert A.shape == (1, d_in) and B.shape == (32, 1)
    # float32 compile against the float64 formula: measured 4e-6 absolute (1.5e-7 relative) on entries ~30
    torch.testing.assert_close(A[0].double(), 3.0 * (head.probe.double() - math.log(500.0) * c.double()),
                               rtol=1e-6, atol=2e-5)
    ids = torch.tensor([tok(prompt_text(tok, "Expense line: taxi, $1,240."), add_special_tokens=False)["input_ids"]])
    a, b = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("review", "approve"))
    store = {}
    hook = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: store.update(x=i[0][0, -1]))
    base = model(ids).logits[0, -1].double()
    hook.remove()
    with apply_lora(model, {name: (A[None], B[None])}, scale=1.0, rows=torch.zeros(1, dtype=torch.long)):
        new = model(ids).logits[0, -1].double()
    push = float(A[0].double() @ store["x"].double())
    moved = (new[a] - new[b]) - (base[a] - base[b])
    assert push != 0 and float(moved) * push > 0  # the gap moves the way the read-out says


def _forced_threshold_head(d, d_in, is_rule: bool) -> ThresholdHead:
    head = ThresholdHead(d, d_in)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.cls.bias[int(is_rule)] = 5.0
        head.probe.normal_()
    return head.eval()


def test_served_reader_compiles_threshold_rules(tiny_model):
    from hyperlora.hypernets.reader.reader import ReaderHypernet

    model, tok, feats, reader = _trained_like(tiny_model, seed=8)
    d_in = reader.cfg.features["down_proj"]
    policy = "Answer 'review' if the expense amount is over $500; otherwise answer 'approve'."
    head = _forced_threshold_head(32, d_in, True)
    served = ReaderHypernet(reader, feats, threshold_head=head)
    # all pointer scores tie: the same (first) word answers both sides, which is refused
    assert served.rules([policy]) == [None]
    head.predict = lambda text, h, spans: (500.0, "review", "approve")
    assert served.rules([policy]) == [("threshold", (500.0, "review", "approve"))]
    got = served.adapters_for_texts([policy])[0]
    A, B = compile_threshold(head, reader.c_down_proj, reader.emb, model.model.norm.weight.detach(), tok,
                             500.0, "review", "approve")
    down = reader.names["down_proj"]
    assert torch.equal(got[down][0], A) and torch.equal(got[down][1], B)
    for n, (a, b) in got.items():
        if n != down:
            assert a.shape[0] == 1 and a.abs().sum() == 0 and b.abs().sum() == 0
    plain = ReaderHypernet(reader, feats)
    assert served.weights_id() != plain.weights_id()
    off = ReaderHypernet(reader, feats, threshold_head=_forced_threshold_head(32, d_in, False))
    want = plain.adapters_for_texts([policy])[0]
    got = off.adapters_for_texts([policy])[0]
    assert all(torch.equal(got[n][0], want[n][0]) and torch.equal(got[n][1], want[n][1]) for n in want)
