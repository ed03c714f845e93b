"""Property-based tests of the task-file loader: random JSON lines, random regexes, random unicode and bytes.

Every input loads or raises TaskFormatError (never another exception), within a deadline (never hangs);
whatever loads saves and loads back equal; an accepted regex matches like re.search, quickly.

The suite runs a few hundred examples per property. The >= 10,000-example fuzz run recorded in
docs/RELIABILITY.md is the same file with HYPERLORA_FUZZ_EXAMPLES set, e.g.
    HYPERLORA_FUZZ_EXAMPLES=2500 .venv/bin/python -m pytest -q -p no:cacheprovider tests/tasks/test_task_fuzz.py
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

import pytest

import hypothesis  # a test dependency (pyproject [test]): missing, the suite must fail, not skip
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hyperlora.tasks.checks import MATCH_TIMEOUT_S, check_search, validate_pattern  # noqa: E402
from hyperlora.tasks.format import TaskFormatError, load_tasks, parse_task, save_tasks  # noqa: E402

N = int(os.environ.get("HYPERLORA_FUZZ_EXAMPLES", "0")) or None
SETTINGS = settings(max_examples=N or 150, deadline=2000 if N else 5000, derandomize=not N,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much], database=None)

# ---------------------------------------------------------------------------------------------- strategies

# text with everything hostile in reach: lone surrogates, NUL, line separators, quotes, astral characters
_text = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=30) | \
    st.sampled_from(["", " ", "a", "b", "\ud800", "x\udfff", "\x00", "\u2028", "\r", "é", "\U0001F600", "'"])

_REGEX_ATOMS = ["a", "b", "ab", ".", "\\w", "\\s", "\\d", "\\b", "\\W", "[ab]", "[^a]", "[", "]", "(", ")", "(?:",
                "(?=", "(?!", "(?<=a)", "(?i)", "|", "*", "+", "?", "*?", "+?", "{2}", "{1,3}", "{,2}", "{4294967296}",
                "{1000}", "{1001}", "^", "$", "\\", "\\1", "(?P<g>", "(?P=g)", "\\u2022", "-", ":", "\\{", " ", "é",
                "(?(1)a|b)", "(?>", "*+", "++"]
_regex = st.lists(st.sampled_from(_REGEX_ATOMS), max_size=14).map("".join) | _text


def _json_values(leaf=None):
    leaf = leaf or (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | _text)
    return st.recursive(leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_text, kids, max_size=4),
                        max_leaves=12)


def _example_dicts():
    choice = st.fixed_dictionaries({"input": _text, "options": st.lists(_text, max_size=4), "answer": _text})
    free = st.fixed_dictionaries({"input": _text, "check": st.fixed_dictionaries({"regex": _regex})},
                                 optional={"answer": _text})
    return choice | free | st.dictionaries(st.sampled_from(["input", "options", "answer", "check", "x"]),
                                           _json_values(), max_size=4)


def _task_dicts():
    return st.fixed_dictionaries(
        {"policy": _text, "examples": st.lists(_example_dicts(), max_size=3)},
        optional={"paraphrases": st.lists(_text, max_size=2) | _json_values(), "id": _text | st.integers(),
                  "family": _text, "split": _text, "colour": _text})


@st.composite
def _valid_ish_tasks(draw):
    """Tasks that mostly load (so save/load round trips are exercised), with hostile text and regexes."""
    word = st.text(st.characters(codec="utf-8", min_codepoint=33), min_size=1, max_size=6)
    exs = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            opts = draw(st.lists(word, min_size=2, max_size=3, unique=True))
            exs.append({"input": draw(word), "options": opts, "answer": draw(st.sampled_from(opts))})
        else:
            ex = {"input": draw(word), "check": {"regex": draw(_regex)}}
            if draw(st.booleans()):
                ex["answer"] = draw(word)
            exs.append(ex)
    d = {"policy": draw(word | _text), "examples": exs}
    if draw(st.booleans()):
        d["id"] = draw(st.sampled_from(["a", "b", "c"]))  # collisions across lines: duplicate ids
    if draw(st.booleans()):
        d["paraphrases"] = draw(st.lists(word, max_size=2))
    return d


def _lines():
    as_json = (_valid_ish_tasks() | _valid_ish_tasks() | _task_dicts() | _json_values()).map(lambda v: json.dumps(v, ensure_ascii=False, allow_nan=True))
    return st.lists(as_json | st.sampled_from(["", "# c", "{", "[" * 3000, '{"id": 1' + "0" * 5000 + "}"]) | _text,
                    min_size=0, max_size=5)


def _encode(lines: list[str]) -> bytes:
    return "\n".join(lines).encode("utf-8", "surrogatepass")  # lone surrogates become invalid UTF-8 bytes


# ---------------------------------------------------------------------------------------------- properties


def _load_or_format_error(data: bytes):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.jsonl"
        p.write_bytes(data)
        try:
            tasks = load_tasks(p)
        except TaskFormatError as e:
            assert "\n" not in str(e) and str(e).startswith(str(p)), str(e)[:300]
            event("TaskFormatError")
            return None
        event("loaded")
        # whatever loads saves atomically and loads back equal
        save_tasks(tasks, p)
        assert load_tasks(p) == tasks
        return tasks


@SETTINGS
@given(_lines())
def test_random_json_lines_load_or_raise_task_format_error(lines):
    _load_or_format_error(_encode(lines))


@SETTINGS
@given(st.binary(max_size=200) | st.lists(st.binary(max_size=40), max_size=4).map(b"\n".join))
def test_random_bytes_load_or_raise_task_format_error(data):
    _load_or_format_error(data)


@SETTINGS
@given(_task_dicts())
def test_parse_task_accepts_or_raises_task_format_error(d):
    try:
        parse_task(d, where="t")
        event("parsed")
    except TaskFormatError:
        event("TaskFormatError")


@SETTINGS
@given(_regex, st.text(max_size=60) | st.sampled_from(["a" * 40 + "b", " " * 3000 + "x", "ab" * 50]))
def test_random_regexes_are_refused_or_match_like_re_search_quickly(pattern, reply):
    try:
        validate_pattern(pattern)
    except ValueError:
        event("regex refused")
        return
    event("regex accepted")
    t0 = time.perf_counter()
    got = check_search(pattern, reply)
    assert time.perf_counter() - t0 < MATCH_TIMEOUT_S + 1.0
    if len(reply) <= 60:  # short replies: re.search is quick on the accepted subset, so compare
        assert got == (re.search(pattern, reply) is not None), (pattern, reply)
