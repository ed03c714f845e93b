"""Escalation rules: the fixed budget escalates exactly the least-trusted share; the Learn-then-Test threshold
keeps the auto-approved error <= alpha in >= 1 - delta of fresh calibration draws (simulated), with policies
as the units; the resampled check reports it."""
from __future__ import annotations

import math
import random

import pytest

from hyperlora.decisions.escalation import (budget_threshold, check_guarantee, conformal_threshold, escalate_budget,
                                            binom_cdf, hb_pvalue)


def test_budget_escalates_the_least_trusted_share():
    trust = [0.9, 0.1, 0.5, 0.3, 0.8, 0.7, 0.2, 0.6, 0.4, 0.95]
    esc = escalate_budget(trust, 0.2)
    assert [i for i, e in enumerate(esc) if e] == [1, 6]
    assert sum(escalate_budget(trust, 0.0)) == 0 and all(escalate_budget(trust, 1.0))
    assert budget_threshold(trust, 0.2) == 0.3  # escalate trust < 0.3: the same two
    with pytest.raises(ValueError):
        escalate_budget(trust, 1.5)


def test_hb_pvalue_is_small_only_well_below_alpha():
    assert hb_pvalue(0.1, 100, 0.1) == 1.0
    assert hb_pvalue(0.02, 500, 0.1) < 1e-6
    assert hb_pvalue(0.09, 20, 0.1) > 0.5
    assert 0.0 <= hb_pvalue(0.0, 5, 0.1) <= 1.0


def _draw(rng: random.Random, policies: int, per: int = 10):
    """Policies with their own difficulty (factor 0.5..1.5); wrong more likely at low trust."""
    trust, wrong, groups = [], [], []
    for p in range(policies):
        hard = 0.5 + rng.random()
        for _ in range(per):
            t = rng.random()
            trust.append(t)
            wrong.append(rng.random() < 0.5 * hard * (1 - t) ** 2)
            groups.append(p)
    return trust, wrong, groups


@pytest.mark.parametrize("unit,policies", [("record", 60), ("policy", 1500)])
def test_conformal_threshold_controls_the_risk_over_fresh_draws(unit, policies):
    rng = random.Random(0)
    alpha, delta = 0.1, 0.2
    trust_b, wrong_b, _ = _draw(random.Random(99), 5000)  # the population, approximately
    fails = certified = 0
    runs = 30 if unit == "record" else 8
    for _ in range(runs):
        res = conformal_threshold(*_draw(rng, policies), alpha=alpha, delta=delta, unit=unit)
        if not res.certified:
            continue
        certified += 1
        acc = [w for t, w in zip(trust_b, wrong_b) if t >= res.threshold]
        fails += (sum(acc) / len(acc)) > alpha
    assert certified >= runs // 2
    assert fails / runs <= delta


def test_binom_cdf_matches_the_sum():
    import math as m

    for n, k, p in ((10, 3, 0.2), (50, 0, 0.1), (7, 7, 0.5)):
        ref = sum(m.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k + 1))
        assert binom_cdf(k, n, p) == pytest.approx(ref)


def test_conformal_threshold_escalates_everything_when_nothing_can_be_certified():
    rng = random.Random(1)
    trust = [rng.random() for _ in range(40)]
    res = conformal_threshold(trust, [True] * 40, list(range(40)), alpha=0.1, delta=0.1)
    assert not res.certified and math.isinf(res.threshold) and res.cal_coverage == 0.0
    assert res.to_dict()["threshold"] is None  # JSON has no infinity
    with pytest.raises(ValueError, match="unit"):
        conformal_threshold(trust, [True] * 40, list(range(40)), unit="task")


def test_check_guarantee_reports_the_rate_it_held():
    rng = random.Random(2)
    trust, wrong, groups = _draw(rng, 120)
    out = check_guarantee(lambda cal, test: ([trust[i] for i in cal], [trust[i] for i in test]), wrong, groups,
                          alpha=0.15, delta=0.2, splits=20)
    assert set(out) >= {"held", "certified", "vacuous", "mean_test_coverage", "ok"}
    assert 0.0 <= out["held"] <= 1.0 and out["splits"] == 20
    with pytest.raises(ValueError, match="4 policies"):
        check_guarantee(lambda c, t: ([], []), [True] * 3, [0, 1, 2])
