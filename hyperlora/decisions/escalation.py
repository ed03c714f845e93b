"""Escalation: which decisions go to a person, from a trust score (higher = more trusted).

Two rules:

- **Fixed budget** (``escalate_budget``): the least-trusted ``budget`` share of a batch (default 10%) is
  escalated; ``budget_threshold`` turns a budget into a trust threshold on calibration decisions, for
  streams where there is no batch to rank.
- **Risk control** (``conformal_threshold``): a threshold chosen on calibration data so that the error of the
  auto-approved decisions is at most ``alpha`` with probability at least ``1 - delta`` over the draw of the
  calibration data (Learn then Test, Angelopoulos, Bates et al. 2021, the distribution-free risk control of
  Angelopoulos et al.; the selective form of "Trust or Escalate", Jung et al., ICLR 2025). Write
  a(x) = [trust(x) >= lambda] (auto-approved) and w(x) = the decision is wrong. Two versions:

  ``unit="record"`` (Trust or Escalate): records are the exchangeable units. For each lambda the null
  "P(w | a) > alpha" is tested with the exact binomial p-value of the wrong count among the accepted
  calibration records; thresholds are tested in a fixed sequence from the strictest down and the chosen one is
  the last rejected before the first failure (family-wise error <= delta); the sequence starts at the first
  threshold accepting ceil(ln delta / ln(1 - alpha)) records (fewer could never reject: it looks at the
  calibration trust values, never at their labels). Promise: P(error rate among the
  auto-approved of new records <= alpha) >= 1 - delta, if new records are exchangeable with the calibration
  records. Records of one policy are not exchangeable with records of another, so on new policies this is a
  hope, checked empirically (``check_guarantee``), not a theorem.

  ``unit="policy"``: policies are the units. For lambda on a fixed grid (``POLICY_GRID``, chosen before seeing
  data), each calibration policy contributes the mean over its records of w a - alpha a + alpha (in [0, 1]);
  the null "E[w a] - alpha E[a] > 0" (over new policies and their records) is tested with the Hoeffding-Bentkus
  p-value, Bonferroni over the grid, and the lowest rejected lambda is chosen. Promise: with probability
  >= 1 - delta over the calibration policies, E[w a] <= alpha E[a] on new policies drawn like them (the
  auto-approved error as a ratio of expectations, each record of a new policy weighted alike). It needs many
  policies: with tens of them it certifies nothing at alpha = 0.1 and escalates everything.

  When no threshold is certified the rule escalates everything (threshold +inf) and says so.

What breaks it: calibration policies that are not exchangeable with the served ones (another family mix, a
new author, a different adapter source or model), a trust function fit on the same policies that then test
it (the empirical check below refits everything per split), and ties: ``>=`` on tied trust values.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from hyperlora.decisions.calibration import Logistic, logit

__all__ = ["escalate_budget", "budget_threshold", "trust_features", "fit_trust", "hb_pvalue", "binom_cdf", "POLICY_GRID", "ConformalResult",
           "conformal_threshold", "check_guarantee"]


def escalate_budget(trust: Sequence[float], budget: float = 0.1) -> list[bool]:
    """Escalate the round(budget * n) least-trusted decisions (ties: the later ones first)."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be in [0, 1], got {budget}")
    n = len(trust)
    k = int(round(budget * n))
    order = sorted(range(n), key=lambda i: (trust[i], -i))
    out = [False] * n
    for i in order[:k]:
        out[i] = True
    return out


def budget_threshold(cal_trust: Sequence[float], budget: float = 0.1) -> float:
    """The trust value below which ``budget`` of the calibration decisions fall (escalate trust < it)."""
    if not cal_trust:
        raise ValueError("no calibration trust values")
    s = sorted(cal_trust)
    k = int(round(budget * len(s)))
    return s[k] if k < len(s) else math.inf


def trust_features(confidence: float, verifier_score: float | None, agree: bool | None) -> list[float]:
    """Features of the combined trust model: logit confidence, logit verifier score, agreement (0/1)."""
    return [logit(confidence), logit(0.5 if verifier_score is None else verifier_score),
            0.5 if agree is None else float(bool(agree))]


def fit_trust(confidence: Sequence[float], verifier_score: Sequence[float | None], agree: Sequence[bool | None],
              correct: Sequence[bool]) -> Logistic:
    """A logistic model of P(decision right | confidence, verifier): the combined trust score."""
    xs = [trust_features(c, v, a) for c, v, a in zip(confidence, verifier_score, agree)]
    return Logistic.fit(xs, correct)


POLICY_GRID = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99)


def _h(a: float, b: float) -> float:
    a = min(max(a, 1e-12), 1 - 1e-12)
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), exactly (log-space sum)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq
             for j in range(k + 1)]
    m = max(terms)
    return min(1.0, math.exp(m) * sum(math.exp(t - m) for t in terms))


def hb_pvalue(mean: float, n: int, alpha: float) -> float:
    """Hoeffding-Bentkus p-value of H0 "E[x] >= alpha" for n i.i.d. x in [0, 1] with sample mean ``mean``."""
    if n <= 0 or mean >= alpha:
        return 1.0
    p_h = math.exp(-n * _h(mean, alpha))
    p_b = math.e * binom_cdf(math.ceil(n * mean - 1e-12), n, alpha)
    return min(1.0, p_h, p_b)


@dataclass
class ConformalResult:
    threshold: float  # auto-approve trust >= threshold (+inf: nothing certified, escalate everything)
    certified: bool
    alpha: float
    delta: float
    unit: str
    units: int
    cal_coverage: float  # share of calibration decisions auto-approved at the threshold
    cal_error_auto: float | None

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


def conformal_threshold(trust: Sequence[float], wrong: Sequence[bool], groups: Sequence[Any], *, alpha: float = 0.1,
                        delta: float = 0.1, unit: str = "policy", max_candidates: int = 400) -> ConformalResult:
    """The Learn-then-Test threshold (module docstring) on calibration decisions: ``trust``, ``wrong`` and the
    policy of each (``groups``)."""
    if unit not in ("policy", "record"):
        raise ValueError(f"unit must be 'policy' or 'record', got {unit!r}")
    if not (0 < alpha < 1 and 0 < delta < 1):
        raise ValueError(f"alpha and delta must be in (0, 1), got {alpha}, {delta}")
    n = len(trust)
    if not (n == len(wrong) == len(groups)) or n == 0:
        raise ValueError("trust, wrong and groups must be non-empty and of one length")
    best = math.inf
    if unit == "record":
        order = sorted(range(n), key=lambda i: -trust[i])
        n_min = math.ceil(math.log(delta) / math.log1p(-alpha))  # fewer accepted records can never reject
        n_acc = w_acc = 0
        j = 0
        for lam in sorted(set(trust), reverse=True):  # strictest first; stop at the first failure
            while j < n and trust[order[j]] >= lam:
                n_acc += 1
                w_acc += bool(wrong[order[j]])
                j += 1
            if n_acc < n_min:
                continue  # the sequence starts where a test can reject at all
            if binom_cdf(w_acc, n_acc, alpha) > delta:
                break
            best = lam
        units = n
    else:
        members: dict[Any, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        units = len(members)
        for lam in POLICY_GRID:
            xs = []
            for idx in members.values():
                acc = [i for i in idx if trust[i] >= lam]
                xs.append((sum(bool(wrong[i]) for i in acc) - alpha * len(acc)) / len(idx) + alpha)
            if hb_pvalue(sum(xs) / len(xs), len(xs), alpha) <= delta / len(POLICY_GRID):
                best = min(best, lam)
    acc = [i for i in range(n) if trust[i] >= best]
    return ConformalResult(best, math.isfinite(best), alpha, delta, unit, units, len(acc) / n,
                           (sum(bool(wrong[i]) for i in acc) / len(acc)) if acc else None)


def check_guarantee(fit_and_score: Callable[[list[int], list[int]], tuple[list[float], list[float]]],
                    wrong: Sequence[bool], groups: Sequence[Any], *, alpha: float = 0.1, delta: float = 0.1,
                    unit: str = "policy", splits: int = 100, cal_share: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """Resample policy splits: ``fit_and_score(cal_rows, test_rows)`` fits whatever the trust needs on the
    calibration rows and returns (cal trust, test trust); the threshold is chosen on the calibration half and
    the auto-approved error measured on the test half. Returns how often it stayed <= alpha ("held"; a split
    that auto-approves nothing holds vacuously and is counted in ``vacuous``), the mean test coverage, and
    the rate at which a threshold was certified at all."""
    pols = list(dict.fromkeys(groups))
    if len(pols) < 4:
        raise ValueError(f"need at least 4 policies to resample splits, got {len(pols)}")
    rng = random.Random(seed)
    held = vac = cert = 0
    covs, errs = [], []
    for _ in range(splits):
        rng.shuffle(pols)
        cut = max(2, min(len(pols) - 2, round(cal_share * len(pols))))
        cal_p = set(pols[:cut])
        cal = [i for i, g in enumerate(groups) if g in cal_p]
        test = [i for i, g in enumerate(groups) if g not in cal_p]
        t_cal, t_test = fit_and_score(cal, test)
        res = conformal_threshold(t_cal, [wrong[i] for i in cal], [groups[i] for i in cal], alpha=alpha,
                                  delta=delta, unit=unit)
        cert += res.certified
        acc = [i for i, t in zip(test, t_test) if t >= res.threshold]
        covs.append(len(acc) / len(test))
        if not acc:
            held += 1
            vac += 1
            continue
        e = sum(bool(wrong[i]) for i in acc) / len(acc)
        errs.append(e)
        held += e <= alpha
    return {"alpha": alpha, "delta": delta, "unit": unit, "splits": splits, "held": held / splits,
            "target": 1 - delta, "ok": held / splits >= 1 - delta, "vacuous": vac / splits,
            "certified": cert / splits, "mean_test_coverage": sum(covs) / len(covs),
            "mean_test_error_auto": (sum(errs) / len(errs)) if errs else None}
