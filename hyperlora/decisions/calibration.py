"""Calibration of option probabilities: temperature or Platt scaling, per task family, fit on calibration
*policies* (never on records of the policies they are then used on), saved and loaded as JSON.

The raw option probabilities of a generated adapter (softmax of whole-option log-likelihoods,
``hyperlora.decisions.scoring.option_probabilities``) are not probabilities: a 135M model is often 99% sure and
wrong. Two calibrators:

- ``temperature``: p = softmax(scores / T), one T per family, T fit by minimising the negative log-likelihood
  of the gold option (a convex problem in 1 / T, solved by golden-section search on log T). Keeps the ranking
  of options; the confidence is the calibrated probability of the best option.
- ``platt``: confidence = sigmoid(a * logit(raw p_max) + b) per family, fit by logistic regression on
  (raw p_max, was the best option right). Calibrates the confidence only; the option probabilities stay
  temperature-1.

A family with fewer than ``min_records`` calibration records uses the fit over all families (``"*"``), which
is also what an unknown family gets. ``Logistic`` is the small logistic regression both Platt scaling and the
combined trust score (``hyperlora.decisions.escalation``) use.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from hyperlora._io import atomic_write_text
from hyperlora.decisions.scoring import option_probabilities

__all__ = ["CalibrationSample", "Calibrator", "Logistic", "fit_calibrator", "fit_temperature", "logit", "METHODS"]

METHODS = ("temperature", "platt", "none")
ALL = "*"
_EPS = 1e-6


def logit(p: float) -> float:
    p = min(max(float(p), _EPS), 1.0 - _EPS)
    return math.log(p / (1.0 - p))


@dataclass
class CalibrationSample:
    """One scored record of a calibration policy: option log-likelihoods, the gold option's index."""

    scores: Sequence[float]
    gold: int
    family: str = ALL
    policy: str = ""


@dataclass
class Logistic:
    """p = sigmoid(w . x + b), fit by Newton's method with a small L2 penalty (float64)."""

    w: list[float]
    b: float

    def __call__(self, x: Sequence[float]) -> float:
        z = self.b + sum(wi * xi for wi, xi in zip(self.w, x))
        return 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))

    @classmethod
    def fit(cls, xs: Sequence[Sequence[float]], ys: Sequence[bool], l2: float = 1e-3, iters: int = 50) -> "Logistic":
        if not xs:
            raise ValueError("no samples to fit a logistic model on")
        X = torch.tensor([list(x) + [1.0] for x in xs], dtype=torch.float64)
        y = torch.tensor([float(bool(v)) for v in ys], dtype=torch.float64)
        w = torch.zeros(X.shape[1], dtype=torch.float64)
        reg = torch.eye(X.shape[1], dtype=torch.float64) * l2 * len(xs)
        reg[-1, -1] = 0.0
        for _ in range(iters):
            p = torch.sigmoid(X @ w)
            g = X.T @ (p - y) + reg @ w
            H = X.T @ (X * (p * (1 - p)).unsqueeze(1)) + reg + 1e-9 * torch.eye(X.shape[1], dtype=torch.float64)
            step = torch.linalg.solve(H, g)
            w = w - step
            if float(step.abs().max()) < 1e-10:
                break
        return cls([float(v) for v in w[:-1]], float(w[-1]))

    def to_dict(self) -> dict[str, Any]:
        return {"w": self.w, "b": self.b}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Logistic":
        return cls([float(v) for v in d["w"]], float(d["b"]))


def fit_temperature(samples: Sequence[CalibrationSample], lo: float = 0.05, hi: float = 200.0) -> float:
    """The temperature T minimising the mean NLL of the gold options (golden-section on log T in [lo, hi])."""
    if not samples:
        raise ValueError("no samples to fit a temperature on")
    k = max(len(s.scores) for s in samples)
    S = torch.full((len(samples), k), -math.inf, dtype=torch.float64)
    for i, s in enumerate(samples):
        S[i, : len(s.scores)] = torch.tensor([float(x) for x in s.scores], dtype=torch.float64)
    gold = S[torch.arange(len(samples)), torch.tensor([s.gold for s in samples])]

    def nll(log_t: float) -> float:
        t = math.exp(log_t)
        return float((torch.logsumexp(S / t, dim=1) - gold / t).mean())

    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    return math.exp((a + b) / 2)


def _raw_top(s: CalibrationSample) -> tuple[float, bool]:
    p = option_probabilities(s.scores)
    best = max(range(len(p)), key=lambda i: p[i])
    return p[best], best == s.gold


@dataclass
class Calibrator:
    """Per-family calibration of option scores. ``params[family]``: {"t": T} (temperature) or {"a", "b"} (Platt);
    ``"*"`` is the fit over every family. ``trust``: the combined trust model (``escalation.fit_trust``), if
    any; ``thresholds``: escalation thresholds fit with it ({"budget": {"0.1": t}, "conformal": {...}});
    ``fitted_on``: where the calibration records came from (policies, records, source)."""

    method: str = "temperature"
    params: dict[str, dict[str, float]] = field(default_factory=lambda: {ALL: {"t": 1.0}})
    trust: dict[str, Any] | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def _p(self, family: str | None) -> dict[str, float]:
        return self.params.get(family or ALL) or self.params[ALL]

    def probabilities(self, scores: Sequence[float], family: str | None = None) -> list[float]:
        """Calibrated option probabilities (Platt and none: temperature-1 softmax)."""
        t = self._p(family).get("t", 1.0) if self.method == "temperature" else 1.0
        return option_probabilities(scores, t)

    def confidence(self, scores: Sequence[float], family: str | None = None) -> float:
        """The calibrated probability that the best-scoring option is right."""
        p = self.probabilities(scores, family)
        top = max(p)
        if self.method == "platt":
            q = self._p(family)
            return Logistic([q["a"]], q["b"])([logit(top)])
        return top

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "hyperlora.decisions.calibrator", "version": 1, "method": self.method, "params": self.params,
                "trust": self.trust, "thresholds": self.thresholds, "fitted_on": self.fitted_on}

    def save(self, path: str | Path) -> Path:
        """Write the calibrator as JSON, atomically (a temporary file beside it, then renamed)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, json.dumps(self.to_dict(), indent=2) + "\n")
        return p

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibrator":
        if not isinstance(d, dict) or d.get("kind") != "hyperlora.decisions.calibrator":
            raise ValueError("not a hyperlora calibrator (its JSON needs kind 'hyperlora.decisions.calibrator')")
        method = d.get("method")
        if method not in METHODS:
            raise ValueError(f"calibrator method {method!r} is not one of {METHODS}")
        params = {str(k): {str(a): float(b) for a, b in v.items()} for k, v in (d.get("params") or {}).items()}
        if ALL not in params:
            raise ValueError("calibrator params lack the all-families fit '*'")
        for fam, q in params.items():
            need = {"temperature": ("t",), "platt": ("a", "b"), "none": ()}[method]
            if any(k not in q or not math.isfinite(q[k]) for k in need) or (method == "temperature" and q["t"] <= 0):
                raise ValueError(f"calibrator params[{fam!r}] = {q} is not a valid {method} fit")
        return cls(method, params, d.get("trust"), dict(d.get("thresholds") or {}), dict(d.get("fitted_on") or {}))

    @classmethod
    def load(cls, path: str | Path) -> "Calibrator":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _fit_one(method: str, samples: Sequence[CalibrationSample]) -> dict[str, float]:
    if method == "temperature":
        return {"t": fit_temperature(samples)}
    if method == "platt":
        top = [_raw_top(s) for s in samples]
        m = Logistic.fit([[logit(p)] for p, _ in top], [ok for _, ok in top])
        return {"a": m.w[0], "b": m.b}
    return {}


def fit_calibrator(samples: Sequence[CalibrationSample], method: str = "temperature", *, per_family: bool = True,
                   min_records: int = 30) -> Calibrator:
    """Fit ``method`` on calibration records (of calibration policies only): over all families, and per
    family where it has at least ``min_records`` records."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    samples = [s for s in samples if len(s.scores) >= 2]  # one option is no decision
    if not samples:
        raise ValueError("no calibration records with at least two options")
    params = {ALL: _fit_one(method, samples)}
    if per_family:
        fams: dict[str, list[CalibrationSample]] = {}
        for s in samples:
            fams.setdefault(s.family, []).append(s)
        for f, ss in fams.items():
            if f != ALL and len(ss) >= min_records:
                params[f] = _fit_one(method, ss)
    return Calibrator(method, params, fitted_on={"records": len(samples),
                                                 "policies": len({s.policy for s in samples}),
                                                 "families": sorted({s.family for s in samples})})
