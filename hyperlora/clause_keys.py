"""Routing keys from each answer word's own clause, read alone (a serve-time change to the reader's adapters).

A routing policy names 3+ answer words, each behind its own condition ("Route damaged items to 'shipping',
warranty claims to 'security', and everything else to 'privacy'"). The base model reads the policy causally,
so the state at 'security' mixes every clause before it, and the reader's key for that word (what its slot
fires on) does not pick its topic's records (docs/EXPERIMENTS.md 10a: chance). Reading the word's clause
*alone* ("about warranty claims to 'security',") gives a state about that clause only. ``ReaderHypernet`` then
keeps every slot of the full reading (its gates, outputs and the default word's key) and swaps in the
clause reading's key rows for the words the full reading gates positively, i.e. the routed queues, not the
"everything else" default (negative gate). Measured in docs/EXPERIMENTS.md 11a.

Only policies quoting at least ``MIN_WORDS`` distinct answer words are split: on two-answer rules (topic,
conjunction) the clause that holds the positive word often lacks the condition ("..., in which case say
'flag'"), and the swap measured neutral there.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

MIN_WORDS = 3
# a quoted answer word: the quote is not inside a word ("customer's" is no quote), no line break inside
_QUOTED = re.compile(r"(?<![A-Za-z0-9])(['\"])([^'\"\n]{1,40}?)\1(?![A-Za-z0-9])")
_CLAUSE_END = re.compile(r"[;,.]")
_AND = re.compile(r"\band\b")


@dataclass(frozen=True)
class Clause:
    """One answer word's clause: its text (read alone) and the word's character span in the policy."""

    text: str
    word: str
    start: int  # of the word (inside its quotes) in the policy text
    end: int
    offset: int  # where the clause text starts in the policy

    @property
    def word_span(self) -> tuple[int, int]:
        """The word's character span in the clause text."""
        return self.start - self.offset, self.end - self.offset


def answer_clauses(policy: str, min_words: int = MIN_WORDS) -> list[Clause] | None:
    """Split a policy into one clause per quoted answer word, or None when it quotes fewer than ``min_words``
    distinct words (or quotes one word twice: then a word has no single clause).

    The cut between two consecutive quoted words is after the last ';', ',' or '.' between them, else before
    the last 'and' between them, else right before the second quote. The first clause keeps the policy's
    preamble ("Route tickets about X to 'a',"); the last one runs to the end ("and everything else to 'c'.")."""
    quotes = list(_QUOTED.finditer(policy))
    words = [m.group(2).strip() for m in quotes]
    if len(quotes) < min_words or len(set(words)) != len(words) or not all(words):
        return None
    cuts = []
    for a, b in zip(quotes, quotes[1:]):
        between = policy[a.end():b.start()]
        ends = [m.end() for m in _CLAUSE_END.finditer(between)]
        ands = [m.start() for m in _AND.finditer(between)]
        cuts.append(a.end() + (ends[-1] if ends else ands[-1] if ands else len(between)))
    starts, stops = [0] + cuts, cuts + [len(policy)]
    out = []
    for s, e, m in zip(starts, stops, quotes):
        raw = policy[s:e]
        text = raw.strip()
        if not text:
            return None
        out.append(Clause(text, m.group(2), m.start(2), m.end(2), s + len(raw) - len(raw.lstrip())))
    return out


def tokens_of_span(spans: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose character spans overlap [start, end)."""
    return [j for j, (a, b) in enumerate(spans) if a < end and b > start and b > a]


def word_tokens(tokenizer: Any, ids: Sequence[int], text: str, start: int, end: int) -> list[int]:
    """Token indices of ``text[start:end]`` among ``ids``, the reader's tokens of ``text`` (the policy's
    user-turn tokens, then the chat template's tail). Empty if the decoded tokens do not reproduce the text
    there (a tokenizer that normalizes it): the caller then leaves that word alone."""
    from hyperlora.reply_prefix import token_spans

    decoded = tokenizer.decode(list(ids))
    if decoded[start:end] != text[start:end]:
        return []
    return tokens_of_span(token_spans(tokenizer, ids), start, end)
