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

import torch

from hyperlora.hypernets.reader.text import quoted_spans, token_spans

MIN_WORDS = 3
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
    quotes = quoted_spans(policy)  # (word, start, end) inside the quotes
    words = [w.strip() for w, _, _ in quotes]
    if len(quotes) < min_words or len(set(words)) != len(words) or not all(words):
        return None
    cuts = []
    for (_, _, a_end), (_, b_start, _) in zip(quotes, quotes[1:]):
        a_end, b_start = a_end + 1, b_start - 1  # outside the quote characters
        between = policy[a_end:b_start]
        ends = [m.end() for m in _CLAUSE_END.finditer(between)]
        ands = [m.start() for m in _AND.finditer(between)]
        cuts.append(a_end + (ends[-1] if ends else ands[-1] if ands else len(between)))
    starts, stops = [0] + cuts, cuts + [len(policy)]
    out = []
    for s, e, (word, w_start, w_end) in zip(starts, stops, quotes):
        raw = policy[s:e]
        text = raw.strip()
        if not text:
            return None
        out.append(Clause(text, word, w_start, w_end, s + len(raw) - len(raw.lstrip())))
    return out


def tokens_of_span(spans: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose character spans overlap [start, end)."""
    return [j for j, (a, b) in enumerate(spans) if a < end and b > start and b > a]


def word_tokens(tokenizer: Any, ids: Sequence[int], text: str, start: int, end: int) -> list[int]:
    """Token indices of ``text[start:end]`` among ``ids``, the reader's tokens of ``text`` (the policy's
    user-turn tokens, then the chat template's tail). Empty if the decoded tokens do not reproduce the text
    there (a tokenizer that normalizes it): the caller then leaves that word alone."""
    decoded = tokenizer.decode(list(ids))
    if decoded[start:end] != text[start:end]:
        return []
    return tokens_of_span(token_spans(tokenizer, ids), start, end)


def _word_pieces(features: Any, text: str) -> list[tuple[Clause, list[int], list[int]]]:
    """Per clause of ``text``: (clause, the word's token indices in the reader's tokens of the policy, the same in
    the reader's tokens of the clause alone); clauses whose two tokenizations of the word differ in length are
    left out (the pieces would not line up)."""
    cache = features.__dict__.setdefault("_clause_pieces", {})
    if text not in cache:
        tok, out = features.tokenizer, []
        full_ids = features.prompt_ids(text)[features.prefix:]
        for c in answer_clauses(text) or []:
            full = word_tokens(tok, full_ids, text, c.start, c.end)
            own = word_tokens(tok, features.prompt_ids(c.text)[features.prefix:], c.text, *c.word_span)
            if full and len(full) == len(own):
                out.append((c, full, own))
        cache[text] = out
    return cache[text]


def clause_texts(features: Any, texts: Sequence[str]) -> list[str]:
    """Every clause text ``with_clause_keys`` may read for these policies (to read them ahead, e.g. into a cache)."""
    return list(dict.fromkeys(c.text for t in texts for c, _, _ in _word_pieces(features, t)))


def with_clause_keys(reader: Any, features: Any, texts: Sequence[str], adapters: dict, gates: Any) -> dict:
    """The reader's ``adapters`` for ``texts`` with the key rows (A) of every answer word the full reading gates
    positively replaced by that word's rows in its clause read alone; B, the gates and every other row unchanged.
    Out of place and differentiable (training uses it too). ``gates`` [P, T] is the full reading's."""
    plan = []  # (policy, its token, clause text, the clause's token)
    for p, text in enumerate(texts):
        for c, full, own in _word_pieces(features, text):
            if float(gates[p, full[0]]) > 0:
                plan += [(p, j, c.text, jc) for j, jc in zip(full, own)]
    if not plan:
        return adapters
    ctexts = list(dict.fromkeys(x[2] for x in plan))
    cad, _ = reader(features(ctexts))
    row = {t: q for q, t in enumerate(ctexts)}
    dev = next(iter(adapters.values()))[0].device
    pi, ji, qi, jci = (torch.tensor(v, device=dev) for v in zip(*[(p, j, row[t], jc) for p, j, t, jc in plan]))
    return {n: (a.index_put((pi, ji), cad[n][0][qi, jci]), b) for n, (a, b) in adapters.items()}
