"""`hyperlora eval`: held-out policy evaluation of the hypernetwork against the alternatives, in one run.

Conditions (all on the same examples, with the same prompt format, ``hyperlora.modeling.prompts``):
  base                the base model, no policy anywhere
  in_context          the policy in the prompt (system turn by default, ``--where``)
  in_context_user     the policy in the user turn, above the record (``Policy: ...\n\nRecord: ...``)
  in_context_fewshot  the policy in the system turn plus two labelled records of the same policy (never the
                      scored one; two different answers where the policy has them, in random order) as earlier
                      user / assistant turns: the strongest prompt a user would write
  multitask_lora      a LoRA fine-tuned on the training policies with the policy in the prompt
                      (``hyperlora train --method multitask_lora``), policy in the prompt
  generated           the adapter the hypernetwork writes from the policy; no policy in the prompt
  generated_shuffled  the adapter written from another task's policy (same family where possible)
  oracle_lora         a LoRA trained on that one policy's own examples (a few policies per family; the
                      examples it trains on are never the ones it is scored on)

Metric: balanced accuracy in percent per policy (mean recall over its gold options; free-text tasks: the
share of greedy generations passing the regex), averaged over policies with equal weight, overall, per
family, per split and per task file, with the number of examples and policies. The oracle is only trained
on a few policies, so ``oracle_subset`` also gives every condition on exactly those policies' examples.
``best_in_context`` names the best of the in_context* conditions overall (chosen on the same records: an
optimistic baseline).

Reply-level metrics (``hyperlora.evaluation.replies`` defines them), for every condition, in every cell next
to the scored accuracy: on label (option) policies each record also gets a greedy reply (``reply_tokens``, 16
by default, stopping at the end of turn) with the same prompt and adapter; ``reply_acc`` is the balanced
accuracy with the reply's first option as the prediction (no option: wrong), next to ``label_acc``, the scored
accuracy on the same label policies; ``clean`` the share of label replies that are exactly one option;
``loop`` the share of replies (label replies and the free-text generations) with a token 3-gram occurring 3
times within 32 tokens (a label reply is only ``reply_tokens`` long); ``collapse`` the share of policies with
>= 2 distinct gold answers whose scored predictions are one answer for all their records.

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


from hyperlora._io import atomic_write_text, save_figure
from hyperlora.tasks.format import Example, PolicyTask
from hyperlora.modeling.prompts import end_of_turn, prompt_text
from hyperlora.evaluation.replies import collapsed, first_option, has_loop, is_clean
from hyperlora.evaluation.scoring import (AdapterSet, ScoreRequest, greedy_generate_ids, macro_balanced_accuracy,
                                        option_logprobs, predict_options)
from hyperlora.evaluation.sources import stack_adapter_sets

log = logging.getLogger(__name__)

CONDITIONS = ("base", "in_context", "in_context_user", "in_context_fewshot", "multitask_lora", "generated",
              "generated_shuffled", "oracle_lora")
IN_CONTEXT = ("in_context", "in_context_user", "in_context_fewshot")
FEWSHOT_SHOTS = 2
LOOP_WINDOW = 32
NO_OPTION = "\u2205"  # the reply prediction of a reply that starts with no option (never a gold answer)
HELD_OUT_SPLITS = ("held_out_combo", "held_out_topic", "held_out_words")
AdapterSource = Callable[[Sequence[str]], AdapterSet]
OracleTrainer = Callable[[Any, Any, Sequence[Example]], AdapterSet]

__all__ = ["CONDITIONS", "EvalTask", "select_tasks", "shuffled_partners", "fewshot_shots", "evaluate", "summarize",
           "write_report", "markdown_table", "write_chart", "oracle_problem", "task_label"]


@dataclass
class EvalTask:
    """A task as evaluated: the examples scored, and (oracle tasks only) the disjoint examples to train on.

    oracle_skipped: why a task chosen for an oracle gets none (its examples cannot train one), else None.
    source: the task file it came from (reports break down per file; None: "tasks").
    """

    task: PolicyTask
    examples: list[Example]
    oracle_train: list[Example] | None = None
    oracle_skipped: str | None = None
    source: str | None = None

    @property
    def file(self) -> str:
        return self.source or "tasks"

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
                 oracle_train_examples: int = 24, sources: Sequence[str] | None = None) -> list[EvalTask]:
    """Keep at most ``max_policies`` per (file, split, family) and ``examples_per_policy`` examples per task.

    ``sources``: one task-file name per task (several ``--tasks`` files), kept as ``EvalTask.source``.

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
    if sources is not None and len(sources) != len(tasks):
        raise ValueError(f"sources has {len(sources)} entries for {len(tasks)} tasks")
    groups: dict[tuple[str | None, str, str], list[PolicyTask]] = {}
    for k, t in enumerate(tasks):
        src = sources[k] if sources is not None else None
        groups.setdefault((src, t.split or "user", t.family or "all"), []).append(t)
    chosen: list[EvalTask] = []
    for (src, split, fam), ts in groups.items():
        for t in ts[: max_policies or len(ts)]:
            m = examples_per_policy or len(t.examples)
            chosen.append(EvalTask(t, list(t.examples[:m]), source=src))
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


def fewshot_shots(et: EvalTask, ex: Example, key: str, k: int = FEWSHOT_SHOTS) -> list[tuple[str, str]]:
    """``k`` labelled (record, answer) pairs of ``et``'s policy for the few-shot prompt of ``ex``.

    Drawn from all the task's examples with an answer (scored or not, the oracle's included: a user writing
    the prompt has labelled records) except ``ex`` and any record with ``ex``'s text; the second shot has
    another answer than the first where the policy has one; the shots' order is random. ``key`` seeds the
    choice (deterministic per task and record)."""
    pool = [e for e in et.task.examples if e is not ex and e.input != ex.input and e.answer]
    rng = random.Random(key)
    shots: list[Example] = []
    while pool and len(shots) < k:
        other = [e for e in pool if all(e.answer != s.answer for s in shots)]
        pick = rng.choice(other or pool)
        shots.append(pick)
        pool = [e for e in pool if e is not pick]
    rng.shuffle(shots)
    return [(e.input, str(e.answer)) for e in shots]


@dataclass
class _Preds:
    """One condition's results on one task, aligned with the task's scored examples.

    replies: the greedy reply of each record (option tasks: the extra reply; free text: the generation, as in
    ``outputs``), None when replies were not generated; loops: whether that reply loops (None: no reply)."""

    golds: list[str] = field(default_factory=list)
    preds: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    replies: list[str | None] = field(default_factory=list)
    loops: list[bool | None] = field(default_factory=list)


def _tqdm(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, file=sys.stderr)


def _stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a reply: the tokenizer's eos and the template's end-of-turn token (if one token)."""
    ids = []
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.append(int(eos))
    eot = end_of_turn(tokenizer)
    if eot:
        t = tokenizer(eot, add_special_tokens=False)["input_ids"]
        if len(t) == 1 and int(t[0]) not in ids:
            ids.append(int(t[0]))
    return ids


def _run_condition(model: Any, tokenizer: Any, etasks: Sequence[EvalTask], indices: Sequence[int], *,
                   prompt_for: Callable[[int, int, Example], str],
                   adapters_for: Callable[[list[int]], AdapterSet | None],
                   chunk: int, batch_size: int, bf16: bool, max_new_tokens: int, desc: str,
                   progress: bool, replies: bool = True, reply_tokens: int = 16) -> dict[int, _Preds]:
    """Score tasks ``indices``; ``adapters_for(chunk_task_indices)`` gives row i of the chunk its adapter;
    ``prompt_for(task index, example index, example)`` its prompt. ``replies``: option records also get a
    greedy reply of ``reply_tokens`` tokens (stopping at the end of turn)."""
    # progress unit: one scored sequence (an option of an example) or one greedy generation
    total = sum((len(e.options) + int(replies)) if e.options is not None else 1
                for i in indices for e in etasks[i].examples)
    bar = _tqdm(total, desc, progress)
    stop = _stop_ids(tokenizer)
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
                for k, ex in enumerate(et.examples):
                    p = prompt_for(ti, k, ex)
                    if ex.options is not None:
                        mc.append((ti, ex, ScoreRequest(p, ex.options, r)))
                    else:
                        ft.append((ti, ex, p, r))
            if mc:
                reqs = [m[2] for m in mc]
                scores = option_logprobs(model, tokenizer, reqs, adapters=adapters, batch_size=batch_size, bf16=bf16,
                                         progress=bar.update)
                preds = predict_options(reqs, scores)
                rids: list[list[int] | None] = [None] * len(mc)
                if replies:
                    rids = list(greedy_generate_ids(model, tokenizer, [q.prompt for q in reqs], [q.row for q in reqs],
                                                    adapters=adapters, max_new_tokens=reply_tokens,
                                                    batch_size=batch_size, bf16=bf16, eos_token_id=stop,
                                                    progress=bar.update))
                for (ti, ex, _), pr, sc, ids in zip(mc, preds, scores, rids):
                    out[ti].golds.append(ex.answer)
                    out[ti].preds.append(pr)
                    out[ti].outputs.append(json.dumps(dict(zip(ex.options, [round(x, 3) for x in sc]))))
                    out[ti].replies.append(None if ids is None else tokenizer.decode(ids, skip_special_tokens=True))
                    out[ti].loops.append(None if ids is None else has_loop(ids, window=LOOP_WINDOW))
            if ft:
                gens = greedy_generate_ids(model, tokenizer, [f[2] for f in ft], [f[3] for f in ft], adapters=adapters,
                                           max_new_tokens=max_new_tokens, batch_size=batch_size, bf16=bf16,
                                           eos_token_id=stop, progress=bar.update)
                for (ti, ex, _, _), ids in zip(ft, gens):
                    g = tokenizer.decode(ids, skip_special_tokens=True)
                    out[ti].golds.append("pass")
                    out[ti].preds.append("pass" if ex.passes(g) else "fail")  # bounded regex search
                    out[ti].outputs.append(g)
                    out[ti].replies.append(g)
                    out[ti].loops.append(has_loop(ids, window=LOOP_WINDOW))
    finally:
        bar.close()
    return out


def evaluate(model: Any, tokenizer: Any, etasks: Sequence[EvalTask], *, conditions: Sequence[str] = CONDITIONS,
             hypernet: AdapterSource | None = None, multitask: AdapterSet | None = None,
             oracle_trainer: OracleTrainer | None = None, where: str = "system", chunk: int = 16,
             batch_size: int = 16, bf16: bool = True, max_new_tokens: int = 32, seed: int = 0,
             progress: bool = True, replies: bool = True,
             reply_tokens: int = 16) -> tuple[dict[str, dict[int, _Preds]], dict[str, Any]]:
    """Run every requested condition; returns (predictions per condition per task index, info).

    ``replies``: option records also get a greedy reply (``reply_tokens`` new tokens, stopping at the end of
    turn) for the reply-level metrics; free-text records' generations (``max_new_tokens``) are their replies.

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
    if reply_tokens < 1:
        raise ValueError(f"reply_tokens must be >= 1, got {reply_tokens}")
    common = dict(chunk=chunk, batch_size=batch_size, bf16=bf16, max_new_tokens=max_new_tokens,
                  progress=progress, replies=replies, reply_tokens=reply_tokens)

    def bare(ti: int, k: int, ex: Example) -> str:
        return prompt_text(tokenizer, ex.input)

    def with_policy(place: str) -> Callable[[int, int, Example], str]:
        return lambda ti, k, ex: prompt_text(tokenizer, ex.input, etasks[ti].task.policy, place)  # type: ignore

    def fewshot(ti: int, k: int, ex: Example) -> str:
        shots = fewshot_shots(etasks[ti], ex, f"{seed}:{ti}:{k}")
        return prompt_text(tokenizer, ex.input, etasks[ti].task.policy, "system", shots)

    for cond in conditions:
        t0 = time.perf_counter()
        if cond == "base":
            results[cond] = _run_condition(model, tokenizer, etasks, all_idx, prompt_for=bare,
                                           adapters_for=lambda idx: None, desc=cond, **common)
        elif cond in IN_CONTEXT:
            pf = {"in_context": with_policy(where), "in_context_user": with_policy("user"),
                  "in_context_fewshot": fewshot}[cond]
            results[cond] = _run_condition(model, tokenizer, etasks, all_idx, prompt_for=pf,
                                           adapters_for=lambda idx: None, desc=cond, **common)
        elif cond == "multitask_lora":
            if multitask is None:
                info["skipped"][cond] = "no multi-task LoRA (train one with `hyperlora train --method multitask_lora`)"
                continue
            results[cond] = _run_condition(model, tokenizer, etasks, all_idx, prompt_for=with_policy(where),
                                           adapters_for=lambda idx: multitask, desc=cond, **common)
        elif cond in ("generated", "generated_shuffled"):
            if hypernet is None:
                info["skipped"][cond] = "no hypernetwork checkpoint (pass --hypernet DIR)"
                continue
            src = (lambda i: i) if cond == "generated" else (lambda i: partners[i])
            results[cond] = _run_condition(
                model, tokenizer, etasks, all_idx, prompt_for=bare, desc=cond,
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
                model, tokenizer, etasks, oracle_idx, prompt_for=bare, desc=cond,
                adapters_for=lambda idx: stack_adapter_sets([trained[i] for i in idx]), **common)
        info["seconds"][cond] = round(time.perf_counter() - t0, 1)
    info["partners"] = partners
    return results, info


def _pct(k: int, n: int) -> float | None:
    return round(100.0 * k / n, 2) if n else None


def _r2(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 2)


def _is_label(et: EvalTask) -> bool:
    return bool(et.examples) and all(e.options is not None for e in et.examples)


def _reply_preds(et: EvalTask, p: _Preds) -> list[str]:
    """The reply's first option per record (``NO_OPTION`` where it starts with none)."""
    return [NO_OPTION if r is None else (first_option(r, ex.options or []) or NO_OPTION)
            for ex, r in zip(et.examples, p.replies)]


def _reply_metrics(etasks: Sequence[EvalTask], preds: dict[int, _Preds], idx: Sequence[int]) -> dict[str, Any]:
    """The reply-level metrics of tasks ``idx`` (see the module docstring and ``hyperlora.evaluation.replies``)."""
    lab = [i for i in idx if _is_label(etasks[i])]
    with_replies = [i for i in lab if preds[i].replies and all(r is not None for r in preds[i].replies)]
    label_acc = macro_balanced_accuracy((preds[i].golds, preds[i].preds) for i in with_replies)
    reply_acc = macro_balanced_accuracy((preds[i].golds, _reply_preds(etasks[i], preds[i])) for i in with_replies)
    n_lab = sum(len(preds[i].replies) for i in with_replies)
    n_clean = sum(is_clean(r, ex.options or []) for i in with_replies
                  for ex, r in zip(etasks[i].examples, preds[i].replies))
    loops = [lp for i in idx for lp in preds[i].loops if lp is not None]
    coll = [c for c in (collapsed(preds[i].golds, preds[i].preds) for i in lab) if c is not None]
    return {"label_policies": len(with_replies), "label_acc": _r2(label_acc), "reply_acc": _r2(reply_acc),
            "clean": _pct(n_clean, n_lab), "label_replies": n_lab, "loop": _pct(sum(loops), len(loops)),
            "replies": len(loops), "collapse": _pct(sum(coll), len(coll)), "collapsed": sum(coll),
            "collapse_policies": len(coll)}


def _cell(etasks: Sequence[EvalTask], preds: dict[int, _Preds], keep: Callable[[EvalTask], bool]) -> dict[str, Any]:
    idx = [i for i in preds if keep(etasks[i])]
    acc = macro_balanced_accuracy((preds[i].golds, preds[i].preds) for i in idx)
    return {"acc": _r2(acc), "examples": sum(len(preds[i].golds) for i in idx), "policies": len(idx),
            **_reply_metrics(etasks, preds, idx)}


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
    files = list(dict.fromkeys(et.file for et in etasks))
    rep: dict[str, Any] = {"held_out": {}, "held_out_n": {}, "replies": {}, "families": {f: {} for f in fams},
                           "splits": {s: {} for s in splits}, "files": {f: {} for f in files},
                           "oracle_subset": {}, "chance": _chance(etasks)}
    for cond, preds in results.items():
        c = _cell(etasks, preds, lambda et: True)
        rep["held_out"][cond] = c["acc"]
        rep["held_out_n"][cond] = {"examples": c["examples"], "policies": c["policies"]}
        rep["replies"][cond] = {k: v for k, v in c.items() if k not in ("acc", "examples", "policies")}
        for f in fams:
            rep["families"][f][cond] = _cell(etasks, preds, lambda et, f=f: et.family == f)
        for s in splits:
            rep["splits"][s][cond] = _cell(etasks, preds, lambda et, s=s: et.split == s)
        for fl in files:
            rep["files"][fl][cond] = _cell(etasks, preds, lambda et, fl=fl: et.file == fl)
        sub = {i: p for i, p in preds.items() if i in oracle_tasks}
        rep["oracle_subset"][cond] = _cell(etasks, sub, lambda et: True)
    for f in fams:
        rep["families"][f]["chance"] = _chance([et for et in etasks if et.family == f])
    for s in splits:
        rep["splits"][s]["chance"] = _chance([et for et in etasks if et.split == s])
    for fl in files:
        rep["files"][fl]["chance"] = _chance([et for et in etasks if et.file == fl])
    ic = [(rep["held_out"][c], c) for c in IN_CONTEXT if rep["held_out"].get(c) is not None]
    if ic:
        best = max(ic)
        rep["best_in_context"] = {"condition": best[1], "acc": best[0]}
    rep["skipped"] = info.get("skipped", {})
    if info.get("oracle_skipped"):
        rep["oracle_skipped"] = info["oracle_skipped"]
    rep["seconds"] = info.get("seconds", {})
    if "oracle_train_seconds" in info:
        rep["seconds"]["oracle_training"] = info["oracle_train_seconds"]
    rep["config"] = config
    return rep


_KIND = {"files": "file", "splits": "split", "families": "family"}


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
    files = rep.get("files", {})
    for kind in ("files", "splits", "families"):
        if kind == "files" and len(files) < 2:
            continue
        for g, cells in rep.get(kind, {}).items():
            ch = cells.get("chance")
            lines.append(f"| {_KIND[kind]}: {g} | " +
                         " | ".join(_fmt(cells.get(c)) for c in conds) + f" | {ch if ch is not None else '–'} |")
    lines.append("| oracle policies only | " + " | ".join(_fmt(rep["oracle_subset"].get(c)) for c in conds) + " | |")
    lines.append("")
    lines.append("Balanced accuracy in percent per policy, averaged over policies; (n) = examples scored. "
                 "Free-text (format) tasks: share of greedy generations passing the regex.")
    if rep.get("best_in_context"):
        b = rep["best_in_context"]
        lines.append(f"Best in-context prompt: `{b['condition']}` ({b['acc']:.1f}; chosen on these records).")
    if rep.get("replies"):
        lines.extend(["", *_reply_tables(rep, conds)])
    if rep.get("skipped"):
        lines.append("")
        lines.extend(f"- skipped `{k}`: {v}" for k, v in rep["skipped"].items())
    if rep.get("oracle_skipped"):
        lines.append("")
        lines.extend(f"- no `oracle_lora` for task {k}: {v}" for k, v in rep["oracle_skipped"].items())
    return "\n".join(lines) + "\n"


def _v(x: Any) -> str:
    return "–" if x is None else f"{x:.1f}"


def _reply_short(c: dict[str, Any] | None) -> str:
    if not c:
        return "–"
    return f"{_v(c.get('reply_acc'))} · {_v(c.get('clean'))} · {_v(c.get('loop'))} · {_v(c.get('collapse'))}"


def _reply_tables(rep: dict[str, Any], conds: Sequence[str]) -> list[str]:
    """Markdown: reply-level metrics per condition, then per file and per family."""
    out = ["## Replies (greedy, what a user gets)", "",
           "| condition | scored acc (label policies) | reply acc | clean % | loop % | collapse % (policies) |",
           "|---|---|---|---|---|---|"]
    for c in conds:
        r = rep["replies"].get(c)
        if r is None:
            continue
        out.append(f"| {c} | {_v(r.get('label_acc'))} | {_v(r.get('reply_acc'))} | {_v(r.get('clean'))} "
                   f"({r.get('label_replies', 0)}) | {_v(r.get('loop'))} ({r.get('replies', 0)}) | "
                   f"{_v(r.get('collapse'))} ({r.get('collapsed', 0)}/{r.get('collapse_policies', 0)}) |")
    out += ["", "| group | " + " | ".join(conds) + " |", "|---|" + "---|" * len(conds)]
    for kind in ("files", "families"):
        for g, cells in rep.get(kind, {}).items():
            out.append(f"| {_KIND[kind]}: {g} | " + " | ".join(_reply_short(cells.get(c)) for c in conds) + " |")
    out += ["", "Cells: reply acc · clean % · loop % · collapse %. Reply acc: balanced accuracy with the greedy "
            "reply's first option (longest option first, case-insensitive, at a label boundary) as the prediction; "
            "clean: the stripped reply (one final '.' or '!' allowed) is exactly one option; loop: a token 3-gram "
            "3 times within 32 reply tokens (label and free-text replies); collapse: policies with >= 2 gold "
            "answers whose scored predictions are one answer. '–': no label replies (e.g. --no-replies) or no "
            "eligible policy."]
    return out


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
    return save_figure(plt, fig, path)


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
            replies = list(getattr(p, "replies", None) or [])
            loops = list(getattr(p, "loops", None) or [])
            for k, (ex, g, pr, o) in enumerate(zip(et.examples, p.golds, p.preds, p.outputs)):
                row = {"condition": cond, "task": et.task.id or i, "file": et.file, "family": et.family,
                       "split": et.split, "input": ex.input, "gold": g, "pred": pr, "output": o}
                reply = replies[k] if k < len(replies) else None
                if reply is not None:
                    row["reply"] = reply
                    if ex.options is not None:
                        row["reply_option"] = first_option(reply, ex.options)
                        row["clean"] = is_clean(reply, ex.options)
                if k < len(loops) and loops[k] is not None:
                    row["loop"] = loops[k]
                rows.append(json.dumps(row) + "\n")
    texts["predictions"] = "".join(rows)
    for key in ("json", "md", "predictions"):
        atomic_write_text(paths[key], texts[key], encoding="utf-8", newline=None)
    png = write_chart(rep, d / f"{name}.png")
    if png is not None:
        paths["png"] = png
    return paths
