"""Calibration: temperature and Platt fits recover what generated the data, per family with a fallback,
JSON round trip (atomic save), refusal of malformed files."""
from __future__ import annotations

import json
import math
import random

import pytest

from hyperlora.decisions.calibration import CalibrationSample, Calibrator, Logistic, fit_calibrator, fit_temperature
from hyperlora.decisions.metrics import ece


def _samples(t_true: float, n: int, family: str, seed: int, k: int = 3) -> list[CalibrationSample]:
    """Scores whose softmax at temperature t_true is the true answer distribution."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = [rng.gauss(0, 3.0) for _ in range(k)]
        p = [math.exp(x / t_true) for x in s]
        z = sum(p)
        u, acc, g = rng.random() * z, 0.0, k - 1
        for j, q in enumerate(p):
            acc += q
            if u <= acc:
                g = j
                break
        out.append(CalibrationSample(s, g, family, f"{family}-{i // 10}"))
    return out


def test_temperature_fit_recovers_the_generating_temperature():
    assert fit_temperature(_samples(4.0, 4000, "a", 0)) == pytest.approx(4.0, rel=0.1)
    assert fit_temperature(_samples(0.5, 4000, "a", 1)) == pytest.approx(0.5, rel=0.1)


def test_per_family_fits_and_fallback_and_lower_ece():
    s = _samples(4.0, 600, "wide", 2) + _samples(0.7, 600, "sharp", 3) + _samples(2.0, 10, "rare", 4)
    cal = fit_calibrator(s, "temperature", min_records=30)
    assert set(cal.params) == {"*", "wide", "sharp"}
    assert cal.params["wide"]["t"] == pytest.approx(4.0, rel=0.2) and cal.params["sharp"]["t"] < 1.0
    assert cal._p("rare") == cal.params["*"] and cal._p("unknown") == cal.params["*"]
    test = _samples(4.0, 2000, "wide", 9)
    raw = Calibrator("none", {"*": {}})
    ok = [max(range(3), key=lambda k: t.scores[k]) == t.gold for t in test]
    assert ece([cal.confidence(t.scores, "wide") for t in test], ok) < 0.5 * ece([raw.confidence(t.scores) for t in test], ok)
    p = cal.probabilities([1.0, 2.0, 3.0], "wide")
    assert sum(p) == pytest.approx(1.0) and p[2] > p[1] > p[0]


def test_platt_fit_calibrates_the_confidence():
    s = _samples(3.0, 3000, "a", 5)
    cal = fit_calibrator(s, "platt")
    ok = [max(range(3), key=lambda k: t.scores[k]) == t.gold for t in s]
    assert ece([cal.confidence(t.scores) for t in s], ok) < 0.03
    assert 0 < cal.params["*"]["a"] < 1  # raw confidences are over-confident: the slope shrinks them


def test_logistic_fit_matches_a_known_model():
    rng = random.Random(0)
    xs = [[rng.gauss(0, 1)] for _ in range(5000)]
    ys = [rng.random() < 1 / (1 + math.exp(-(2 * x[0] - 1))) for x in xs]
    m = Logistic.fit(xs, ys)
    assert m.w[0] == pytest.approx(2.0, abs=0.2) and m.b == pytest.approx(-1.0, abs=0.15)


def test_save_load_round_trip_and_refusals(tmp_path):
    cal = fit_calibrator(_samples(2.0, 200, "a", 6), "temperature", min_records=50)
    cal.thresholds = {"budget": {"0.1": 0.42}}
    path = cal.save(tmp_path / "sub" / "cal.json")
    back = Calibrator.load(path)
    assert back.to_dict() == cal.to_dict()
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["cal.json"]  # no temporary file left behind
    bad = cal.to_dict()
    bad["params"]["*"]["t"] = -1.0
    with pytest.raises(ValueError, match="not a valid temperature"):
        Calibrator.from_dict(bad)
    with pytest.raises(ValueError, match="not a hyperlora calibrator"):
        Calibrator.from_dict({"method": "temperature"})
    with pytest.raises(ValueError, match="one of"):
        Calibrator.from_dict({**cal.to_dict(), "method": "isotonic"})
    with pytest.raises(ValueError, match="'\\*'"):
        Calibrator.from_dict({**cal.to_dict(), "params": {"a": {"t": 1.0}}})
    (tmp_path / "x.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError):
        Calibrator.load(tmp_path / "x.json")
