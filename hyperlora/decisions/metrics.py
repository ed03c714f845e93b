"""Metrics of decisions and of escalation rules, on records (micro averages).

Notation: ``conf[i]`` a confidence in [0, 1], ``correct[i]`` whether decision i was right, ``trust[i]`` the
score an escalation rule ranks by (higher = more trusted; escalated first are the lowest), ``budget`` the
share of decisions sent to a person.

- ``ece``: expected calibration error with 15 equal-width confidence bins, sum_b n_b / n * |acc_b - conf_b|.
- ``risk_coverage``: keep the ``k`` most trusted decisions (k = 1..n); coverage k / n, risk = their error rate.
- ``aurc``: the area under that curve, the mean risk over k = 1..n (lower is better; ties in trust are
  averaged over their orderings by giving tied decisions their group's mean error).
- ``error_auto_perfect(error_all, budget) = max(0, error_all - budget) / (1 - budget)``: the error left among
  the auto-approved decisions by a perfect escalator, which sends the wrong decisions first.
- ``capture = (error_all - error_auto) / (error_all - error_auto_perfect)``: the share of the achievable
  reduction a rule achieves (random escalation: 0 in expectation, perfect: 1; None when nothing is
  achievable, i.e. no error at all).
"""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["ece", "reliability_bins", "risk_coverage", "aurc", "selective_accuracy", "error_auto_perfect",
           "capture", "verdict_balanced_accuracy", "error_rate"]

ECE_BINS = 15


def _check(a: Sequence, b: Sequence, an: str, bn: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{an} ({len(a)}) and {bn} ({len(b)}) differ in length")


def reliability_bins(conf: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> list[dict]:
    """Equal-width bins over [0, 1] (the last one closed): per bin its edges, count, mean confidence and
    accuracy (None where empty)."""
    _check(conf, correct, "conf", "correct")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    acc = [[0, 0.0, 0] for _ in range(bins)]  # n, sum conf, n correct
    for c, ok in zip(conf, correct):
        if not (0.0 <= c <= 1.0):
            raise ValueError(f"confidence {c} is outside [0, 1]")
        b = min(int(c * bins), bins - 1)
        acc[b][0] += 1
        acc[b][1] += c
        acc[b][2] += bool(ok)
    return [{"lo": k / bins, "hi": (k + 1) / bins, "n": n, "conf": (s / n if n else None), "acc": (m / n if n else None)}
            for k, (n, s, m) in enumerate(acc)]


def ece(conf: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> float:
    """Expected calibration error (15 equal-width bins by default); NaN without decisions."""
    n = len(conf)
    if n == 0:
        return math.nan
    return sum(b["n"] / n * abs(b["acc"] - b["conf"]) for b in reliability_bins(conf, correct, bins) if b["n"])


def _ranked_errors(trust: Sequence[float], wrong: Sequence[bool]) -> list[float]:
    """Errors in decreasing trust, each tie group given its mean error (order-free among ties)."""
    _check(trust, wrong, "trust", "wrong")
    order = sorted(range(len(trust)), key=lambda i: -trust[i])
    out: list[float] = []
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and trust[order[j + 1]] == trust[order[i]]:
            j += 1
        grp = [float(bool(wrong[order[k]])) for k in range(i, j + 1)]
        out += [sum(grp) / len(grp)] * len(grp)
        i = j + 1
    return out


def risk_coverage(trust: Sequence[float], wrong: Sequence[bool]) -> tuple[list[float], list[float]]:
    """(coverages k / n, risks: error rate of the k most trusted), k = 1..n."""
    errs = _ranked_errors(trust, wrong)
    n = len(errs)
    cov, risk, s = [], [], 0.0
    for k, e in enumerate(errs, 1):
        s += e
        cov.append(k / n)
        risk.append(s / k)
    return cov, risk


def aurc(trust: Sequence[float], wrong: Sequence[bool]) -> float:
    """Area under the risk-coverage curve (mean risk over coverages k / n); NaN without decisions."""
    _, risk = risk_coverage(trust, wrong)
    return sum(risk) / len(risk) if risk else math.nan


def selective_accuracy(trust: Sequence[float], correct: Sequence[bool], coverage: float = 0.9) -> float:
    """Accuracy of the ceil(coverage * n) most trusted decisions (ties averaged); NaN without decisions."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    errs = _ranked_errors(trust, [not c for c in correct])
    if not errs:
        return math.nan
    k = max(1, math.ceil(coverage * len(errs) - 1e-9))
    return 1.0 - sum(errs[:k]) / k


def error_rate(wrong: Sequence[bool]) -> float:
    return sum(bool(w) for w in wrong) / len(wrong) if len(wrong) else math.nan


def error_auto_perfect(error_all: float, budget: float) -> float:
    """max(0, error_all - budget) / (1 - budget): what a perfect escalator leaves among the auto-approved."""
    if not 0.0 <= budget < 1.0:
        raise ValueError(f"budget must be in [0, 1), got {budget}")
    return max(0.0, error_all - budget) / (1.0 - budget)


def capture(error_all: float, error_auto: float, budget: float) -> float | None:
    """(error_all - error_auto) / (error_all - error_auto_perfect); None when that denominator is 0."""
    den = error_all - error_auto_perfect(error_all, budget)
    if den <= 0 or math.isnan(den) or math.isnan(error_auto):
        return None
    return (error_all - error_auto) / den


def verdict_balanced_accuracy(verdict_ok: Sequence[bool], correct: Sequence[bool]) -> float | None:
    """Balanced accuracy of a verifier at telling right decisions (verdict ok) from wrong ones (verdict not
    ok): the mean of its recall on right and on wrong decisions; None unless both kinds are present."""
    _check(verdict_ok, correct, "verdict_ok", "correct")
    pos = [bool(v) for v, c in zip(verdict_ok, correct) if c]
    neg = [not v for v, c in zip(verdict_ok, correct) if not c]
    if not pos or not neg:
        return None
    return 0.5 * (sum(pos) / len(pos) + sum(neg) / len(neg))
