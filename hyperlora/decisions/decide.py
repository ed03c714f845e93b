"""``decide``: decisions with a calibrated confidence, a verifier's verdict and an escalation flag.

    rt = hyperlora.attach(model, reader)                       # any runtime with a hypernetwork / PEFT names
    cal = Calibrator.load("calibration.json")                  # fit on calibration policies (eval --escalate)
    ds = hyperlora.decide(rt, records, policy, options, tokenizer=tok, calibrator=cal, family="routing")
    ds[0].answer, ds[0].confidence, ds[0].verdict, ds[0].escalate

Answers come from option scoring under each record's policy adapter (``hyperlora.decisions.scoring``): the
rows of a batch carry different policies and share one forward (the runtime's pool slots, as in serving).
Records without options (free-text rules) get a greedy reply under their adapter instead. The verifier
(``hyperlora.decisions.verifier``) is the base model reading the policy in context, one more batched pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from hyperlora.decisions.calibration import Calibrator, Logistic
from hyperlora.decisions.escalation import escalate_budget, trust_features
from hyperlora.decisions.scoring import ScoreRequest, option_logprobs, option_probabilities
from hyperlora.decisions.verifier import VERIFIERS, Verdict, verify
from hyperlora.modeling.decoding import greedy_decode_texts
from hyperlora.modeling.prompts import prompt_text
from hyperlora.ops.precision import use_bf16
from hyperlora.runtime.runtime import Runtime

__all__ = ["Decision", "decide"]


@dataclass
class Decision:
    """One record's decision.

    answer: the chosen option (label rules) or the reply (free text); probabilities: calibrated option
    probabilities (None for free text); raw_probabilities: the softmax of the option log-likelihoods;
    confidence: calibrated P(answer is right) (None for free text); verdict / verifier_score: the verifier's
    compliance verdict and its probability (None without a verifier, or for an adapter name with no text);
    trust: what escalation ranks by; escalate: send this record to a person."""

    answer: str
    probabilities: dict[str, float] | None
    confidence: float | None
    verdict: bool | None
    verifier_score: float | None
    trust: float | None
    escalate: bool
    raw_probabilities: dict[str, float] | None = None
    verifier_answer: str | None = None
    policy: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _per_record(value: Any, n: int, what: str, *, nested: bool = False) -> list[Any]:
    """One entry per record from a shared value or a list of n."""
    if value is None or isinstance(value, str) or (nested and value and isinstance(value[0], str)):
        return [value] * n
    vals = list(value)
    if len(vals) != n:
        raise ValueError(f"{what} has {len(vals)} entries for {n} records: give one shared value or one per record")
    return vals


def _is_adapter_name(rt: Runtime, entry: str) -> bool:
    # The runtime tells names from texts (Runtime._entry_kind); a loaded name has no policy text to read.
    return entry in getattr(rt, "_peft", {})


def decide(rt: Runtime, records: Sequence[str], policy: str | Sequence[str],
           options: Sequence[str] | Sequence[Sequence[str] | None] | None = None, *, tokenizer: Any,
           family: str | Sequence[str | None] | None = None, calibrator: Calibrator | None = None,
           verifier: str | None = "in_context", policy_text: str | Sequence[str | None] | None = None,
           budget: float = 0.1, rule: str = "budget", threshold: float | None = None, max_new_tokens: int = 32,
           batch_size: int = 16, bf16: bool | None = None) -> list[Decision]:
    """Decide every record under its policy; returns one ``Decision`` per record, in order.

    records: record texts. policy: one policy for all records or one per record, each a policy text (its
    adapter is generated into the runtime's pool) or a ``rt.load_peft`` / ``add_adapter`` name. options: one
    option list for all records, one per record (None: free text), or None (all free text). tokenizer: the
    base model's. family: the task family (or one per record) whose calibration applies (None: the fit over
    all families). calibrator: a ``Calibrator`` fit on calibration policies (None: raw probabilities, which
    are not calibrated). verifier: "in_context" (label rules; free text falls back to "judge"), "judge", or
    None. policy_text: the text the verifier reads where ``policy`` is an adapter name. rule: "budget"
    (escalate trust below the calibrator's budget threshold, else the least-trusted ``budget`` share of this
    call's records) or "conformal" (below the calibrator's risk-controlled threshold, docs/DECISIONS.md);
    threshold: an explicit trust threshold instead. bf16: autocast (default where the device runs it natively).
    """
    if isinstance(records, str):
        raise TypeError("records must be a list of record texts, not one string")
    recs = list(records)
    n = len(recs)
    if n == 0:
        return []
    if verifier is not None and verifier not in VERIFIERS:
        raise ValueError(f"verifier must be one of {VERIFIERS} or None, got {verifier!r}")
    if rule not in ("budget", "conformal"):
        raise ValueError(f"rule must be 'budget' or 'conformal', got {rule!r}")
    if tokenizer is None:
        raise ValueError("decide needs the base model's tokenizer (tokenizer=...)")
    pols = _per_record(policy, n, "policy")
    opts = _per_record(options, n, "options", nested=True)
    fams = _per_record(family, n, "family")
    texts = _per_record(policy_text, n, "policy_text")
    for i, o in enumerate(opts):
        if o is not None and (len(o) < 2 or len(set(o)) != len(o)):
            raise ValueError(f"options of record {i} must be at least two distinct strings, got {o!r}")
    model = rt.model
    device = next(model.parameters()).device
    bf = use_bf16(bf16, device)
    uniq = list(dict.fromkeys(pols))
    row_of = {p: k for k, p in enumerate(uniq)}

    def under_policies(rows: list[int]):
        return rt.policies([uniq[r] if r >= 0 else None for r in rows])

    lab = [i for i in range(n) if opts[i] is not None]
    free = [i for i in range(n) if opts[i] is None]
    answers: list[str] = [""] * n
    raw: list[list[float] | None] = [None] * n
    if lab:
        reqs = [ScoreRequest(prompt_text(tokenizer, recs[i]), list(opts[i]), row_of[pols[i]]) for i in lab]
        scores = option_logprobs(model, tokenizer, reqs, batch_context=under_policies, batch_size=batch_size, bf16=bf)
        for i, s in zip(lab, scores):
            raw[i] = s
            answers[i] = opts[i][max(range(len(s)), key=lambda k: s[k])]
    if free:
        replies = greedy_decode_texts(model, tokenizer, [prompt_text(tokenizer, recs[i]) for i in free],
                                      [row_of[pols[i]] for i in free], batch_context=under_policies,
                                      max_new_tokens=max_new_tokens, batch_size=batch_size, bf16=bf)
        for i, r in zip(free, replies):
            answers[i] = r.strip()
    verdicts: list[Verdict | None] = [None] * n
    if verifier is not None:
        readable = [i for i in range(n) if (texts[i] or (None if _is_adapter_name(rt, pols[i]) else pols[i]))]
        if readable:
            got = verify(model, tokenizer, [recs[i] for i in readable],
                         [texts[i] or pols[i] for i in readable], [answers[i] for i in readable],
                         [opts[i] for i in readable], kind=verifier,
                         batch_context=lambda rows: rt.policies([None] * len(rows)), batch_size=batch_size, bf16=bf)
            for i, v in zip(readable, got):
                verdicts[i] = v
    cal = calibrator
    trust_model = Logistic.from_dict(cal.trust) if cal is not None and cal.trust else None
    out: list[Decision] = []
    trusts: list[float] = []
    for i in range(n):
        v = verdicts[i]
        if raw[i] is not None:
            probs = cal.probabilities(raw[i], fams[i]) if cal else option_probabilities(raw[i])
            conf = cal.confidence(raw[i], fams[i]) if cal else max(probs)
            trust = conf
            if trust_model is not None and v is not None and v.kind == "in_context":
                trust = trust_model(trust_features(conf, v.score, v.ok))
            d = Decision(answers[i], dict(zip(opts[i], probs)), conf, v.ok if v else None, v.score if v else None,
                         trust, False, dict(zip(opts[i], option_probabilities(raw[i]))), v.answer if v else None,
                         pols[i])
        else:
            trust = v.score if v is not None else -math.inf  # a free-text reply nobody checked is least trusted
            d = Decision(answers[i], None, None, v.ok if v else None, v.score if v else None,
                         v.score if v else None, False, None, None, pols[i])
        trusts.append(trust)
        out.append(d)
    thr = threshold
    if thr is None and cal is not None:
        th = cal.thresholds.get(rule) or {}
        thr = th.get(f"{budget:g}") if rule == "budget" else th.get("threshold")
        if rule == "conformal" and thr is None and th:
            thr = math.inf  # nothing was certified on the calibration policies: escalate everything
    if rule == "conformal" and thr is None:
        raise ValueError("rule='conformal' needs a calibrator with a conformal threshold (or threshold=...)")
    flags = [t < thr for t in trusts] if thr is not None else escalate_budget(trusts, budget)
    for d, f in zip(out, flags):
        d.escalate = bool(f)
    return out
