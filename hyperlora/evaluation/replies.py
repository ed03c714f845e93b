"""Reply-level metrics: what a user calling ``rt.generate`` (or a chat server) gets, next to the scored choice.

The scored metrics rank the options by likelihood (``scoring.option_logprobs``); a user gets the greedy reply
instead. These functions judge greedy replies (text, and token ids for loops):

* ``first_option(reply, options)``: the option the reply starts with, or None. The reply is stripped of
  surrounding whitespace and of leading quote / markup characters (``"'`*_``); then, options tried longest
  first, case-insensitively, the first option that the reply starts with *and that ends there at a label
  boundary*: the next character is not a letter, digit, ``-`` or ``_``. So ``P10`` never reads as ``P1``,
  ``TIER-3`` never as ``TIER``, ``flagged`` never as ``flag``, while ``P1.``, ``flag, because ...`` and
  ``TIER-2\\nThe reason ...`` read as ``P1``, ``flag`` and ``TIER-2``. An empty reply gives None.
  *Reply accuracy* compares this with the gold answer (None is wrong).
* ``is_clean(reply, options)``: the reply, stripped of surrounding whitespace and of at most one final
  ``.`` or ``!``, is exactly one option (case-insensitive). Quotes, markup, a second word or a second line
  make a reply unclean: a program reading the reply would have to parse it. Empty replies are unclean.
* ``has_loop(ids, n=3, times=3, window=32)``: some n-gram of token ids occurs ``times`` times (overlaps
  counted) within the reply's first ``window`` tokens.
* ``collapsed(golds, preds)``: a policy whose records have >= 2 distinct gold answers, where every
  prediction is the same answer. Policies with one gold answer are not eligible (None).
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

__all__ = ["first_option", "is_clean", "has_loop", "collapsed", "LEAD_STRIP", "LABEL_CHARS"]

LEAD_STRIP = "\"'`*_"
#: characters that continue a label: an option only matches when the reply does not go on with one of these
LABEL_CHARS = "-_"


def _continues(ch: str) -> bool:
    return ch.isalnum() or ch in LABEL_CHARS


def first_option(reply: str, options: Sequence[str]) -> str | None:
    """The option (as listed) that the stripped reply starts with, longest first, at a label boundary."""
    text = reply.strip().lstrip(LEAD_STRIP).lstrip()
    low = text.casefold()
    for opt in sorted(options, key=lambda o: (-len(o), list(options).index(o))):
        o = opt.strip().casefold()
        if not o or not low.startswith(o):
            continue
        if len(low) > len(o) and _continues(low[len(o)]):
            continue
        return opt
    return None


def is_clean(reply: str, options: Sequence[str]) -> bool:
    """The stripped reply (one trailing '.' or '!' allowed) is exactly one option, case-insensitively."""
    text = reply.strip()
    if text[-1:] in (".", "!"):
        text = text[:-1].rstrip()
    if not text:
        return False
    low = text.casefold()
    return any(low == o.strip().casefold() for o in options)


def has_loop(ids: Sequence[int], n: int = 3, times: int = 3, window: int = 32) -> bool:
    """Does some n-gram of ``ids[:window]`` occur at least ``times`` times (overlapping occurrences count)?"""
    if n < 1 or times < 2:
        raise ValueError(f"n must be >= 1 and times >= 2, got n={n}, times={times}")
    ids = list(ids[:window])
    counts = Counter(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))
    return any(c >= times for c in counts.values())


def collapsed(golds: Sequence[str], preds: Sequence[str]) -> bool | None:
    """True when a policy with >= 2 distinct gold answers gets one prediction for all its records; None when
    it has fewer than 2 gold answers (not eligible)."""
    if len(set(golds)) < 2:
        return None
    return len(set(preds)) == 1
