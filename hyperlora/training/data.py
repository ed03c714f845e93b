"""Training data for option-choice policies: tokenized records, options' first tokens, batch sampling.

Records (the `input` strings) are deduplicated across tasks: the same record appears under many policies
with different answers, which is what makes the description matter, and lets the frozen lower layers'
output of each record be computed once (`hyperlora.training.cache`).

The training loss is a softmax over the example's own options, scored by each option's first token at
the answer position. Examples whose options share a first token cannot be told apart that way: they are
counted and skipped (`TaskData.skipped`), never silently mislabelled. Free-text tasks are skipped here.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from hyperlora.tasks.format import PolicyTask
from hyperlora.modeling.padding import pad_ids
from hyperlora.modeling.prompts import prompt_text


@dataclass
class Item:
    """One (task, record) pair: record index, first-token id of each option, index of the gold option."""

    task: int
    record: int
    option_ids: tuple[int, ...]
    answer: int


@dataclass
class TaskData:
    tasks: list[PolicyTask]
    records: list[str]
    record_ids: list[list[int]]  # prompt token ids (no policy), per record
    items: list[list[Item]]  # per task
    by_record: dict[int, list[Item]] = field(default_factory=dict)
    skipped: int = 0

    @property
    def usable_tasks(self) -> list[int]:
        return [i for i, it in enumerate(self.items) if len(it) >= 2]


def first_token(tokenizer: Any, word: str) -> int:
    """First token id of the assistant's answer `word` (the text right after the assistant header)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"option {word!r} tokenizes to nothing")
    return int(ids[0])


def build_task_data(tasks: Sequence[PolicyTask], tokenizer: Any, policy_in_prompt: bool = False,
                    where: str = "system") -> TaskData:
    """Tokenize every option-choice task. policy_in_prompt: records are (policy, record) prompts (in_context
    and multitask_lora baselines), so records are not shared across tasks."""
    records: list[str] = []
    rec_index: dict[str, int] = {}
    record_ids: list[list[int]] = []
    items: list[list[Item]] = []
    skipped = 0
    for ti, task in enumerate(tasks):
        its: list[Item] = []
        for ex in task.examples:
            if ex.options is None:
                skipped += 1
                continue
            opt = tuple(first_token(tokenizer, o) for o in ex.options)
            if len(set(opt)) != len(opt) or ex.answer not in ex.options:
                skipped += 1
                continue
            text = prompt_text(tokenizer, ex.input, task.policy if policy_in_prompt else None, where)  # type: ignore[arg-type]
            if text not in rec_index:
                rec_index[text] = len(records)
                records.append(text)
                record_ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            its.append(Item(ti, rec_index[text], opt, ex.options.index(ex.answer)))
        items.append(its)
    data = TaskData(list(tasks), records, record_ids, items, skipped=skipped)
    for its in items:
        for it in its:
            data.by_record.setdefault(it.record, []).append(it)
    return data


def sample_batch(data: TaskData, rng: random.Random, policies: int, per_policy: int,
                 contrastive: float = 0.0, task_pool: Sequence[int] | None = None) -> list[Item]:
    """`policies` distinct tasks x `per_policy` examples, balanced over gold options where possible.

    contrastive in [0, 1]: that fraction of each task's rows reuse a record already drawn for another task
    of the batch (the same record under another policy, often with another answer), so the gradient has to
    come from the description.
    """
    pool = list(task_pool) if task_pool is not None else data.usable_tasks
    chosen = rng.sample(pool, min(policies, len(pool)))
    batch: list[Item] = []
    seen_records: list[int] = []
    for t in chosen:
        its = data.items[t]
        by_ans: dict[int, list[Item]] = {}
        for it in its:
            by_ans.setdefault(it.answer, []).append(it)
        own = {it.record: it for it in its}
        picked: list[Item] = []
        n_con = int(round(contrastive * per_policy)) if seen_records else 0
        cands = [own[r] for r in seen_records if r in own]
        rng.shuffle(cands)
        picked.extend(cands[:n_con])
        keys = sorted(by_ans)
        rng.shuffle(keys)
        k = 0
        while len(picked) < per_policy:
            picked.append(rng.choice(by_ans[keys[k % len(keys)]]))
            k += 1
        batch.extend(picked)
        seen_records.extend(it.record for it in picked)
    return batch


def collate_options(items: Sequence[Item]) -> tuple[torch.Tensor, torch.Tensor]:
    """(option_ids [N, K_max] padded with -1, answer [N])."""
    opt, _ = pad_ids([it.option_ids for it in items], -1)
    ans = torch.as_tensor([it.answer for it in items], dtype=torch.long)
    return opt, ans


def spread_over_families(data: TaskData, n: int) -> list[int]:
    """Up to n usable task indices taken round-robin over families (so a cap never drops a whole family)."""
    by: dict[str, list[int]] = {}
    for t in data.usable_tasks:
        by.setdefault(data.tasks[t].family or "tasks", []).append(t)
    out: list[int] = []
    k = 0
    while len(out) < n and any(k < len(v) for v in by.values()):
        for v in by.values():
            if k < len(v) and len(out) < n:
                out.append(v[k])
        k += 1
    return sorted(out)
