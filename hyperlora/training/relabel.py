"""Contrastive data: label every cached training record under many training policies (topic and routing).

Each training policy comes with only a few records, and a hypernetwork can memorize (policy, record) pairs
instead of learning to read the policy (run E1 in docs/EXPERIMENTS.md). For the two families whose rule
is a function of the record's topic alone, the rule can be recovered from the task's own examples and
applied to every other cached record of the same kind (message / ticket): the same record then appears
under many policies with different answers, so the only way to lower the loss is to read the policy.

The rule is inferred, never guessed: a task is relabelled only if exactly one rule explains all of its
own labels (checked), and a record only if its topic is recognized (its sentence is one of the generator's
topic sentences, `hyperlora.tasks.vocab.TOPICS`). Everything else keeps its original examples only.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

from hyperlora.tasks.format import PolicyTask
from hyperlora.tasks.vocab import TOPICS
from hyperlora.training.data import Item, TaskData, first_token


def _sentence_topics() -> dict[str, str]:
    return {s: t.name for t in TOPICS for s in t.sentences}


def record_topic(text: str, table: dict[str, str]) -> str | None:
    """The generator topic of a record (its sentence after the header's ': '), or None if unknown."""
    sentence = text.split(": ", 1)[1].strip() if ": " in text else text.strip()
    return table.get(sentence)


def record_kind(text: str) -> str:
    return "ticket" if text.lstrip().startswith("Ticket #") else "message"


def infer_rule(family: str, examples: list[tuple[str, str]], table: dict[str, str]) -> Callable[[str], str] | None:
    """examples: (record text, answer). Returns topic -> answer for topic/routing policies, or None."""
    topics = [(record_topic(r, table), a) for r, a in examples]
    if any(t is None for t, _ in topics):
        return None
    by_ans: dict[str, set[str]] = {}
    for t, a in topics:
        by_ans.setdefault(a, set()).add(t)  # type: ignore[arg-type]
    answers = sorted(by_ans)
    candidates = []
    # One answer is the default (everything not routed); every other answer is one topic.
    for default in answers:
        routed = {a: by_ans[a] for a in answers if a != default}
        if not routed or any(len(ts) != 1 for ts in routed.values()):
            continue
        topic_to = {next(iter(ts)): a for a, ts in routed.items()}
        if len(topic_to) != len(routed) or by_ans[default] & set(topic_to):
            continue
        if family == "topic" and len(answers) != 2:
            continue
        candidates.append((default, topic_to))
    if len(candidates) != 1:
        return None
    default, topic_to = candidates[0]
    rule = lambda topic: topic_to.get(topic, default)  # noqa: E731
    if any(rule(t) != a for t, a in topics):
        return None
    return rule


def augment_with_relabels(data: TaskData, per_task: int = 48, seed: int = 0, log=print,
                          extra_tasks: Sequence[PolicyTask] = (), tokenizer: Any = None) -> int:
    """Add up to `per_task` relabelled records (same kind, known topic) to every topic/routing training task.

    extra_tasks: more training policies (generator train split) whose own records are never cached: they
    are trained only on relabelled cached records, which multiplies the number of distinct policies at no
    forward-pass cost. Items are appended to `data.items` (and `data.by_record`); returns how many were added."""
    def _option_ids(options):
        ids = tuple(first_token(tokenizer, o) for o in options)
        return ids if len(set(ids)) == len(ids) else None

    n_own = len(data.tasks)
    for t in extra_tasks:
        data.tasks.append(t)
        data.items.append([])
    table = _sentence_topics()
    rng = random.Random(seed)
    # Recover record texts from the prompts: the record is the user turn.
    rec_text: dict[int, str] = {}
    for its in data.items:
        for it in its:
            if it.record not in rec_text:
                task = data.tasks[it.task]
                for ex in task.examples:
                    if ex.input in data.records[it.record]:
                        rec_text[it.record] = ex.input
                        break
    pool: dict[str, list[tuple[int, str]]] = {}
    for r, text in rec_text.items():
        topic = record_topic(text, table)
        if topic is not None:
            pool.setdefault(record_kind(text), []).append((r, topic))
    added, tasks_used = 0, 0
    for ti, task in enumerate(data.tasks):
        if task.family not in ("topic", "routing"):
            continue
        exs = [(ex.input, ex.answer) for ex in task.examples if ex.options is not None]
        rule = infer_rule(task.family, exs, table)  # type: ignore[arg-type]
        if rule is None:
            continue
        kind = record_kind(exs[0][0])
        if any(record_kind(r) != kind for r, _ in exs):
            continue
        options = task.examples[0].options or []
        opt_ids = data.items[ti][0].option_ids if data.items[ti] else _option_ids(options)
        if opt_ids is None:
            continue
        own = {it.record for it in data.items[ti]}
        if ti >= n_own:
            own = set()
        cands = [(r, t) for r, t in pool.get(kind, []) if r not in own]
        # Keep every record of a routed topic (rare) and sample the default ones.
        special = [(r, t) for r, t in cands if rule(t) != rule("__none__")]
        default = [(r, t) for r, t in cands if rule(t) == rule("__none__")]
        rng.shuffle(special)
        rng.shuffle(default)
        chosen = special[: per_task // 2] + default[: per_task - min(len(special), per_task // 2)]
        for r, t in chosen:
            ans = rule(t)
            if ans not in options:
                continue
            it = Item(ti, r, opt_ids, options.index(ans))
            data.items[ti].append(it)
            data.by_record.setdefault(r, []).append(it)
            added += 1
        tasks_used += 1
    log(f"relabel: {tasks_used} topic/routing policies ({len(extra_tasks)} extra policies without own records) "
        f"got {added} (policy, record) pairs")
    return added
