"""Reply-level metrics (hyperlora.evaluation.replies) on hand-made replies, and their aggregation in
``summarize``: reply accuracy, clean-reply rate, loop rate, collapse rate."""
from __future__ import annotations

import pytest

from hyperlora.evaluation.evaluate import NO_OPTION, EvalTask, _Preds, markdown_table, summarize
from hyperlora.evaluation.replies import collapsed, first_option, has_loop, is_clean
from hyperlora.tasks.format import Example, PolicyTask


# ------------------------------------------------------------------ first option (reply accuracy)

@pytest.mark.parametrize("reply, options, want", [
    ("flag", ["flag", "pass"], "flag"),
    ("  Flag.\n", ["flag", "pass"], "flag"),                 # case, whitespace, trailing punctuation
    ("flag, because it asks for money", ["flag", "pass"], "flag"),
    ("flagged", ["flag", "pass"], None),                     # a longer word is not the option
    ("", ["flag", "pass"], None),                            # empty reply
    ("   ", ["flag", "pass"], None),
    ("P10", ["P1", "P10", "P2"], "P10"),                     # P1 is a prefix of P10: longest first
    ("P1", ["P10", "P1"], "P1"),
    ("P1.", ["P1", "P10"], "P1"),
    ("P100", ["P1", "P10"], None),
    ("TIER-2", ["TIER-1", "TIER-2", "ROUTINE"], "TIER-2"),   # hyphenated
    ("tier-2\nThe reason is ...", ["TIER-1", "TIER-2"], "TIER-2"),
    ("TIER-3", ["TIER", "TIER-2"], None),                    # '-' continues a label: TIER-3 is not TIER
    ("TIER", ["TIER", "TIER-2"], "TIER"),
    ("needs review", ["review", "needs review"], "needs review"),  # multi-word, prefix of nothing
    ("review needed", ["review", "needs review"], "review"),
    ("needs review", ["needs", "needs review"], "needs review"),  # longest first, not the first listed
    ("needs a look", ["needs", "needs review"], "needs"),
    ("'escalate'", ["close", "escalate"], "escalate"),       # leading quotes / markup are skipped
    ("**close**", ["close", "escalate"], "close"),
    ("Noted: close", ["close", "escalate"], None),           # the option must start the reply
    ("\ufffd noqa", ["close", "escalate"], None),
])
def test_first_option(reply, options, want):
    assert first_option(reply, options) == want


# ------------------------------------------------------------------ clean replies

@pytest.mark.parametrize("reply, options, want", [
    ("flag", ["flag", "pass"], True),
    (" flag \n", ["flag", "pass"], True),
    ("flag.", ["flag", "pass"], True),                       # one final '.' is allowed
    ("FLAG!", ["flag", "pass"], True),
    ("flag..", ["flag", "pass"], False),
    ("flag,", ["flag", "pass"], False),
    ("flag flag", ["flag", "pass"], False),
    ("flag\nbecause", ["flag", "pass"], False),
    ("'flag'", ["flag", "pass"], False),                     # quotes: a program would have to parse
    ("", ["flag", "pass"], False),
    (".", ["flag", "pass"], False),
    ("P1", ["P1", "P10"], True),
    ("P10", ["P1", "P10"], True),
    ("P1 0", ["P1", "P10"], False),
    ("TIER-2", ["TIER-1", "TIER-2"], True),
    ("TIER-2.", ["TIER-1", "TIER-2"], True),
    ("TIER 2", ["TIER-1", "TIER-2"], False),
    ("needs review", ["needs review", "ok"], True),
])
def test_is_clean(reply, options, want):
    assert is_clean(reply, options) is want


# ------------------------------------------------------------------ loops

def test_has_loop():
    assert not has_loop([])
    assert not has_loop([1, 2, 3, 1, 2, 3])                  # twice is not a loop
    assert has_loop([1, 2, 3, 1, 2, 3, 1, 2, 3])
    assert has_loop([7, 7, 7, 7, 7])                         # overlapping occurrences count
    assert not has_loop([7, 7, 7, 7])
    assert has_loop([9, 8] + [1, 2, 3] * 3)
    # only the first 32 tokens count
    tail = list(range(100, 130)) + [1, 2, 3] * 3
    assert not has_loop(tail) and has_loop(tail, window=64)
    assert not has_loop(list(range(40)))
    with pytest.raises(ValueError):
        has_loop([1], n=0)


# ------------------------------------------------------------------ collapse

def test_collapsed():
    assert collapsed(["a", "b", "a"], ["a", "a", "a"]) is True
    assert collapsed(["a", "b", "a"], ["a", "b", "b"]) is False
    assert collapsed(["a", "a"], ["a", "a"]) is None         # one gold answer: not eligible
    assert collapsed([], []) is None


# ------------------------------------------------------------------ aggregation in summarize

def _task(tid, golds, options, family="topic"):
    return PolicyTask(f"policy {tid}", [Example(f"{tid} r{i}", options, g) for i, g in enumerate(golds)],
                      family=family, id=tid)


def _preds(golds, preds, replies, loops=None):
    return _Preds(list(golds), list(preds), ["{}"] * len(golds), list(replies),
                  list(loops) if loops is not None else [False] * len(golds))


def test_summarize_reply_metrics_on_a_crafted_case():
    opts = ["P1", "P10", "TIER-2"]
    t0 = _task("a", ["P1", "P10", "P1", "P10"], opts)                    # collapsed: always P1
    t1 = _task("b", ["P10", "TIER-2", "P10", "TIER-2"], opts, "routing")  # perfect scored predictions
    t2 = _task("c", ["P1", "P1"], opts, "routing")                       # one gold answer: not eligible
    ft = PolicyTask("Start with OK.", [Example("x", check={"regex": "^OK"}), Example("y", check={"regex": "^OK"})],
                    family="format", id="f")
    et = [EvalTask(t0, t0.examples, source="one.jsonl"), EvalTask(t1, t1.examples, source="two.jsonl"),
          EvalTask(t2, t2.examples, source="two.jsonl"), EvalTask(ft, ft.examples, source="one.jsonl")]
    res = {"generated": {
        0: _preds(["P1", "P10", "P1", "P10"], ["P1"] * 4, ["P1", "P10.", "P1 because", ""]),
        1: _preds(["P10", "TIER-2", "P10", "TIER-2"], ["P10", "TIER-2", "P10", "TIER-2"],
                  ["P10", "tier-2", "'P10'", "TIER-2 TIER-2 TIER-2"], [False, False, False, True]),
        2: _preds(["P1", "P1"], ["P1", "P1"], ["P100", "P1"]),
        3: _Preds(["pass", "pass"], ["pass", "fail"], ["OK hi", "no"], ["OK hi", "no"], [True, False]),
    }}
    rep = summarize(et, res, {}, {})
    r = rep["replies"]["generated"]
    # scored, label policies: a = 50 (always P1), b = 100, c = 100 -> 83.33
    assert r["label_acc"] == pytest.approx(83.33, abs=0.01)
    # replies: a: P1, P10, P1, none -> recall P1 1.0, P10 0.5 -> 75; b: P10, TIER-2, P10 (after the quote),
    # TIER-2 -> 100; c: none, P1 -> 50.  mean 75
    assert r["reply_acc"] == pytest.approx(75.0)
    # clean: a: P1, P10. ; b: P10, tier-2 ; c: P1  -> 5 of 10 label replies
    assert r["clean"] == 50.0 and r["label_replies"] == 10
    # loops over all 12 replies (label + free text): b's last one and the free-text "OK hi"
    assert r["loop"] == pytest.approx(100 * 2 / 12, abs=0.01) and r["replies"] == 12
    # collapse: a collapsed, b not, c and the free-text task not eligible
    assert (r["collapse"], r["collapsed"], r["collapse_policies"]) == (50.0, 1, 2)
    # the same metrics per file and per family
    one, two = rep["files"]["one.jsonl"]["generated"], rep["files"]["two.jsonl"]["generated"]
    assert one["collapse"] == 100.0 and two["collapse"] == 0.0
    assert one["reply_acc"] == 75.0 and two["reply_acc"] == 75.0
    assert one["loop"] == pytest.approx(100 * 1 / 6, abs=0.01)
    assert rep["families"]["routing"]["generated"]["clean"] == pytest.approx(100 * 3 / 6, abs=0.01)
    assert rep["families"]["format"]["generated"]["reply_acc"] is None  # no label policies
    md = markdown_table(rep)
    assert "## Replies" in md and "file: one.jsonl" in md and "file: two.jsonl" in md
    assert "| generated | 83.3 | 75.0 | 50.0 (10) | 16.7 (12) | 50.0 (1/2) |" in md


def test_reply_prediction_without_an_option_is_never_right():
    t = _task("a", ["yes", "no"], ["yes", "no"])
    et = [EvalTask(t, t.examples)]
    rep = summarize(et, {"base": {0: _preds(["yes", "no"], ["yes", "no"], ["", "maybe"])}}, {}, {})
    assert rep["replies"]["base"]["reply_acc"] == 0.0 and rep["replies"]["base"]["label_acc"] == 100.0
    assert rep["replies"]["base"]["clean"] == 0.0
    assert NO_OPTION not in ("yes", "no")


def test_no_replies_leaves_reply_metrics_empty_but_collapse_counted():
    t = _task("a", ["yes", "no"], ["yes", "no"])
    et = [EvalTask(t, t.examples)]
    p = _Preds(["yes", "no"], ["yes", "yes"], ["{}", "{}"], [None, None], [None, None])
    r = summarize(et, {"base": {0: p}}, {}, {})["replies"]["base"]
    assert r["reply_acc"] is None and r["clean"] is None and r["loop"] is None
    assert r["collapse"] == 100.0
