"""Policy-text and token helpers shared by the reader and its rule heads (no model, no tensors).

``policy_words`` (candidate fill / answer words), ``whole_word`` (a word not inside a longer alphanumeric run),
``quoted_spans`` (quoted runs), ``token_spans`` (each token's characters in the decoded text) and
``sentence_ends`` (tokens after which a sentence ends). Kept apart from the rule modules so the reader, the
reply-format and threshold rules and the clause keys all import them from one place, below them all.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

__all__ = ["policy_words", "whole_word", "quoted_spans", "token_spans", "sentence_ends"]

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_QUOTED = re.compile(r"(?<![A-Za-z0-9])(?:'([^'\n]{1,40})'|\"([^\"\n]{1,40})\")(?![A-Za-z0-9])")  # not "don't"
_SENTENCE_END = re.compile(r"(?<=[A-Za-z)\"'])[.!?](?=\s|$)")


def policy_words(text: str) -> list[tuple[str, int, int]]:
    """Candidate fill words of a policy: (word, start, end) for each alphanumeric run starting with a letter."""
    return [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(text)]


def whole_word(word: str) -> re.Pattern:
    """`word` not inside a longer alphanumeric run."""
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])")


def quoted_spans(text: str) -> list[tuple[str, int, int]]:
    """(content, start, end) of each single- or double-quoted run of 1-40 characters, the span being the content's
    inside the quotes; an apostrophe inside a word ("don't", "customer's") opens no quote."""
    out = []
    for m in _QUOTED.finditer(text):
        g = 1 if m.group(1) is not None else 2
        out.append((m.group(g), m.start(g), m.end(g)))
    return out


def token_spans(tokenizer: Any, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character span of each token in ``tokenizer.decode(ids)`` (by incremental decoding)."""
    spans, prev = [], 0
    for i in range(len(ids)):
        n = len(tokenizer.decode(list(ids[: i + 1])))
        spans.append((prev, max(prev, n)))
        prev = max(prev, n)
    return spans


def sentence_ends(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """Indices of the tokens after which a sentence of ``tokenizer.decode(ids)`` ends: '.', '!' or '?' after a
    letter, a bracket or a quote, followed by white space or the end of the text (not "3.5", not "1. ")."""
    if not ids:
        return []
    text = tokenizer.decode(list(ids))
    stops = [m.end() for m in _SENTENCE_END.finditer(text)]
    return [i for i, (a, b) in enumerate(token_spans(tokenizer, ids)) if any(a < e <= b for e in stops)]
