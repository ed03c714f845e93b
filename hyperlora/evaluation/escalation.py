"""The ``"escalation"`` section of ``hyperlora eval --escalate BUDGET``: calibrated confidence, the grounding
verifier and escalation at a budget, per condition, from the records the evaluation already scored.

How each number is made (docs/DECISIONS.md says what they mean and assume):

- Records: the label (option) records of each condition; a decision is right when its best option is gold.
- Calibration is cross-fitted by *policy*: the evaluated policies are split in two folds (within each task
  file, seeded); each fold's confidences come from a calibrator (temperature per family, ``"*"`` for the
  rest) and a trust model fit on the other fold only, so no record is calibrated with its own policy's
  records. ``ece_raw`` / ``ece``: before / after, 15 bins.
- Verifier: ``in_context`` = the base model with the policy in the system turn scores the same options
  (reused from the in_context condition's scores when it ran with ``--where system``); verdict: it agrees
  with the condition's answer. ``judge`` (generated condition only): the base model reading policy, record
  and answer scores yes/no; on free-text records compared with the regex checks.
- Trust = the cross-fitted logistic model of P(right | calibrated confidence, verifier score, agreement);
  ``confidence_only`` ranks by calibrated confidence alone. The budget rule escalates the least-trusted
  ``budget`` share of the records; per group the same flags, with ``capture`` against that group's share.
- ``conformal``: Learn-then-Test thresholds (``hyperlora.decisions.escalation``) at ``alpha``, ``delta``;
  checked over resampled half / half policy splits (everything refit on the calibration half).
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Sequence

from hyperlora._io import atomic_write_text, save_figure
from hyperlora.decisions.calibration import ALL, CalibrationSample, Calibrator, Logistic, fit_calibrator
from hyperlora.decisions.escalation import (budget_threshold, check_guarantee, conformal_threshold,
                                            escalate_budget, fit_trust, trust_features)
from hyperlora.decisions.metrics import (aurc, capture, ece, error_auto_perfect, reliability_bins, risk_coverage,
                                         selective_accuracy, verdict_balanced_accuracy)
from hyperlora.decisions.scoring import option_logprobs
from hyperlora.decisions.verifier import agreement, in_context_requests, judge_request, judge_verdict

__all__ = ["Row", "collect_rows", "in_context_scores", "judge_scores", "escalation_section", "markdown_tables",
           "write_escalation_charts", "deployment_calibrator"]


class Row:
    """One scored label record of one condition."""

    __slots__ = ("task", "k", "policy", "family", "file", "scores", "gold", "pred", "vscores", "judge",
                 "conf", "conf_raw", "trust", "vscore", "agree")

    def __init__(self, task, k, policy, family, file, scores, gold, pred):
        self.task, self.k, self.policy, self.family, self.file = task, k, policy, family, file
        self.scores, self.gold, self.pred = scores, gold, pred
        self.vscores = self.judge = None
        self.conf = self.conf_raw = self.trust = self.vscore = self.agree = None

    @property
    def correct(self) -> bool:
        return self.pred == self.gold


def _scores_of(output: str, options: Sequence[str]) -> list[float]:
    d = json.loads(output)
    return [float(d[o]) for o in options]


def collect_rows(etasks: Sequence[Any], preds: dict[int, Any]) -> list[Row]:
    """The label records of one condition's predictions (``evaluate``'s results[cond])."""
    rows = []
    for ti, p in preds.items():
        et = etasks[ti]
        for k, (ex, out) in enumerate(zip(et.examples, p.outputs)):
            if ex.options is None or len(ex.options) < 2:
                continue
            sc = _scores_of(out, ex.options)
            rows.append(Row(ti, k, et.task.id or f"#{ti}", et.family, et.file, sc, ex.options.index(ex.answer),
                            ex.options.index(p.preds[k])))
    return rows


def in_context_scores(model: Any, tokenizer: Any, etasks: Sequence[Any], results: dict[str, dict[int, Any]], *,
                      where: str = "system", batch_size: int = 16, bf16: bool = False) -> dict[tuple[int, int], list[float]]:
    """(task, example) -> the in-context verifier's option scores: the in_context condition's own scores when
    it ran with the policy in the system turn, else scored now (base model, policy in the system turn)."""
    out: dict[tuple[int, int], list[float]] = {}
    if "in_context" in results and where == "system":
        for ti, p in results["in_context"].items():
            for k, (ex, o) in enumerate(zip(etasks[ti].examples, p.outputs)):
                if ex.options is not None:
                    out[(ti, k)] = _scores_of(o, ex.options)
        return out
    keys = [(ti, k) for ti, et in enumerate(etasks) for k, ex in enumerate(et.examples) if ex.options is not None]
    reqs = in_context_requests(tokenizer, [etasks[t].examples[k].input for t, k in keys],
                               [etasks[t].task.policy for t, k in keys], [etasks[t].examples[k].options for t, k in keys])
    for key, s in zip(keys, option_logprobs(model, tokenizer, reqs, batch_size=batch_size, bf16=bf16)):
        out[key] = s
    return out


def judge_scores(model: Any, tokenizer: Any, etasks: Sequence[Any], preds: dict[int, Any], *, batch_size: int = 16,
                 bf16: bool = False) -> dict[tuple[int, int], float]:
    """(task, example) -> the judge's p(yes) that the condition's answer (label) or generation (free text)
    follows the policy."""
    keys, reqs = [], []
    for ti, p in preds.items():
        et = etasks[ti]
        for k, ex in enumerate(et.examples):
            ans = p.preds[k] if ex.options is not None else p.outputs[k]
            keys.append((ti, k))
            reqs.append(judge_request(tokenizer, ex.input, et.task.policy, ans))
    sc = option_logprobs(model, tokenizer, reqs, batch_size=batch_size, bf16=bf16) if reqs else []
    return {key: judge_verdict(s).score for key, s in zip(keys, sc)}


def _folds(rows: Sequence[Row], seed: int) -> dict[str, int]:
    """Policy -> fold (0/1), alternating within each task file after a seeded shuffle."""
    by_file: dict[str, list[str]] = {}
    for r in rows:
        lst = by_file.setdefault(r.file, [])
        if r.policy not in lst:
            lst.append(r.policy)
    rng = random.Random(seed)
    out = {}
    for pols in by_file.values():
        pols = sorted(pols)
        rng.shuffle(pols)
        for j, p in enumerate(pols):
            out[p] = j % 2
    return out


def _fit(rows: Sequence[Row], method: str) -> tuple[Calibrator, Logistic | None]:
    cal = fit_calibrator([CalibrationSample(r.scores, r.gold, r.family, r.policy) for r in rows], method)
    trust = None
    if all(r.vscore is not None for r in rows):
        confs = [cal.confidence(r.scores, r.family) for r in rows]
        if len({r.correct for r in rows}) == 2:
            trust = fit_trust(confs, [r.vscore for r in rows], [r.agree for r in rows], [r.correct for r in rows])
    return cal, trust


def _apply(rows: Sequence[Row], cal: Calibrator, trust: Logistic | None) -> tuple[list[float], list[float]]:
    conf = [cal.confidence(r.scores, r.family) for r in rows]
    tr = [trust(trust_features(c, r.vscore, r.agree)) if trust is not None else c for c, r in zip(conf, rows)]
    return conf, tr


def _rule_metrics(trust: Sequence[float], correct: Sequence[bool], budget: float) -> dict[str, Any]:
    wrong = [not c for c in correct]
    esc = escalate_budget(trust, budget)
    auto = [w for w, e in zip(wrong, esc) if not e]
    e_all = sum(wrong) / len(wrong)
    e_auto = sum(auto) / len(auto) if auto else math.nan
    return {"error_auto": _r(e_auto), "capture": _r(capture(e_all, e_auto, budget)), "aurc": _r(aurc(trust, wrong)),
            "selective_acc_90": _r(selective_accuracy(trust, correct, 0.9))}


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


def _group(rows: Sequence[Row], esc: Sequence[bool]) -> dict[str, Any]:
    correct = [r.correct for r in rows]
    wrong = [not c for c in correct]
    n = len(rows)
    e_all = sum(wrong) / n
    share = sum(esc) / n
    auto = [w for w, e in zip(wrong, esc) if not e]
    e_auto = sum(auto) / len(auto) if auto else math.nan
    ver = [r.agree for r in rows if r.agree is not None]
    return {"records": n, "policies": len({r.policy for r in rows}), "error_all": _r(e_all),
            "escalated": _r(share), "error_auto": _r(e_auto),
            "error_auto_perfect": _r(error_auto_perfect(e_all, min(share, 0.999))),
            "capture": _r(capture(e_all, e_auto, min(share, 0.999))),
            "ece_raw": _r(ece([r.conf_raw for r in rows], correct)), "ece": _r(ece([r.conf for r in rows], correct)),
            "verifier_bal_acc": _r(verdict_balanced_accuracy([r.agree for r in rows], correct))
            if len(ver) == n else None}


def escalation_section(etasks: Sequence[Any], results: dict[str, dict[int, Any]], *, budget: float = 0.1,
                       alpha: float = 0.1, delta: float = 0.1, method: str = "temperature",
                       verifier: dict[tuple[int, int], list[float]] | None = None,
                       judge: dict[str, dict[tuple[int, int], float]] | None = None, splits: int = 100,
                       seed: int = 0) -> tuple[dict[str, Any], dict[str, list[Row]]]:
    """The section (one entry per condition with label records) and the rows behind it (for the charts)."""
    if not 0.0 < budget < 1.0:
        raise ValueError(f"budget must be in (0, 1), got {budget}")
    section: dict[str, Any] = {"budget": budget, "alpha": alpha, "delta": delta, "calibration": method,
                               "calibration_split": "2 folds by policy within each task file (cross-fitted)",
                               "conditions": {}}
    all_rows: dict[str, list[Row]] = {}
    for cond, preds in results.items():
        rows = collect_rows(etasks, preds)
        if len({r.policy for r in rows}) < 4:
            section.setdefault("skipped", {})[cond] = "fewer than 4 label policies (2 folds of 2 needed)"
            continue
        for r in rows:
            if verifier is not None and (r.task, r.k) in verifier:
                v = agreement(etasks[r.task].examples[r.k].options[r.pred], etasks[r.task].examples[r.k].options,
                              verifier[(r.task, r.k)])
                r.vscore, r.agree = v.score, v.ok
            if judge and cond in judge and (r.task, r.k) in judge[cond]:
                r.judge = judge[cond][(r.task, r.k)]
            r.conf_raw = Calibrator("none", {ALL: {}}).confidence(r.scores)
        folds = _folds(rows, seed)
        conf_only: list[float] = [0.0] * len(rows)
        for f in (0, 1):
            fit_rows = [r for r in rows if folds[r.policy] != f]
            idx = [i for i, r in enumerate(rows) if folds[r.policy] == f]
            cal, trust = _fit(fit_rows, method)
            conf, tr = _apply([rows[i] for i in idx], cal, trust)
            for i, c, t in zip(idx, conf, tr):
                rows[i].conf, rows[i].trust = c, t
                conf_only[i] = c
        correct = [r.correct for r in rows]
        wrong = [not c for c in correct]
        e_all = sum(wrong) / len(rows)
        trust = [r.trust for r in rows]
        main = _rule_metrics(trust, correct, budget)
        conf_m = _rule_metrics(conf_only, correct, budget)
        has_v = all(r.agree is not None for r in rows)
        entry: dict[str, Any] = {
            "budget": budget, "records": len(rows), "policies": len({r.policy for r in rows}),
            "rule": "confidence+verifier" if has_v else "confidence", "error_all": _r(e_all),
            "error_auto": main["error_auto"], "error_auto_perfect": _r(error_auto_perfect(e_all, budget)),
            "capture": main["capture"], "ece": _r(ece([r.conf for r in rows], correct)),
            "ece_raw": _r(ece([r.conf_raw for r in rows], correct)), "aurc": main["aurc"],
            "selective_acc_90": main["selective_acc_90"], "confidence_only": conf_m,
            "raw_confidence_only": _rule_metrics([r.conf_raw for r in rows], correct, budget)}
        if has_v:
            entry["verifier"] = {"kind": "in_context (base model, policy in the system turn; verdict: agrees)",
                                 "balanced_accuracy": _r(verdict_balanced_accuracy([r.agree for r in rows], correct)),
                                 "agree_rate": _r(sum(r.agree for r in rows) / len(rows)),
                                 "verifier_only": _rule_metrics([r.vscore for r in rows], correct, budget)}
            entry["verifier_beats_confidence"] = (main["error_auto"] is not None and conf_m["error_auto"] is not None
                                                  and main["error_auto"] < conf_m["error_auto"])
        if any(r.judge is not None for r in rows):
            jr = [r for r in rows if r.judge is not None]
            entry["judge"] = {"kind": "base model reads policy + record + answer, p(yes) >= 0.5",
                              "balanced_accuracy": _r(verdict_balanced_accuracy([r.judge >= 0.5 for r in jr],
                                                                                [r.correct for r in jr])),
                              "judge_only": _rule_metrics([r.judge for r in jr], [r.correct for r in jr], budget)}
        esc = escalate_budget(trust, budget)
        for kind, key in (("families", "family"), ("files", "file")):
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(rows):
                groups.setdefault(getattr(r, key), []).append(i)
            entry[kind] = {g: _group([rows[i] for i in ix], [esc[i] for i in ix]) for g, ix in sorted(groups.items())}
        entry["reliability"] = {"raw": reliability_bins([r.conf_raw for r in rows], correct),
                                "calibrated": reliability_bins([r.conf for r in rows], correct)}

        def refit(cal_rows: list[int], test_rows: list[int], rows=rows):
            c, t = _fit([rows[i] for i in cal_rows], method)
            return _apply([rows[i] for i in cal_rows], c, t)[1], _apply([rows[i] for i in test_rows], c, t)[1]

        groups_p = [r.policy for r in rows]
        conf_entry = {}
        for unit in ("policy", "record"):
            conf_entry[unit] = {"all_policies": conformal_threshold(trust, wrong, groups_p, alpha=alpha, delta=delta,
                                                                    unit=unit).to_dict()}
        for unit in ("policy", "record"):
            conf_entry[unit]["resampled"] = check_guarantee(refit, wrong, groups_p, alpha=alpha, delta=delta, unit=unit,
                                                            splits=splits, seed=seed)
        entry["conformal"] = conf_entry
        section["conditions"][cond] = entry
        all_rows[cond] = rows
    if judge:
        for cond, jd in judge.items():
            ft = [(ti, k) for ti, p in results.get(cond, {}).items()
                  for k, ex in enumerate(etasks[ti].examples) if ex.options is None and (ti, k) in jd]
            if ft and cond in section["conditions"]:
                ok = [results[cond][ti].preds[k] == "pass" for ti, k in ft]
                v = [jd[(ti, k)] >= 0.5 for ti, k in ft]
                section["conditions"][cond]["free_text"] = {
                    "records": len(ft), "regex_pass": _r(sum(ok) / len(ok)),
                    "judge_agreement_with_regex": _r(sum(a == b for a, b in zip(ok, v)) / len(ft)),
                    "judge_balanced_accuracy": _r(verdict_balanced_accuracy(v, ok))}
    return section, all_rows


def deployment_calibrator(rows: Sequence[Row], *, budget: float, alpha: float, delta: float,
                          method: str = "temperature", source: str = "") -> Calibrator:
    """A calibrator for ``decide`` fit on every row given (use it on *other* policies), with the trust model
    and its budget and conformal (policy-unit) thresholds."""
    cal, trust = _fit(rows, method)
    conf, tr = _apply(rows, cal, trust)
    cal.trust = trust.to_dict() if trust is not None else None
    res = conformal_threshold(tr, [not r.correct for r in rows], [r.policy for r in rows], alpha=alpha, delta=delta)
    cal.thresholds = {"budget": {f"{budget:g}": budget_threshold(tr, budget)}, "conformal": res.to_dict()}
    cal.fitted_on["source"] = source
    return cal


def _cell(v: Any, pct: bool = True) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def markdown_tables(section: dict[str, Any]) -> str:
    """One table per condition: overall, per family, per task file."""
    out = [f"## Escalation at a {100 * section['budget']:g}% budget", "",
           "Errors, escalated share and ECE in %; capture in [0, 1] (1 = a perfect escalator). Calibration "
           f"{section['calibration']}, {section['calibration_split']}.", ""]
    for cond, e in section["conditions"].items():
        out += [f"### {cond} (rule: {e['rule']})", "",
                "| group | records | error_all | escalated | error_auto | perfect | capture | ECE raw | ECE | verifier bal. acc |",
                "|---|---|---|---|---|---|---|---|---|---|",
                f"| **all** | {e['records']} | {_cell(e['error_all'])} | {100 * e['budget']:g} | {_cell(e['error_auto'])} | "
                f"{_cell(e['error_auto_perfect'])} | {_cell(e['capture'], False)} | {_cell(e['ece_raw'])} | "
                f"{_cell(e['ece'])} | {_cell((e.get('verifier') or {}).get('balanced_accuracy'))} |"]
        for kind in ("families", "files"):
            for g, c in e[kind].items():
                out.append(f"| {kind[:-1] if kind == 'files' else 'family'}: {g} | {c['records']} | "
                           f"{_cell(c['error_all'])} | {_cell(c['escalated'])} | {_cell(c['error_auto'])} | "
                           f"{_cell(c['error_auto_perfect'])} | {_cell(c['capture'], False)} | {_cell(c['ece_raw'])} | "
                           f"{_cell(c['ece'])} | {_cell(c['verifier_bal_acc'])} |")
        co = e["confidence_only"]
        out += ["", f"Confidence only: error_auto {_cell(co['error_auto'])}, capture {_cell(co['capture'], False)}, "
                    f"AURC {_cell(co['aurc'])}; with the verifier: error_auto {_cell(e['error_auto'])}, capture "
                    f"{_cell(e['capture'], False)}, AURC {_cell(e['aurc'])}. Selective accuracy at 90% coverage "
                    f"{_cell(e['selective_acc_90'])}."]
        for unit, c in e["conformal"].items():
            rs = c["resampled"]
            out.append(f"Conformal (alpha {section['alpha']}, delta {section['delta']}, unit {unit}): held in "
                       f"{100 * rs['held']:.0f}% of {rs['splits']} resampled policy splits (target "
                       f"{100 * rs['target']:.0f}%), certified in {100 * rs['certified']:.0f}%, mean test coverage "
                       f"{100 * rs['mean_test_coverage']:.1f}%.")
        if "free_text" in e:
            ft = e["free_text"]
            out.append(f"Free text ({ft['records']} records): judge agrees with the regex checks on "
                       f"{_cell(ft['judge_agreement_with_regex'])}% (balanced accuracy "
                       f"{_cell(ft['judge_balanced_accuracy'])}).")
        out.append("")
    return "\n".join(out)


def write_escalation_charts(section: dict[str, Any], rows: dict[str, list[Row]], out_dir: str | Path,
                            name: str = "quality") -> dict[str, Path]:
    """``<name>_risk_coverage.png`` and ``<name>_reliability.png`` (atomic); {} without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return {}
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for cond, rs in rows.items():
        cov, risk = risk_coverage([r.trust for r in rs], [not r.correct for r in rs])
        ax.plot(cov, risk, label=f"{cond} (AURC {aurc([r.trust for r in rs], [not r.correct for r in rs]):.3f})")
    ax.axvline(1 - section["budget"], color="grey", ls="--", lw=0.8)
    ax.set_xlabel("coverage (share auto-approved)")
    ax.set_ylabel("error among auto-approved")
    ax.set_title("Risk-coverage (trust = calibrated confidence + verifier)")
    if rows:
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths["risk_coverage"] = save_figure(plt, fig, d / f"{name}_risk_coverage.png")
    conds = list(section["conditions"])
    fig, axes = plt.subplots(1, max(1, len(conds)), figsize=(3.2 * max(1, len(conds)), 3.4), squeeze=False)
    for ax, cond in zip(axes[0], conds):
        rel = section["conditions"][cond]["reliability"]
        for key, mk in (("raw", "o--"), ("calibrated", "s-")):
            pts = [(b["conf"], b["acc"]) for b in rel[key] if b["n"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], mk, ms=3,
                    label=f"{key} (ECE {100 * section['conditions'][cond]['ece' if key == 'calibrated' else 'ece_raw']:.1f}%)")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.6)
        ax.set_title(cond, fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=6)
    fig.tight_layout()
    paths["reliability"] = save_figure(plt, fig, d / f"{name}_reliability.png")
    return paths


def write_section_files(section: dict[str, Any], rows: dict[str, list[Row]], out_dir: str | Path,
                        name: str = "quality") -> dict[str, Path]:
    """``<name>_escalation.md`` and the two charts."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    md = d / f"{name}_escalation.md"
    atomic_write_text(md, "# Decisions and escalation\n\n" + markdown_tables(section) + "\n")
    return {"escalation_md": md, **write_escalation_charts(section, rows, d, name)}


def add_escalation(rep: dict[str, Any], model: Any, tokenizer: Any, etasks: Sequence[Any],
                   results: dict[str, dict[int, Any]], *, budget: float, alpha: float = 0.1, delta: float = 0.1,
                   where: str = "system", batch_size: int = 16, bf16: bool = False, judge: bool = True,
                   splits: int = 100, seed: int = 0, out_dir: str | Path | None = None,
                   name: str = "quality") -> dict[str, Path]:
    """What ``hyperlora eval --escalate BUDGET`` adds: ``rep["escalation"]``, and (with ``out_dir``) the
    markdown tables, the two charts and ``<name>_calibration.json`` (a calibrator for ``decide`` fit on all
    the generated condition's policies: for serving *other* policies)."""
    ver = in_context_scores(model, tokenizer, etasks, results, where=where, batch_size=batch_size, bf16=bf16)
    jd = None
    if judge and "generated" in results:
        jd = {"generated": judge_scores(model, tokenizer, etasks, results["generated"], batch_size=batch_size,
                                        bf16=bf16)}
    section, rows = escalation_section(etasks, results, budget=budget, alpha=alpha, delta=delta, verifier=ver,
                                       judge=jd, splits=splits, seed=seed)
    rep["escalation"] = section
    paths: dict[str, Path] = {}
    if out_dir is not None:
        paths = write_section_files(section, rows, out_dir, name)
        if "generated" in rows:
            cal = deployment_calibrator(rows["generated"], budget=budget, alpha=alpha, delta=delta,
                                        source=str(rep.get("config", {}).get("tasks", "")))
            paths["calibration"] = cal.save(Path(out_dir) / f"{name}_calibration.json")
    return paths
