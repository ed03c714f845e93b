"""The eval's escalation section: per condition the issue's fields, cross-fitted calibration (no policy is
calibrated on its own records), the verifier reused from the in_context condition, per family / file tables,
the charts and the calibrator; `hyperlora eval --escalate` end to end on a tiny model."""
from __future__ import annotations

import argparse
import json

import pytest

from eval_helpers import hash_encoder, tiny_hypernet, tiny_llama, tiny_tokenizer
from hyperlora.decisions.calibration import Calibrator
from hyperlora.evaluation import escalation as esc
from hyperlora.evaluation.evaluate import evaluate, select_tasks, summarize
from hyperlora.evaluation.sources import HypernetSource
from hyperlora.tasks import tiny_suite

FIELDS = {"budget", "error_all", "error_auto", "error_auto_perfect", "capture", "ece", "aurc", "selective_acc_90"}


@pytest.fixture(scope="module")
def evaluated():
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=0)
    et = select_tasks([t for t in tiny_suite() if t.split != "train"], max_policies=2, examples_per_policy=5,
                      oracle_per_family=0)
    res, info = evaluate(model, tok, et, conditions=["base", "in_context", "generated"],
                         hypernet=HypernetSource(tiny_hypernet(model), hash_encoder), max_new_tokens=3,
                         progress=False, replies=False, bf16=False)
    return model, tok, et, res, info


def test_section_fields_crossfit_and_verifier_reuse(evaluated, tmp_path):
    model, tok, et, res, info = evaluated
    ver = esc.in_context_scores(model, tok, et, res, where="system")
    fresh = esc.in_context_scores(model, tok, et, res, where="user")  # not reusable: scored again
    assert set(ver) == set(fresh)
    for k in ver:
        assert ver[k] == pytest.approx(fresh[k], abs=2e-3)  # reused scores are rounded to 3 decimals
    section, rows = esc.escalation_section(et, res, budget=0.1, verifier=ver, splits=5)
    assert set(section["conditions"]) == {"base", "in_context", "generated"}
    g = section["conditions"]["generated"]
    assert FIELDS <= set(g) and g["budget"] == 0.1 and g["rule"] == "confidence+verifier"
    assert 0.0 <= g["ece"] <= 1.0 and g["records"] == sum(1 for t in et for e in t.examples if e.options)
    assert {"confidence_only", "verifier", "conformal", "families", "files"} <= set(g)
    assert set(g["conformal"]) == {"policy", "record"} and "held" in g["conformal"]["policy"]["resampled"]
    assert set(g["families"]) == {t.family for t in et if t.examples[0].options is not None}
    # in_context agrees with itself: the verifier says nothing there
    assert section["conditions"]["in_context"]["verifier"]["agree_rate"] == 1.0
    # cross-fitting: every policy's calibrator was fit on the other fold only
    folds = esc._folds(rows["generated"], 0)
    assert set(folds.values()) == {0, 1}
    md = esc.markdown_tables(section)
    assert "### generated" in md and "| family: routing |" in md and "| file: tasks |" in md
    paths = esc.write_section_files(section, rows, tmp_path, "q")
    for k in ("risk_coverage", "reliability"):
        assert paths[k].read_bytes()[:4] == b"\x89PNG"
    cal = esc.deployment_calibrator(rows["generated"], budget=0.1, alpha=0.1, delta=0.1)
    back = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back.trust is not None and "0.1" in back.thresholds["budget"] and "conformal" in back.thresholds
    with pytest.raises(ValueError, match="budget"):
        esc.escalation_section(et, res, budget=1.0)


def test_cli_eval_escalate_end_to_end(evaluated, tmp_path):
    from hyperlora.cli.eval import add_arguments, run
    from hyperlora.cli.errors import UsageError

    model, tok, et, _, _ = evaluated
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    f = tmp_path / "mine.jsonl"
    rows = [{"policy": f"Answer {a} when the record says {w}, else {b}.", "family": "routing",
             "examples": [{"input": f"it says {w if i % 2 else 'nothing'} {i}", "options": [a, b],
                           "answer": a if i % 2 else b} for i in range(6)]}
            for a, b, w in [("red", "blue", "sky"), ("yes", "no", "ok"), ("up", "down", "rise"), ("hot", "cold", "sun")]]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "res"
    args = p.parse_args(["--tasks", str(f), "--model", str(mdir), "--conditions", "base", "in_context",
                         "--examples-per-policy", "6", "--max-policies", "4", "--out", str(out), "--no-progress", "--fp32", "--no-replies",
                         "--escalate", "0.1"])
    assert run(args) == 0
    rep = json.loads((out / "quality.json").read_text())
    e = rep["escalation"]["conditions"]["base"]
    assert FIELDS <= set(e) and set(e["files"]) == {"mine.jsonl"}
    assert (out / "quality_escalation.md").is_file() and (out / "quality_risk_coverage.png").is_file()
    bad = p.parse_args(["--tasks", str(f), "--model", str(mdir), "--escalate", "1.5"])
    with pytest.raises(UsageError):
        run(bad)
