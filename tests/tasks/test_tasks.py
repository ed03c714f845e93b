"""Policy task generator, splits, JSONL format + validation, and the shared prompt format."""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

import pytest

from hyperlora.tasks import (FAMILIES, SPLITS, TINY_PATH, PolicyTask, TaskFormatError, generate_suite,
                             generate_tasks, load_tasks, make_tiny_suite, save_tasks, tiny_suite)
from hyperlora.modeling.prompts import build_messages, end_of_turn, prompt_text, target_text
from hyperlora.tasks.vocab import (FIELDS, FORMAT_RULES, TOPICS, UNSEEN_FORMAT_WORDS, UNSEEN_WORDS)


@pytest.fixture(scope="module")
def suite():
    return generate_suite(7, train_per_family=40, held_out_per_family=6, examples_per_task=12,
                          held_out_examples_per_task=12)


def _quoted_words(policy: str) -> set[str]:
    return set(re.findall(r"'([^']+)'", policy)) | set(re.findall(r'"([^"]+)"', policy))


def test_suite_shape_and_determinism(suite):
    assert set(suite) == set(SPLITS)
    for split, tasks in suite.items():
        fams = Counter(t.family for t in tasks)
        assert set(fams) == set(FAMILIES), (split, fams)
        assert all(t.split == split for t in tasks)
        assert len({t.id for t in tasks}) == len(tasks)
    again = generate_suite(7, train_per_family=40, held_out_per_family=6, examples_per_task=12,
                           held_out_examples_per_task=12)
    assert [t.policy for t in again["train"]] == [t.policy for t in suite["train"]]
    other = generate_suite(8, train_per_family=40, held_out_per_family=6, examples_per_task=12,
                           held_out_examples_per_task=12)
    assert [t.policy for t in other["train"]] != [t.policy for t in suite["train"]]


def test_records_are_one_line_and_short(suite):
    for tasks in suite.values():
        for t in tasks:
            for e in t.examples:
                assert "\n" not in e.input and len(e.input) < 160, e.input


def test_classes_balanced_and_options_sorted(suite):
    for tasks in suite.values():
        for t in tasks:
            if t.family == "format":
                assert all(e.check is not None and e.options is None for e in t.examples)
                continue
            opts = t.examples[0].options
            assert opts == sorted(opts)  # order fixed, never depends on the gold answer
            assert all(e.options == opts for e in t.examples)
            counts = Counter(e.answer for e in t.examples)
            assert set(counts) == set(opts), (t.policy, counts)
            assert max(counts.values()) - min(counts.values()) <= 1
            for o in opts:  # the policy names every answer word
                assert f"'{o}'" in t.policy or f'"{o}"' in t.policy, (o, t.policy)
            if t.family == "routing":
                assert len(opts) in (3, 4)


def _topic_of(t: PolicyTask):
    """The topic a topic-family policy names (its verb or one of its nouns appears in the texts)."""
    text = " ".join(t.texts())
    hits = [tp for tp in TOPICS if tp.verb in text or any(f"about {n} " in text for n in tp.nouns)]
    assert len(hits) == 1, (text, [h.name for h in hits])
    return hits[0]


def test_same_record_gets_different_answers(suite):
    labels: dict[str, set[bool]] = defaultdict(set)
    for t in suite["train"]:
        if t.family != "topic":
            continue
        topic = _topic_of(t)
        by_label = defaultdict(set)
        for e in t.examples:
            sentence = e.input.split(": ", 1)[1]
            positive = sentence in topic.sentences
            by_label[positive].add(e.answer)
            labels[sentence].add(positive)
        # the answer is a function of whether the record is about the policy's topic
        assert len(by_label[True]) == 1 and len(by_label[False]) == 1 and by_label[True] != by_label[False]
    both = [s for s, a in labels.items() if a == {True, False}]
    assert len(both) > 20  # the same record is positive under one policy, negative under another


def _field_value(e_input: str) -> float:
    for f in FIELDS:
        pat = re.escape(f.template).replace(r"\{v\}", r"(?P<v>\$?[\d,.]+)").replace(r"\{x\}", ".+")
        m = re.fullmatch(pat, e_input)
        if m:
            return float(m.group("v").lstrip("$").replace(",", ""))
    raise AssertionError(f"no field template matches {e_input!r}")


def test_threshold_answers_follow_the_number(suite):
    n = 0
    for tasks in suite.values():
        for t in tasks:
            if t.family != "threshold":
                continue
            m = re.search(r"(over|under|above|below|exceeds) \$?([\d,]+)", t.policy)
            if m:
                thr, over = float(m.group(2).replace(",", "")), m.group(1) in ("over", "above", "exceeds")
            else:  # "'neg' when X is T or less, and 'pos' when it is higher"
                m = re.search(r"is \$?([\d,]+) or (less|more)", t.policy)
                assert m, t.policy
                thr, over = float(m.group(1).replace(",", "")), m.group(2) == "less"
            by_side = defaultdict(set)
            for e in t.examples:
                v = _field_value(e.input)
                assert v != thr
                by_side[(v > thr) == over].add(e.answer)
                n += 1
            assert len(by_side[True]) == 1 and len(by_side[False]) == 1 and by_side[True] != by_side[False]
    assert n > 100


def test_splits_keep_unseen_parts_out_of_training(suite):
    unseen_sentences = {s for tp in TOPICS if not tp.seen for s in tp.sentences}
    unseen_field_kinds = {f.template.split("{")[0] for f in FIELDS if not f.seen}
    for t in suite["train"] + suite["held_out_combo"]:
        words = _quoted_words(" ".join(t.texts()))
        assert not (words & UNSEEN_WORDS), (t.policy, words & UNSEEN_WORDS)
        assert not any(w in " ".join(t.texts()) for w in UNSEEN_FORMAT_WORDS if t.family == "format")
        assert "bullet" not in " ".join(t.texts())
        for e in t.examples:
            assert e.input.split(": ", 1)[-1] not in unseen_sentences, e.input
            assert not any(e.input.startswith(k) for k in unseen_field_kinds if "hotel" in k or "Event" in k)
    for t in suite["held_out_words"]:
        words = _quoted_words(" ".join(t.texts()))
        if t.family == "format":
            assert any(w in t.policy for w in UNSEEN_FORMAT_WORDS)
        else:
            assert words & UNSEEN_WORDS, t.policy
    for t in suite["held_out_topic"]:
        if t.family in ("topic", "routing", "conjunction"):
            assert any(e.input.split(": ", 1)[-1] in unseen_sentences for e in t.examples), t.policy
        elif t.family == "threshold":
            assert all("hotel" in e.input or "Event booking" in e.input for e in t.examples)
        else:
            assert "bullet" in " ".join(t.texts())


def test_held_out_combo_policies_never_in_training():
    train = generate_tasks("topic", "train", 60, seed=3)
    combo = generate_tasks("topic", "held_out_combo", 20, seed=3)
    key = lambda t: (_topic_of(t).name, tuple(t.examples[0].options))  # noqa: E731
    train_keys = {key(t) for t in train}
    assert not train_keys & {key(t) for t in combo}
    # ... but their parts were seen: each held-out topic and each word pair occurs in training
    train_topics = {k[0] for k in train_keys}
    assert sum(key(t)[0] in train_topics for t in combo) >= len(combo) // 2


def test_format_regex_accepts_its_reference_only(suite):
    for t in suite["train"]:
        if t.family != "format":
            continue
        for e in t.examples:
            assert e.passes(e.answer)
            assert not e.passes("Sure, happy to help with that.")
    # rules are distinct: a reply made for one word fails another word's check
    t1, t2 = [t for t in suite["train"] if t.family == "format"][:2]
    if t1.examples[0].check != t2.examples[0].check:
        assert not t2.examples[0].passes(t1.examples[0].answer) or t1.examples[0].answer.startswith(
            t2.examples[0].answer.split()[0])
    assert set(FORMAT_RULES) >= {"prefix", "json"}


def test_paraphrases_differ_and_name_the_same_words(suite):
    for t in suite["train"][:100]:
        assert len(t.paraphrases) >= 2
        assert len(set(t.texts())) == len(t.texts())
        if t.family != "format":
            ref = _quoted_words(t.policy)
            for p in t.paraphrases:
                assert _quoted_words(p) == ref, (t.policy, p)


def test_roundtrip_and_tiny_file_is_current(tmp_path, suite):
    p = tmp_path / "t.jsonl"
    save_tasks(suite["held_out_topic"], p)
    back = load_tasks(p)
    assert back == suite["held_out_topic"]
    tiny = tiny_suite()
    assert {t.family for t in tiny} == set(FAMILIES) and {t.split for t in tiny} == set(SPLITS)
    assert tiny == make_tiny_suite(), "tiny.jsonl is stale: regenerate it with save_tasks(make_tiny_suite(), TINY_PATH)"
    assert TINY_PATH.is_file()


def test_minimal_hand_written_file(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text('# my tasks\n{"policy": "Say yes if the amount is over 5", "examples": ['
                 '{"input": "amount 7", "options": ["no", "yes"], "answer": "yes"}]}\n\n'
                 '{"policy": "Begin with Hi", "examples": [{"input": "hello", "check": {"regex": "^Hi"}}]}\n')
    tasks = load_tasks(p)
    assert len(tasks) == 2 and tasks[1].examples[0].is_free_text and tasks[0].family is None
    assert tasks[1].examples[0].passes("Hi there") and not tasks[1].examples[0].passes("Hello")


@pytest.mark.parametrize("line, needle", [
    ('{"policy": "p", "examples": [{"input": "x", "options": ["a", "b"], "answer": "c"}]}', "examples[0].answer"),
    ('{"policy": "p", "examples": [{"options": ["a", "b"], "answer": "a"}]}', "'input'"),
    ('{"examples": [{"input": "x", "options": ["a", "b"], "answer": "a"}]}', "'policy'"),
    ('{"policy": "p", "examples": []}', "examples"),
    ('{"policy": "p", "examples": [{"input": "x", "check": {"regex": "("}}]}', "examples[0].check.regex"),
    ('{"policy": "p", "examples": [{"input": "x", "options": ["a"], "answer": "a"}]}', "examples[0].options"),
    ('{"policy": "p", "examples": [{"input": "x", "options": ["a", "b"], "answer": "a", "check": {"regex": "a"}}]}',
     "exactly one of"),
    ('{"policy": "p", "paraphrases": "q", "examples": [{"input": "x", "options": ["a", "b"], "answer": "a"}]}',
     "paraphrases"),
    ('{"policy": "p", "colour": 1, "examples": [{"input": "x", "options": ["a", "b"], "answer": "a"}]}', "colour"),
    ('{"policy": "p", "examples": [', "not valid JSON"),
])
def test_validation_errors_name_line_and_field(tmp_path, line, needle):
    p = tmp_path / "bad.jsonl"
    good = json.dumps({"policy": "ok", "examples": [{"input": "x", "options": ["a", "b"], "answer": "a"}]})
    p.write_text(good + "\n" + line + "\n")
    with pytest.raises(TaskFormatError) as ei:
        load_tasks(p)
    msg = str(ei.value)
    assert f"{p}:2" in msg and needle in msg, msg
    assert isinstance(ei.value, ValueError)


def test_bad_arguments():
    with pytest.raises(ValueError, match="family"):
        generate_tasks("nope", "train", 1)
    with pytest.raises(ValueError, match="split"):
        generate_tasks("topic", "test", 1)
    with pytest.raises(FileNotFoundError):
        load_tasks("/nonexistent/tasks.jsonl")


class _PlainTok:
    chat_template = None
    eos_token = "</s>"


def test_prompt_format_fallback_chatml():
    tok = _PlainTok()
    p = prompt_text(tok, "Ticket #1: refund please")
    assert p == "<|im_start|>user\nTicket #1: refund please<|im_end|>\n<|im_start|>assistant\n"
    assert target_text(tok, "flag") == "flag<|im_end|>"
    ps = prompt_text(tok, "rec", policy="Say yes", where="system")
    assert ps.startswith("<|im_start|>system\nSay yes<|im_end|>")
    pu = prompt_text(tok, "rec", policy="Say yes", where="user")
    assert "Say yes" in pu and "rec" in pu and "system" not in pu
    with pytest.raises(ValueError, match="where"):
        build_messages("r", "p", where="assistant")


@pytest.mark.slow
def test_prompt_format_with_real_template():
    import transformers  # a test dependency (pyproject [test]): missing, the suite must fail, not skip
    from hyperlora.modeling.base_model import _cached_default_dir, _is_complete, load_base_model

    d = _cached_default_dir()
    if not _is_complete(d):
        load_base_model()  # dequantizes the embedded GGUF once and writes the cache (10-20 s)
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    p = prompt_text(tok, "hello")
    assert p.endswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert end_of_turn(tok) == "<|im_end|>"
    assert prompt_text(tok, "hello", policy="P").startswith("<|im_start|>system\nP<|im_end|>")
