"""Decision metrics: ECE (15 bins), risk-coverage / AURC, selective accuracy, error_auto_perfect and capture
as issue 22 defines them, the verifier's balanced accuracy."""
from __future__ import annotations

import math
import random

import pytest

from hyperlora.decisions.metrics import (aurc, capture, ece, error_auto_perfect, reliability_bins, risk_coverage,
                                         selective_accuracy, verdict_balanced_accuracy)


def test_ece_by_hand():
    # bin [0.8, 0.867): 2 decisions at 0.8, one right -> |0.5 - 0.8| * 2/4; bin of 1.0: 2 at 1.0, both right -> 0
    assert ece([0.8, 0.8, 1.0, 1.0], [True, False, True, True]) == pytest.approx(0.15)
    assert ece([], []) != ece([], [])  # NaN
    bins = reliability_bins([0.0, 0.5, 1.0], [False, True, True])
    assert len(bins) == 15 and sum(b["n"] for b in bins) == 3 and bins[-1]["n"] == 1 and bins[0]["acc"] == 0.0
    with pytest.raises(ValueError, match="outside"):
        ece([1.5], [True])


def test_perfectly_calibrated_draws_have_small_ece():
    rng = random.Random(0)
    conf = [rng.random() for _ in range(20000)]
    ok = [rng.random() < c for c in conf]
    assert ece(conf, ok) < 0.02


def test_risk_coverage_and_aurc():
    trust = [0.9, 0.8, 0.7, 0.1]
    wrong = [False, False, True, True]
    cov, risk = risk_coverage(trust, wrong)
    assert cov == [0.25, 0.5, 0.75, 1.0] and risk == pytest.approx([0, 0, 1 / 3, 0.5])
    assert aurc(trust, wrong) == pytest.approx((0 + 0 + 1 / 3 + 0.5) / 4)
    # ties are averaged: all-tied trust gives the constant error rate at every coverage
    assert risk_coverage([1, 1, 1, 1], wrong)[1] == pytest.approx([0.5] * 4)
    assert selective_accuracy(trust, [not w for w in wrong], 0.5) == 1.0
    assert selective_accuracy(trust, [not w for w in wrong], 1.0) == 0.5


def test_error_auto_perfect_and_capture_definitions():
    assert error_auto_perfect(0.3, 0.1) == pytest.approx(0.2 / 0.9)
    assert error_auto_perfect(0.05, 0.1) == 0.0
    e_all, b = 0.3, 0.1
    assert capture(e_all, error_auto_perfect(e_all, b), b) == pytest.approx(1.0)  # a perfect escalator
    assert capture(e_all, e_all, b) == pytest.approx(0.0)  # random escalation leaves the error rate
    assert capture(0.0, 0.0, b) is None  # nothing to reduce
    with pytest.raises(ValueError):
        error_auto_perfect(0.3, 1.0)


def test_random_escalation_captures_nothing_on_average():
    rng = random.Random(1)
    from hyperlora.decisions.escalation import escalate_budget

    caps = []
    for _ in range(200):
        wrong = [rng.random() < 0.3 for _ in range(200)]
        esc = escalate_budget([rng.random() for _ in wrong], 0.1)
        auto = [w for w, e in zip(wrong, esc) if not e]
        caps.append(capture(sum(wrong) / 200, sum(auto) / len(auto), 0.1))
    assert abs(sum(caps) / len(caps)) < 0.1


def test_verdict_balanced_accuracy():
    assert verdict_balanced_accuracy([True, True, False, False], [True, True, False, False]) == 1.0
    assert verdict_balanced_accuracy([True, True, True, True], [True, False, True, False]) == 0.5
    assert verdict_balanced_accuracy([True, False], [True, True]) is None
    assert math.isclose(verdict_balanced_accuracy([True, False, True], [True, True, False]), 0.25)
