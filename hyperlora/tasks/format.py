"""The policy task format: dataclasses, JSONL load/save, and validation with errors naming line and field.

One task per JSONL line::

    {"policy": str, "paraphrases": [str]?, "examples": [{"input": str, "options": [str], "answer": str}],
     "family": str?, "split": str?, "id": str?}

Free-text tasks give ``"check": {"regex": str}`` per example instead of ``options`` (``answer`` is then an
optional reference reply, used as a training target). The options of one example are kept in the order
the file gives; the generator writes them in the order the policy names them, never gold-first, so the
order cannot leak the answer. Anyone can write such a file: nothing here depends on the generator.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = ["Example", "PolicyTask", "TaskFormatError", "load_tasks", "save_tasks", "parse_task", "task_to_dict"]

_TASK_KEYS = {"policy", "paraphrases", "examples", "family", "split", "id"}
_EXAMPLE_KEYS = {"input", "options", "answer", "check"}


class TaskFormatError(ValueError):
    """A task file or task dict breaks the format; the message names the line (if any) and the field."""


@dataclass
class Example:
    """One record under one policy.

    input: the record (one short line). options: the answer words to choose from (None for free text).
    answer: the gold option (multiple choice) or an optional reference reply (free text).
    check: ``{"regex": pattern}`` for free text: a greedy generation passes if ``re.search`` finds it.
    """

    input: str
    options: list[str] | None = None
    answer: str | None = None
    check: dict[str, str] | None = None

    @property
    def is_free_text(self) -> bool:
        return self.options is None

    def passes(self, generation: str) -> bool:
        """Free text: does the generation satisfy the check? Multiple choice: is it the gold answer?"""
        if self.check is not None:
            return re.search(self.check["regex"], generation) is not None
        return generation.strip() == (self.answer or "")


@dataclass
class PolicyTask:
    """A policy (plain-language rule), optional paraphrases of it, and examples labelled under it."""

    policy: str
    examples: list[Example]
    paraphrases: list[str] = field(default_factory=list)
    family: str | None = None
    split: str | None = None
    id: str | None = None

    @property
    def is_free_text(self) -> bool:
        return any(e.is_free_text for e in self.examples)

    def texts(self) -> list[str]:
        """The policy and its paraphrases, policy first (all are valid descriptions of the same rule)."""
        return [self.policy, *self.paraphrases]


def _err(where: str, msg: str) -> TaskFormatError:
    return TaskFormatError(f"{where}: {msg}")


def _need_str(v: Any, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(v, str):
        raise _err(where, f"must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise _err(where, "must be a non-empty string")
    return v


def parse_example(d: Any, where: str) -> Example:
    """Validate one example dict (``where`` prefixes error messages)."""
    if not isinstance(d, dict):
        raise _err(where, f"must be an object, got {type(d).__name__}")
    unknown = set(d) - _EXAMPLE_KEYS
    if unknown:
        raise _err(where, f"unknown field(s) {sorted(unknown)}; allowed: {sorted(_EXAMPLE_KEYS)}")
    if "input" not in d:
        raise _err(where, "missing field 'input' (the record text)")
    inp = _need_str(d["input"], f"{where}.input")
    has_opt, has_check = d.get("options") is not None, d.get("check") is not None
    if has_opt == has_check:
        raise _err(where, "give exactly one of 'options' (multiple choice) or 'check' (free text, {\"regex\": ...})")
    if has_opt:
        opts = d["options"]
        if not isinstance(opts, list) or len(opts) < 2:
            raise _err(f"{where}.options", "must be a list of at least 2 strings")
        opts = [_need_str(o, f"{where}.options[{i}]") for i, o in enumerate(opts)]
        if len(set(opts)) != len(opts):
            raise _err(f"{where}.options", f"has duplicates: {opts}")
        if "answer" not in d:
            raise _err(where, "missing field 'answer' (must be one of 'options')")
        ans = _need_str(d["answer"], f"{where}.answer")
        if ans not in opts:
            raise _err(f"{where}.answer", f"{ans!r} is not one of options {opts}")
        return Example(input=inp, options=opts, answer=ans)
    chk = d["check"]
    if not isinstance(chk, dict) or set(chk) != {"regex"}:
        raise _err(f"{where}.check", "must be an object with exactly one field, 'regex'")
    pat = _need_str(chk["regex"], f"{where}.check.regex")
    try:
        re.compile(pat)
    except re.error as e:
        raise _err(f"{where}.check.regex", f"is not a valid regular expression: {e}") from None
    ans = d.get("answer")
    if ans is not None:
        ans = _need_str(ans, f"{where}.answer")
    return Example(input=inp, answer=ans, check={"regex": pat})


def parse_task(d: Any, where: str = "task") -> PolicyTask:
    """Validate a task dict and build a PolicyTask; raises TaskFormatError naming the field."""
    if not isinstance(d, dict):
        raise _err(where, f"must be a JSON object, got {type(d).__name__}")
    unknown = set(d) - _TASK_KEYS
    if unknown:
        raise _err(where, f"unknown field(s) {sorted(unknown)}; allowed: {sorted(_TASK_KEYS)}")
    if "policy" not in d:
        raise _err(where, "missing field 'policy' (the plain-language rule)")
    policy = _need_str(d["policy"], f"{where}.policy")
    paras = d.get("paraphrases") or []
    if not isinstance(paras, list):
        raise _err(f"{where}.paraphrases", "must be a list of strings")
    paras = [_need_str(p, f"{where}.paraphrases[{i}]") for i, p in enumerate(paras)]
    exs = d.get("examples")
    if not isinstance(exs, list) or not exs:
        raise _err(f"{where}.examples", "must be a non-empty list of examples")
    examples = [parse_example(e, f"{where}.examples[{i}]") for i, e in enumerate(exs)]
    meta = {}
    for k in ("family", "split", "id"):
        if d.get(k) is not None:
            meta[k] = _need_str(d[k], f"{where}.{k}")
    return PolicyTask(policy=policy, examples=examples, paraphrases=paras, **meta)


def example_to_dict(e: Example) -> dict[str, Any]:
    out: dict[str, Any] = {"input": e.input}
    if e.options is not None:
        out["options"] = list(e.options)
    if e.answer is not None:
        out["answer"] = e.answer
    if e.check is not None:
        out["check"] = dict(e.check)
    return out


def task_to_dict(t: PolicyTask) -> dict[str, Any]:
    """The JSON object of one task (optional fields omitted when empty)."""
    out: dict[str, Any] = {"policy": t.policy}
    if t.paraphrases:
        out["paraphrases"] = list(t.paraphrases)
    out["examples"] = [example_to_dict(e) for e in t.examples]
    for k in ("family", "split", "id"):
        v = getattr(t, k)
        if v is not None:
            out[k] = v
    return out


def load_tasks(path: str | os.PathLike) -> list[PolicyTask]:
    """Read and validate a JSONL task file (blank lines and lines starting with '#' are skipped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"task file {str(p)!r} does not exist")
    tasks = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            try:
                d = json.loads(s)
            except json.JSONDecodeError as e:
                raise TaskFormatError(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            tasks.append(parse_task(d, where=f"{p}:{n}"))
    if not tasks:
        raise TaskFormatError(f"{p}: no tasks (expected one JSON object per line)")
    return tasks


def save_tasks(tasks: Iterable[PolicyTask], path: str | os.PathLike) -> None:
    """Write tasks as JSONL, one per line (parent directories created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for t in tasks:
            f.write(json.dumps(task_to_dict(t), ensure_ascii=False) + "\n")
