"""Training-only answer words (hyperlora/tasks/word_swap.py): disjoint from everything the generator can emit,
and a faithful rewrite of a policy task onto them."""
from __future__ import annotations

import random
import re

import pytest

from hyperlora.tasks import Example, PolicyTask, generate_tasks, vocab
from hyperlora.tasks.word_swap import TRAIN_ONLY_WORDS, swap_answer_words


def _strings(x):
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(x, (list, tuple, set, frozenset)):
        for v in x:
            yield from _strings(v)
    elif hasattr(x, "__dataclass_fields__"):
        for f in x.__dataclass_fields__:
            yield from _strings(getattr(x, f))


def test_no_training_only_word_is_a_generator_word():
    words = set()
    for name in dir(vocab):
        if name.isupper():
            for s in _strings(getattr(vocab, name)):
                words |= set(re.findall(r"[a-z0-9]+", s.lower()))
    assert len(TRAIN_ONLY_WORDS) == len(set(TRAIN_ONLY_WORDS)) >= 100
    assert not [w for w in TRAIN_ONLY_WORDS if w in words]


@pytest.mark.parametrize("family", ["topic", "routing", "conjunction", "threshold"])
def test_swap_rewrites_policy_paraphrases_options_and_answers_consistently(family):
    for task in generate_tasks(family, "train", 6, seed=3):
        new = swap_answer_words(task, random.Random(7))
        assert new is not None
        old_words = sorted(task.examples[0].options)
        new_words = sorted(new.examples[0].options)
        assert len(set(new_words)) == len(old_words) and set(new_words) <= set(TRAIN_ONLY_WORDS)
        mapping = {}
        for a, b in zip(task.examples, new.examples):
            assert b.input == a.input and b.answer in b.options and b.options == sorted(b.options)
            assert mapping.setdefault(a.answer, b.answer) == b.answer  # one old word -> one new word
        assert len(set(mapping.values())) == len(mapping)
        for old_text, new_text in zip(task.texts(), new.texts()):
            assert not any(f"'{w}'" in new_text for w in old_words)
            for old, nw in mapping.items():  # every mention moved, nothing else changed
                assert new_text.count(f"'{nw}'") == old_text.count(f"'{old}'") >= 1
            assert re.sub(r"'[^']*'", "''", new_text) == re.sub(r"'[^']*'", "''", old_text)
        assert swap_answer_words(task, random.Random(7)).policy == new.policy  # seeded


def test_swap_refuses_what_it_cannot_rewrite_faithfully():
    free = generate_tasks("format", "train", 1, seed=0)[0]
    assert swap_answer_words(free, random.Random(0)) is None
    unquoted = PolicyTask(policy="Answer flag if it mentions refunds, else pass.",
                          examples=[Example("I want a refund.", ["flag", "pass"], "flag"),
                                    Example("Hello.", ["flag", "pass"], "pass")])
    assert swap_answer_words(unquoted, random.Random(0)) is None


def test_config_rejects_a_swap_without_extra_policies():
    from hyperlora.training.config import TrainConfig

    with pytest.raises(ValueError, match="extra_word_swap"):
        TrainConfig.from_dict({"method": "reader", "extra_word_swap": 0.5})
    with pytest.raises(ValueError, match="extra_word_swap"):
        TrainConfig.from_dict({"method": "reader", "extra_word_swap": 1.5, "extra_policies_per_family": 4})


def test_no_training_only_word_starts_like_a_held_out_word():
    """'green' would prime the held-out 'greenlight': no shared first token with a held-out answer or format word."""
    pytest.importorskip("transformers")
    from hyperlora.modeling.base_model import load_base_model

    _, tok = load_base_model()  # the embedded default's tokenizer (cached after the first load)
    first = lambda w: tok(w, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    held = {first(w) for w in vocab.UNSEEN_WORDS | vocab.UNSEEN_FORMAT_WORDS}
    assert not [w for w in TRAIN_ONLY_WORDS if first(w) in held]
