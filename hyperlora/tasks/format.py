"""The policy task format: dataclasses, JSONL load/save, and validation with errors naming line and field.

One task per JSONL line::

    {"policy": str, "paraphrases": [str]?, "examples": [{"input": str, "options": [str], "answer": str}],
     "family": str?, "split": str?, "id": str?}

Free-text tasks give ``"check": {"regex": str}`` per example instead of ``options`` (``answer`` is then an
optional reference reply, used as a training target; without one, no oracle LoRA can be trained on that
task). A check is untrusted input: only a bounded regex subset is accepted and matching is bounded in time
(``hyperlora.tasks.checks``, docs/POLICY_TASKS.md). The options of one example are kept in the order
the file gives; the generator writes them in the order the policy names them, never gold-first, so the
order cannot leak the answer. Anyone can write such a file: nothing here depends on the generator.

Loading never raises anything but ``TaskFormatError`` (naming ``file:line`` and the field) for a bad file,
or ``FileNotFoundError`` for a missing one: invalid UTF-8, JSON nested too deeply, a lone surrogate
(``"\ud800"``: refused, not escaped, so every loaded task can be saved again), a regex outside the subset,
and a task ``id`` used twice (naming both lines) are all format errors. ``save_tasks`` validates first and
writes atomically (a temporary file beside the target, then ``os.replace``): a failed save leaves the old
file byte-identical.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hyperlora._io import atomic_write_text

from .checks import check_search, validate_pattern

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
    check: ``{"regex": pattern}`` for free text: a greedy generation passes if ``re.search`` would find it
    (matched by ``checks.check_search``: the reply's first 4,096 characters, at most 0.25 s).
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
            return check_search(self.check["regex"], generation)
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


def _short(v: Any, n: int = 80) -> str:
    """repr(v), cut to about n characters (error messages stay one readable line)."""
    r = repr(v)
    if len(r) <= n:
        return r
    return r[: n - 4] + "...'" if isinstance(v, str) else r[: n - 3] + "..."


def _need_str(v: Any, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(v, str):
        raise _err(where, f"must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise _err(where, "must be a non-empty string")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _err(where, f"holds a lone surrogate {v[e.start]!r} at character {e.start} (not valid Unicode text; "
                          "write the character itself or a proper surrogate pair)") from None
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
            raise _err(f"{where}.options", f"has duplicates: {_short(opts, 200)}")
        if "answer" not in d:
            raise _err(where, "missing field 'answer' (must be one of 'options')")
        ans = _need_str(d["answer"], f"{where}.answer")
        if ans not in opts:
            raise _err(f"{where}.answer", f"{_short(ans)} is not one of options {_short(opts, 200)}")
        return Example(input=inp, options=opts, answer=ans)
    chk = d["check"]
    if not isinstance(chk, dict) or set(chk) != {"regex"}:
        raise _err(f"{where}.check", "must be an object with exactly one field, 'regex'")
    pat = _need_str(chk["regex"], f"{where}.check.regex")
    try:
        validate_pattern(pat)
    except ValueError as e:
        raise _err(f"{where}.check.regex", f"{_short(pat)} {e} (accepted subset: docs/POLICY_TASKS.md)") from None
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


def _parse_line(raw: bytes, where: str) -> Any:
    """One line of a task file: bytes -> JSON value, every failure a TaskFormatError naming ``where``."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TaskFormatError(f"{where}: not valid UTF-8 (byte {e.start + 1}: {raw[e.start:e.start + 4]!r})") from None
    s = line.strip()
    if not s or s.startswith("#"):
        return None
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise TaskFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise TaskFormatError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer literal over Python's 4,300-digit limit
        raise TaskFormatError(f"{where}: not valid JSON ({e})") from None


def load_tasks(path: str | os.PathLike) -> list[PolicyTask]:
    """Read and validate a JSONL task file (blank lines and lines starting with '#' are skipped).

    Raises FileNotFoundError if ``path`` is not a file, and TaskFormatError naming ``file:line`` (and the
    field) for anything wrong inside it, including a task ``id`` that an earlier line already used.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"task file {str(p)!r} does not exist" if not p.exists()
                                else f"task file {str(p)!r} is not a regular file")
    tasks = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(p.read_bytes().splitlines(), 1):
        where = f"{p}:{n}"
        d = _parse_line(raw, where)
        if d is None:
            continue
        t = parse_task(d, where=where)
        if t.id is not None:
            if t.id in seen:
                raise TaskFormatError(f"{where}: duplicate task id {_short(t.id)} (first used at {p}:{seen[t.id]})")
            seen[t.id] = n
        tasks.append(t)
    if not tasks:
        raise TaskFormatError(f"{p}: no tasks (expected one JSON object per line)")
    return tasks


def save_tasks(tasks: Iterable[PolicyTask], path: str | os.PathLike) -> None:
    """Write tasks as JSONL, one per line (parent directories created), atomically.

    Every task is validated first, as ``load_tasks`` would (a lone surrogate, a bad regex, a duplicate
    id, ...): a TaskFormatError names the task (index and id) and the field, and nothing is written. The
    file is written to a temporary file beside ``path`` and renamed over it, so ``path`` holds either the
    complete new content or exactly what it held before.
    """
    p = Path(path)
    lines = []
    seen: dict[str, int] = {}
    for i, t in enumerate(tasks):
        where = f"task {i}" + (f" (id {_short(t.id)})" if isinstance(t.id, str) else "")
        d = task_to_dict(t)
        parse_task(d, where=where)
        if t.id is not None:
            if t.id in seen:
                raise TaskFormatError(f"{where}: duplicate task id (also task {seen[t.id]})")
            seen[t.id] = i
        lines.append(json.dumps(d, ensure_ascii=False) + "\n")
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, "".join(lines))
