"""Task files as hostile or careless input (issue 19 rows 3, 5, 15): every bad file is a TaskFormatError
naming file:line, checks cannot hang, duplicate ids are refused, and save_tasks is atomic."""
from __future__ import annotations

import json
import re
import time

import pytest

from hyperlora.tasks import SPLITS, generate_suite, load_tasks, save_tasks
from hyperlora.tasks.checks import MAX_GROUP_DEPTH, MAX_PATTERN_CHARS, check_search, validate_pattern
from hyperlora.tasks.format import Example, PolicyTask, TaskFormatError

GOOD = json.dumps({"policy": "ok", "examples": [{"input": "x", "options": ["a", "b"], "answer": "a"}]})


def _free_text(pattern: str) -> str:
    return json.dumps({"policy": "p", "examples": [{"input": "x", "check": {"regex": pattern}}]})


def _bad_file(tmp_path, second_line: str | bytes):
    p = tmp_path / "bad.jsonl"
    tail = second_line if isinstance(second_line, bytes) else second_line.encode("utf-8")
    p.write_bytes(GOOD.encode() + b"\n" + tail + b"\n")
    return p


# ------------------------------------------------------------------------------------ row 3: regexes


@pytest.mark.parametrize("pattern", [r"^(a+)+$", r"^(\w+\s?)+$", r"(a|ab)*c", r"(?:x*y?)+", r"((a)+)+"])
def test_catastrophic_regex_is_refused_on_load_naming_file_line_and_pattern(tmp_path, pattern):
    # issue 19 row 3: these were accepted, and checking a 30-character reply took seconds
    p = _bad_file(tmp_path, _free_text(pattern))
    with pytest.raises(TaskFormatError) as ei:
        load_tasks(p)
    msg = str(ei.value)
    assert f"{p}:2" in msg and "examples[0].check.regex" in msg and repr(pattern) in msg, msg
    assert "\n" not in msg


def test_regex_length_and_depth_bounds(tmp_path):
    with pytest.raises(TaskFormatError, match="characters long"):
        load_tasks(_bad_file(tmp_path, _free_text("a" * (MAX_PATTERN_CHARS + 1))))
    deep = "(" * (MAX_GROUP_DEPTH + 1) + "a" + ")" * (MAX_GROUP_DEPTH + 1)
    with pytest.raises(TaskFormatError, match="nests groups"):
        load_tasks(_bad_file(tmp_path, _free_text(deep)))
    with pytest.raises(TaskFormatError, match="counted repeat of 5000"):
        load_tasks(_bad_file(tmp_path, _free_text("a{5000}")))
    ok = "(" * MAX_GROUP_DEPTH + "a" + ")" * MAX_GROUP_DEPTH
    validate_pattern(ok)  # the bound itself is accepted


@pytest.mark.parametrize("pattern", [r"^\s*Noted:", r"--\s*Team\W*\s*$", r"^\s*\[Ops\]", r'^\s*\{\s*"Ack"\s*:',
                                     r"^\s*[-*\u2022]\s*Memo\b", r"(?:ab)+c", r"[\w\s]+", r"a{2,5}", r"(ha){3}",
                                     r"(?i)^(yes|no)\b", r"colou?r", r"\d{3}-\d{4}"])
def test_ordinary_regexes_are_accepted(pattern):
    validate_pattern(pattern)


def test_every_generator_pattern_is_accepted_and_matches_like_re_search():
    """The bounded matcher gives re.search's answer on all generated checks and replies (behaviour unchanged)."""
    pats, replies = set(), {"", "Sure, happy to help.", "  Noted: x", "x -- Team!!  ", "- Memo\n- x", '{"Ack": 1}'}
    suite = generate_suite(0)
    for split in SPLITS:
        for t in suite[split]:
            for e in t.examples:
                if e.check is not None:
                    pats.add(e.check["regex"])
                    replies.add(e.answer or "")
    assert len(pats) > 50
    replies = sorted(replies)[:200]
    for pat in pats:
        validate_pattern(pat)
        for r in replies:
            assert check_search(pat, r) == (re.search(pat, r) is not None), (pat, r)


def test_matching_is_bounded_in_time_even_for_patterns_built_in_code():
    # Example objects made in code skip the load-time check; matching is still bounded (timeout, reply length)
    slow_poly = Example("x", check={"regex": r"\s*\s*\s*\s*\s*x"})  # inside the subset, O(n^6) backtracking
    expo = Example("x", check={"regex": r"^(a+)+$"})
    t0 = time.perf_counter()
    assert not slow_poly.passes(" " * 100_000)
    assert not expo.passes("a" * 40 + "b")
    assert time.perf_counter() - t0 < 3.0
    assert slow_poly.passes("  x")


# ------------------------------------------------------------------------------------ row 5: surrogates


def test_lone_surrogate_in_a_task_file_is_a_format_error(tmp_path):
    p = _bad_file(tmp_path, '{"policy": "p\\ud800", "examples": [{"input": "x", "options": ["a", "b"], "answer": "a"}]}')
    with pytest.raises(TaskFormatError) as ei:
        load_tasks(p)
    assert f"{p}:2.policy" in str(ei.value) and "surrogate" in str(ei.value)
    # a proper surrogate pair is a real character and loads
    p.write_text('{"policy": "p \\ud83d\\ude00", "examples": [{"input": "x", "options": ["a", "b"], "answer": "a"}]}\n')
    assert load_tasks(p)[0].policy == "p \U0001F600"


def test_failed_save_leaves_the_file_byte_identical(tmp_path):
    # issue 19 row 5: saving 5 tasks, the 3rd holding "\ud800", truncated the file to 2 lines, then raised
    p = tmp_path / "tasks.jsonl"
    tasks = [PolicyTask(f"policy {i}", [Example("x", ["a", "b"], "a")], id=f"t{i}") for i in range(5)]
    save_tasks(tasks, p)
    before = p.read_bytes()
    tasks[2].examples[0].input = "bad \ud800 text"
    with pytest.raises(TaskFormatError) as ei:
        save_tasks(tasks, p)
    assert "task 2 (id 't2')" in str(ei.value) and "examples[0].input" in str(ei.value)
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["tasks.jsonl"]  # no temp file left behind
    assert load_tasks(p) == [PolicyTask(f"policy {i}", [Example("x", ["a", "b"], "a")], id=f"t{i}") for i in range(5)]


def test_save_refuses_what_load_would_refuse(tmp_path):
    p = tmp_path / "t.jsonl"
    dup = [PolicyTask("a", [Example("x", ["a", "b"], "a")], id="same"),
           PolicyTask("b", [Example("y", ["a", "b"], "b")], id="same")]
    with pytest.raises(TaskFormatError, match="duplicate task id"):
        save_tasks(dup, p)
    with pytest.raises(TaskFormatError, match=r"task 0\.examples\[0\]\.check\.regex"):
        save_tasks([PolicyTask("a", [Example("x", check={"regex": "(a+)+"})])], p)
    assert not p.exists()


# ------------------------------------------------------------------------------------ row 15


@pytest.mark.parametrize("line, needle", [
    (_free_text("a{4294967296}"), "check.regex"),                  # was OverflowError
    (_free_text("(" * 5000 + "a" + ")" * 5000), "check.regex"),    # was RecursionError
    (_free_text("(" * 240 + "a" + ")" * 240), "nests groups"),     # within the length bound, too deep
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),          # was RecursionError (JSON)
    ('{"policy": ' + "1" * 5000 + "}", "not valid JSON"),          # was ValueError (int digits limit)
    (b'{"policy": "caf\xe9", "examples": []}', "not valid UTF-8"),  # was UnicodeDecodeError
    (b"\xff\xfe{}", "not valid UTF-8"),
])
def test_hostile_lines_are_format_errors_with_file_and_line(tmp_path, line, needle):
    p = _bad_file(tmp_path, line)
    with pytest.raises(TaskFormatError) as ei:
        load_tasks(p)
    msg = str(ei.value)
    assert f"{p}:2" in msg and needle in msg, msg[:300]
    assert "\n" not in msg and len(msg) < 600


def test_duplicate_task_ids_name_both_lines(tmp_path):
    d = json.loads(GOOD)
    p = tmp_path / "dup.jsonl"
    p.write_text(json.dumps({**d, "id": "t1"}) + "\n" + GOOD + "\n\n" + json.dumps({**d, "id": "t1"}) + "\n")
    with pytest.raises(TaskFormatError) as ei:
        load_tasks(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:4:") and f"{p}:1" in msg and "duplicate task id 't1'" in msg, msg
    # tasks without ids (or with distinct ones) are fine
    p.write_text(GOOD + "\n" + GOOD + "\n" + json.dumps({**d, "id": "t2"}) + "\n")
    assert len(load_tasks(p)) == 3


def test_line_numbers_count_crlf_and_cr_like_text_mode(tmp_path):
    p = tmp_path / "crlf.jsonl"
    p.write_bytes(GOOD.encode() + b"\r\n# comment\r" + b"{oops}\r\n")
    with pytest.raises(TaskFormatError, match=r"crlf\.jsonl:3: not valid JSON"):
        load_tasks(p)


def test_a_directory_is_not_a_task_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a regular file"):
        load_tasks(tmp_path)


def test_bounded_matcher_keeps_re_semantics_in_the_main_thread_and_is_bounded_in_others():
    # re's \s matches \x1c-\x1f (the regex package's does not): results must stay re.search's
    assert check_search(r"^\s*OK", "\x1fOK") and re.search(r"^\s*OK", "\x1fOK")
    import threading

    out = []
    th = threading.Thread(target=lambda: out.append((check_search(r"\s*\s*\s*\s*\s*x", " " * 50_000),
                                                     check_search(r"^Noted", "Noted: hi"))))
    t0 = time.perf_counter()
    th.start()
    th.join(10)
    assert out == [(False, True)] and time.perf_counter() - t0 < 5.0
