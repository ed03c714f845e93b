"""`hyperlora eval`: held-out policy evaluation of the hypernetwork against the alternatives, in one run.

Conditions (all on the same examples, with the same prompt format, ``hyperlora.modeling.prompts``):
  base                the base model, no policy anywhere
  in_context          the policy in the prompt (system turn by default)
  multitask_lora      a LoRA fine-tuned on the training policies with the policy in the prompt
                      (``hyperlora train --method multitask_lora``), policy in the prompt
  generated           the adapter the hypernetwork writes from the policy; no policy in the prompt
  generated_shuffled  the adapter written from another task's policy (same family where possible)
  oracle_lora         a LoRA trained on that one policy's own examples (a few policies per family; the
                      examples it trains on are never the ones it is scored on)

Metric: balanced accuracy in percent per policy (mean recall over its gold options; free-text tasks: the
share of greedy generations passing the regex), averaged over policies with equal weight, overall, per
family and per split, with the number of examples and policies. The oracle is only trained on a few
policies, so ``oracle_subset`` also gives every condition on exactly those policies' examples.

Writes ``<out>/<name>.json`` (``{"held_out": {...}, "families": {...}, "splits": {...}, "config": {...}}``),
``<out>/<name>.md`` (a table) and ``<out>/<name>.png`` (a chart), and ``<name>_predictions.jsonl``, each
atomically (a temporary file beside it, then renamed: an interrupted eval never leaves a half-written report).
A task whose oracle cannot be trained (e.g. free text without reference replies) has its oracle skipped,
named with the reason in the report's ``oracle_skipped``; that is decided by ``select_tasks``, before any
model work.
Works on any task file in the JSONL format (``hyperlora.tasks.format``); untagged tasks are grouped
under family "all" and split "user".
"""
from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence


from hyperlora._io import atomic_path, atomic_write_text
from hyperlora.tasks.format import Example, PolicyTask
from hyperlora.modeling.prompts import prompt_text
from hyperlora.evaluation.scoring import (AdapterSet, ScoreRequest, greedy_generate, macro_balanced_accuracy,
                                        option_logprobs, predict_options)
from hyperlora.evaluation.sources import stack_adapter_sets

log = logging.getLogger(__name__)

CONDITIONS = ("base", "in_context", "multitask_lora", "generated", "generated_shuffled", "oracle_lora")
HELD_OUT_SPLITS = ("held_out_combo", "held_out_topic", "held_out_words")
AdapterSource = Callable[[Sequence[str]], AdapterSet]
OracleTrainer = Callable[[Any, Any, Sequence[Example]], AdapterSet]

__all__ = ["CONDITIONS", "EvalTask", "select_tasks", "shuffled_partners", "evaluate", "summarize", "write_report",
           "markdown_table", "write_chart", "oracle_problem", "task_label"]


@dataclass
class EvalTask:
    """A task as evaluated: the examples scored, and (oracle tasks only) the disjoint examples to train on.

    oracle_skipped: why a task chosen for an oracle gets none (its examples cannot train one), else None.
    """

    task: PolicyTask
    examples: list[Example]
    oracle_train: list[Example] | None = None
    oracle_skipped: str | None = None

    @property
    def family(self) -> str:
        return self.task.family or "all"

    @property
    def split(self) -> str:
        return self.task.split or "user"


def oracle_problem(train: Sequence[Example]) -> str | None:
    """Why an oracle LoRA cannot be trained on ``train`` (``train_policy_lora`` needs an ``answer``), else None."""
    if not train:
        return "no examples to train an oracle on"
    if not any(e.answer for e in train):
        return ("its oracle training examples have no 'answer' (free-text examples need a reference reply "
                "to train an oracle on)")
    return None


def task_label(et: EvalTask, index: int) -> str:
    """How reports name a task: its id, else its index and the start of its policy."""
    if et.task.id:
        return et.task.id
    pol = et.task.policy if len(et.task.policy) <= 40 else et.task.policy[:37] + "..."
    return f"#{index} ({pol})"


def select_tasks(tasks: Sequence[PolicyTask], *, max_policies: int | None = None,
                 examples_per_policy: int | None = None, oracle_per_family: int = 1,
                 oracle_train_examples: int = 24) -> list[EvalTask]:
    """Keep at most ``max_policies`` per (split, family) and ``examples_per_policy`` examples per task.

    The first ``oracle_per_family`` tasks of each family (taken round-robin over splits) get oracle
    training examples: the task's examples beyond the scored ones if at least 4 remain, otherwise the
    task's examples are halved (the second half is scored by every condition, the first trains the oracle).
    A task whose oracle examples could not train one (``oracle_problem``: no reference answers) keeps all
    its examples scored and gets ``oracle_skipped`` (the reason) instead of ``oracle_train``.
    """
    if max_policies is not None and max_policies < 1:
        raise ValueError(f"max_policies must be >= 1 (or None for all), got {max_policies}")
    if examples_per_policy is not None and examples_per_policy < 1:
        raise ValueError(f"examples_per_policy must be >= 1 (or None for all), got {examples_per_policy}")
    groups: dict[tuple[str, str], list[PolicyTask]] = {}
    for t in tasks:
        groups.setdefault((t.split or "user", t.family or "all"), []).append(t)
    chosen: list[EvalTask] = []
    for (split, fam), ts in groups.items():
        for t in ts[: max_policies or len(ts)]:
            m = examples_per_policy or len(t.examples)
            chosen.append(EvalTask(t, list(t.examples[:m])))
    pos = {id(et): k for k, et in enumerate(chosen)}
    by_family: dict[str, dict[str, list[EvalTask]]] = {}
    for et in chosen:
        by_family.setdefault(et.family, {}).setdefault(et.split, []).append(et)
    for fam, splits in by_family.items():
        order: list[EvalTask] = []
        lists = list(splits.values())
        for i in range(max(len(x) for x in lists)):
            order.extend(x[i] for x in lists if i < len(x))
        for et in order[:oracle_per_family]:
            rest = et.task.examples[len(et.examples):]
            if len(rest) >= 4:
                train, scored = list(rest[:oracle_train_examples]), et.examples
            elif len(et.examples) >= 4:
                half = len(et.examples) // 2
                train, scored = et.examples[:half], et.examples[half:]
            else:
                continue
            et.oracle_skipped = oracle_problem(train)
            if et.oracle_skipped is None:
                et.oracle_train, et.examples = train, scored
            else:
                log.warning("oracle_lora: no oracle for task %s: %s", task_label(et, pos[id(et)]), et.oracle_skipped)
    return chosen


def shuffled_partners(etasks: Sequence[EvalTask], seed: int = 0) -> list[int]:
    """For each task, another task whose policy gives the shuffled adapter: same family and a different
    policy text where possible, never itself (a derangement when there are >= 2 tasks)."""
    rng = random.Random(seed)
    n = len(etasks)
    out = [-1] * n
    fams: dict[str, list[int]] = {}
    for i, et in enumerate(etasks):
        fams.setdefault(et.family, []).append(i)
    for idx in fams.values():
        cand = [i for i in idx]
        if len(cand) < 2:
            cand = list(range(n))
        for i in idx:
            others = [j for j in cand if j != i and etasks[j].task.policy != etasks[i].task.policy]
            if not others:
                others = [j for j in range(n) if j != i]
            out[i] = rng.choice(others) if others else i
    return out


@dataclass
class _Preds:
    golds: list[str] = field(default_factory=list)
    preds: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def _tqdm(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, file=sys.stderr)


def _run_condition(model: Any, tokenizer: Any, etasks: Sequence[EvalTask], indices: Sequence[int], *,
                   policy_in_prompt: bool, where: str, adapters_for: Callable[[list[int]], AdapterSet | None],
                   chunk: int, batch_size: int, bf16: bool, max_new_tokens: int, desc: str,
                   progress: bool) -> dict[int, _Preds]:
    """Score tasks ``indices``; ``adapters_for(chunk_task_indices)`` gives row i of the chunk its adapter."""
    # progress unit: one scored sequence (an option of an example) or one greedy generation
    total = sum(len(e.options) if e.options is not None else 1 for i in indices for e in etasks[i].examples)
    bar = _tqdm(total, desc, progress)
    out: dict[int, _Preds] = {}
    try:
        for s in range(0, len(indices), chunk):
            idx = list(indices[s:s + chunk])
            adapters = adapters_for(idx)
            mc: list[tuple[int, Example, ScoreRequest]] = []
            ft: list[tuple[int, Example, str, int]] = []
            for row, ti in enumerate(idx):
                et = etasks[ti]
                out[ti] = _Preds()
                r = row if adapters is not None else -1
                if adapters is not None and adapters.count == 1:
                    r = 0
                for ex in et.examples:
                    p = prompt_text(tokenizer, ex.input, et.task.policy if policy_in_prompt else None, where)
                    if ex.options is not None:
                        mc.append((ti, ex, ScoreRequest(p, ex.options, r)))
                    else:
                        ft.append((ti, ex, p, r))
            if mc:
                reqs = [m[2] for m in mc]
                scores = option_logprobs(model, tokenizer, reqs, adapters=adapters, batch_size=batch_size, bf16=bf16,
                                         progress=bar.update)
                preds = predict_options(reqs, scores)
                for (ti, ex, _), pr, sc in zip(mc, preds, scores):
                    out[ti].golds.append(ex.answer)
                    out[ti].preds.append(pr)
                    out[ti].outputs.append(json.dumps(dict(zip(ex.options, [round(x, 3) for x in sc]))))
            if ft:
                gens = greedy_generate(model, tokenizer, [f[2] for f in ft], [f[3] for f in ft], adapters=adapters,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size, bf16=bf16,
                                       progress=bar.update)
                for (ti, ex, _, _), g in zip(ft, gens):
                    out[ti].golds.append("pass")
                    out[ti].preds.append("pass" if ex.passes(g) else "fail")  # bounded regex search
                    out[ti].outputs.append(g)
    finally:
        bar.close()
    return out


def evaluate(model: Any, tokenizer: Any, etasks: Sequence[EvalTask], *, conditions: Sequence[str] = CONDITIONS,
             hypernet: AdapterSource | None = None, multitask: AdapterSet | None = None,
             oracle_trainer: OracleTrainer | None = None, where: str = "system", chunk: int = 16,
             batch_size: int = 16, bf16: bool = True, max_new_tokens: int = 32, seed: int = 0,
             progress: bool = True) -> tuple[dict[str, dict[int, _Preds]], dict[str, Any]]:
    """Run every requested condition; returns (predictions per condition per task index, info).

    Conditions whose ingredient is missing (no hypernetwork, no multi-task LoRA, no oracle trainer) are
    skipped with a warning and listed in ``info["skipped"]``. Oracle tasks that cannot train one
    (``EvalTask.oracle_skipped``, or ``oracle_train`` without answers) are checked before any model work and
    listed in ``info["oracle_skipped"]`` (task label -> reason); the other oracles are trained as usual.
    """
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown condition(s) {unknown}; choose from {list(CONDITIONS)}")
    all_idx = list(range(len(etasks)))
    partners = shuffled_partners(etasks, seed)
    results: dict[str, dict[int, _Preds]] = {}
    info: dict[str, Any] = {"skipped": {}, "seconds": {}}
    oracle_skipped: dict[str, str] = {}
    if "oracle_lora" in conditions:
        for i, et in enumerate(etasks):
            why = oracle_problem(et.oracle_train) if et.oracle_train else None
            if why:  # EvalTasks built without select_tasks; select_tasks has warned about its own
                log.warning("oracle_lora: no oracle for task %s: %s", task_label(et, i), why)
            why = why or et.oracle_skipped
            if why:
                oracle_skipped[task_label(et, i)] = why
        if oracle_skipped:
            info["oracle_skipped"] = oracle_skipped
    common = dict(where=where, chunk=chunk, batch_size=batch_size, bf16=bf16, max_new_tokens=max_new_tokens,
                  progress=progress)
    for cond in conditions:
        t0 = time.perf_counter()
        if cond == "base":
            results[cond] = _run_condition(model, tokenizer, etasks, all_idx, policy_in_prompt=False,
                                           adapters_for=lambda idx: None, desc=cond, **common)
        elif cond == "in_context":
            results[cond] = _run_condition(model, tokenizer, etasks, all_idx, policy_in_prompt=True,
                                           adapters_for=lambda idx: None, desc=cond, **common)
        elif cond == "multitask_lora":
            if multitask is None:
                info["skipped"][cond] = "no multi-task LoRA (train one with `hyperlora train --method multitask_lora`)"
                continue
            results[cond] = _run_condition(model, tokenizer, etasks, all_idx, policy_in_prompt=True,
                                           adapters_for=lambda idx: multitask, desc=cond, **common)
        elif cond in ("generated", "generated_shuffled"):
            if hypernet is None:
                info["skipped"][cond] = "no hypernetwork checkpoint (pass --hypernet DIR)"
                continue
            src = (lambda i: i) if cond == "generated" else (lambda i: partners[i])
            results[cond] = _run_condition(
                model, tokenizer, etasks, all_idx, policy_in_prompt=False, desc=cond,
                adapters_for=lambda idx, src=src: hypernet([etasks[src(i)].task.policy for i in idx]), **common)
        elif cond == "oracle_lora":
            oracle_idx = [i for i, et in enumerate(etasks)
                          if et.oracle_train and task_label(et, i) not in oracle_skipped]
            if oracle_trainer is None or not oracle_idx:
                info["skipped"][cond] = ("no oracle trainer" if oracle_trainer is None
                                         else "no oracle task can be trained (see oracle_skipped)" if oracle_skipped
                                         else "no task has examples left to train an oracle on")
                continue
            trained: dict[int, AdapterSet] = {}
            bar = _tqdm(len(oracle_idx), "oracle_lora: training", progress)
            for i in oracle_idx:
                trained[i] = oracle_trainer(model, tokenizer, etasks[i].oracle_train)
                bar.update(1)
            bar.close()
            info["oracle_train_seconds"] = round(time.perf_counter() - t0, 1)
            results[cond] = _run_condition(
                model, tokenizer, etasks, oracle_idx, policy_in_prompt=False, desc=cond,
                adapters_for=lambda idx: stack_adapter_sets([trained[i] for i in idx]), **common)
        info["seconds"][cond] = round(time.perf_counter() - t0, 1)
    info["partners"] = partners
    return results, info


def _cell(etasks: Sequence[EvalTask], preds: dict[int, _Preds], keep: Callable[[EvalTask], bool]) -> dict[str, Any]:
    idx = [i for i in preds if keep(etasks[i])]
    acc = macro_balanced_accuracy((preds[i].golds, preds[i].preds) for i in idx)
    return {"acc": None if math.isnan(acc) else round(acc, 2), "examples": sum(len(preds[i].golds) for i in idx),
            "policies": len(idx)}


def _chance(etasks: Sequence[EvalTask]) -> float | None:
    """Balanced accuracy of a constant predictor, averaged over option tasks (free text has no chance rate)."""
    vals = [100.0 / len({e.answer for e in et.examples}) for et in etasks if et.examples[0].options is not None]
    return round(sum(vals) / len(vals), 2) if vals else None


def summarize(etasks: Sequence[EvalTask], results: dict[str, dict[int, _Preds]], info: dict[str, Any],
              config: dict[str, Any]) -> dict[str, Any]:
    """The quality report: overall (``held_out``), per family, per split, the oracle subset, counts, config."""
    oracle_tasks = set(results.get("oracle_lora", {})) or {i for i, et in enumerate(etasks) if et.oracle_train}
    fams = sorted({et.family for et in etasks})
    splits = sorted({et.split for et in etasks})
    rep: dict[str, Any] = {"held_out": {}, "held_out_n": {}, "families": {f: {} for f in fams},
                           "splits": {s: {} for s in splits}, "oracle_subset": {}, "chance": _chance(etasks)}
    for cond, preds in results.items():
        c = _cell(etasks, preds, lambda et: True)
        rep["held_out"][cond] = c["acc"]
        rep["held_out_n"][cond] = {"examples": c["examples"], "policies": c["policies"]}
        for f in fams:
            rep["families"][f][cond] = _cell(etasks, preds, lambda et, f=f: et.family == f)
        for s in splits:
            rep["splits"][s][cond] = _cell(etasks, preds, lambda et, s=s: et.split == s)
        sub = {i: p for i, p in preds.items() if i in oracle_tasks}
        rep["oracle_subset"][cond] = _cell(etasks, sub, lambda et: True)
    for f in fams:
        rep["families"][f]["chance"] = _chance([et for et in etasks if et.family == f])
    for s in splits:
        rep["splits"][s]["chance"] = _chance([et for et in etasks if et.split == s])
    rep["skipped"] = info.get("skipped", {})
    if info.get("oracle_skipped"):
        rep["oracle_skipped"] = info["oracle_skipped"]
    rep["seconds"] = info.get("seconds", {})
    if "oracle_train_seconds" in info:
        rep["seconds"]["oracle_training"] = info["oracle_train_seconds"]
    rep["config"] = config
    return rep


def _fmt(c: dict[str, Any] | None) -> str:
    if not c or c.get("acc") is None:
        return "–"
    return f"{c['acc']:.1f} ({c['examples']})"


def markdown_table(rep: dict[str, Any]) -> str:
    """Rows: overall, each split, each family, the oracle subset; cells 'acc (examples)'."""
    conds = [c for c in CONDITIONS if c in rep["held_out"]]
    lines = ["| group | " + " | ".join(conds) + " | chance |", "|---|" + "---|" * (len(conds) + 1)]
    overall = {c: {"acc": rep["held_out"][c], **rep["held_out_n"][c]} for c in conds}
    ch = rep.get("chance")
    lines.append("| **all held-out** | " + " | ".join(_fmt(overall[c]) for c in conds) +
                 f" | {ch if ch is not None else '–'} |")
    for kind in ("splits", "families"):
        for g, cells in rep[kind].items():
            ch = cells.get("chance")
            lines.append(f"| {kind[:-1] if kind == 'splits' else 'family'}: {g} | " +
                         " | ".join(_fmt(cells.get(c)) for c in conds) + f" | {ch if ch is not None else '–'} |")
    lines.append("| oracle policies only | " + " | ".join(_fmt(rep["oracle_subset"].get(c)) for c in conds) + " | |")
    lines.append("")
    lines.append("Balanced accuracy in percent per policy, averaged over policies; (n) = examples scored. "
                 "Free-text (format) tasks: share of greedy generations passing the regex.")
    if rep.get("skipped"):
        lines.append("")
        lines.extend(f"- skipped `{k}`: {v}" for k, v in rep["skipped"].items())
    if rep.get("oracle_skipped"):
        lines.append("")
        lines.extend(f"- no `oracle_lora` for task {k}: {v}" for k, v in rep["oracle_skipped"].items())
    return "\n".join(lines) + "\n"


def write_chart(rep: dict[str, Any], path: Path) -> Path | None:
    """Grouped bars per family and overall (matplotlib Agg); None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no chart written (pip install matplotlib)")
        return None
    conds = [c for c in CONDITIONS if c in rep["held_out"]]
    groups = ["all"] + list(rep["families"]) + list(rep["splits"])
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(groups) + 2), 4.2))
    w = 0.8 / max(1, len(conds))
    for k, c in enumerate(conds):
        vals = []
        for g in groups:
            if g == "all":
                v = rep["held_out"].get(c)
            else:
                cell = (rep["families"].get(g) or rep["splits"].get(g) or {}).get(c)
                v = cell.get("acc") if cell else None
            vals.append(float("nan") if v is None else v)
        ax.bar([i + (k - (len(conds) - 1) / 2) * w for i in range(len(groups))], vals, w,
               label="oracle_lora (its own policies only)" if c == "oracle_lora" else c)
    if rep.get("chance") is not None:
        ax.axhline(rep["chance"], color="gray", linestyle="--", linewidth=1, label="chance (option tasks)")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g.replace("held_out_", "ho_") for g in groups], rotation=20, ha="right")
    ax.set_ylabel("balanced accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Held-out policies: generated adapters vs baselines")
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def write_report(rep: dict[str, Any], etasks: Sequence[EvalTask], results: dict[str, dict[int, _Preds]],
                 out_dir: str | Path, name: str = "quality") -> dict[str, Path]:
    """Write JSON, markdown, PNG and per-example predictions; returns the paths.

    Each file is written atomically (a temporary file beside it, then ``os.replace``): a file is either the
    complete new report or whatever was there before, never a truncated one. Every text is built before
    the first file is touched, so an error there leaves all of them as they were.
    """
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"json": d / f"{name}.json", "md": d / f"{name}.md", "predictions": d / f"{name}_predictions.jsonl"}
    texts = {"json": json.dumps(rep, indent=2) + "\n",
             "md": f"# Policy-following quality ({rep['config'].get('date', '')})\n\n" + markdown_table(rep) +
                   f"\nCommand: `{rep['config'].get('command', '')}`\n"}
    rows = []
    for cond, preds in results.items():
        for i, p in preds.items():
            et = etasks[i]
            for ex, g, pr, o in zip(et.examples, p.golds, p.preds, p.outputs):
                rows.append(json.dumps({"condition": cond, "task": et.task.id or i, "family": et.family,
                                        "split": et.split, "input": ex.input, "gold": g, "pred": pr,
                                        "output": o}) + "\n")
    texts["predictions"] = "".join(rows)
    for key in ("json", "md", "predictions"):
        atomic_write_text(paths[key], texts[key], encoding="utf-8", newline=None)
    png = write_chart(rep, d / f"{name}.png")
    if png is not None:
        paths["png"] = png
    return paths
