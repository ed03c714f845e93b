"""Free-text checks from task files: a bounded subset of regular expressions and a bounded matcher.

A task file is untrusted input, and a backtracking regex engine can take exponential time on a
pattern like ``^(a+)+$``. Two layers keep an eval from hanging:

1. On load, ``validate_pattern`` accepts only a subset (documented in docs/POLICY_TASKS.md):
   at most ``MAX_PATTERN_CHARS`` characters, groups nested at most ``MAX_GROUP_DEPTH`` deep, counted
   repeats ``{m,n}`` up to ``MAX_REPEAT_COUNT``, and no quantifier (``* + ? {m,n}``) or alternation
   ``|`` inside a repeated item (``(a+)+``, ``(\\w+\\s?)+``, ``(a|ab)*`` are refused: the shapes of
   catastrophic backtracking). It must compile under Python's ``re`` and the ``regex`` package.
2. When matching, ``check_search`` looks at the first ``MAX_REPLY_CHARS`` characters of a reply and
   stops after ``MATCH_TIMEOUT_S`` seconds, counting a timed-out check as failed (with a warning), so
   what the subset still admits (adjacent overlapping quantifiers, polynomial at worst) cannot stall
   an eval either. In the main thread of a POSIX process (the CLI, the tests) the search is
   ``re.search`` itself, interrupted by a SIGALRM interval timer: exactly the old results. Elsewhere
   (another thread, Windows) it is the ``regex`` package's ``timeout=``, which differs from ``re`` in
   corners (``re``'s ``\\s`` matches ``\\x1c``-``\\x1f``, ``regex``'s does not).
"""
from __future__ import annotations

import functools
import logging
import re
import signal
import threading
import warnings
from typing import Any

import regex

try:  # Python >= 3.11
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["MAX_PATTERN_CHARS", "MAX_GROUP_DEPTH", "MAX_REPEAT_COUNT", "MAX_REPLY_CHARS", "MATCH_TIMEOUT_S",
           "validate_pattern", "check_search"]

log = logging.getLogger(__name__)

MAX_PATTERN_CHARS = 500
MAX_GROUP_DEPTH = 16
MAX_REPEAT_COUNT = 1000
MAX_REPLY_CHARS = 4096
MATCH_TIMEOUT_S = 0.25

_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT} | ({_sre.POSSESSIVE_REPEAT} if hasattr(_sre, "POSSESSIVE_REPEAT")
                                                  else set())
_MAXREPEAT = _sre.MAXREPEAT


def _group_depth(pattern: str) -> int:
    """The deepest nesting of '(' outside character classes (a cheap scan done before the real parser,
    which recurses once per level)."""
    depth = best = 0
    i, n, in_class = 0, len(pattern), False
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            if ch == "]":
                in_class = False
        elif ch == "[":
            in_class = True
            # a ']' right after '[' or '[^' is a literal
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            i = j
            continue
        elif ch == "(":
            depth += 1
            best = max(best, depth)
        elif ch == ")":
            depth = max(0, depth - 1)
        i += 1
    return best


def _children(op: Any, av: Any) -> list[Any]:
    """The sub-patterns directly under one parsed item."""
    if op in _REPEATS:
        return [av[2]]
    if op == _sre.SUBPATTERN:
        return [av[-1]]
    if op == _sre.BRANCH:
        return list(av[1])
    if op in (_sre.ASSERT, _sre.ASSERT_NOT):
        return [av[1]]
    if hasattr(_sre, "ATOMIC_GROUP") and op == _sre.ATOMIC_GROUP:
        return [av]
    if op == _sre.GROUPREF_EXISTS:
        return [x for x in av[1:] if x is not None]
    return []


def _variable(sub: Any) -> str | None:
    """The first quantifier or alternation anywhere inside ``sub`` (its kind), else None."""
    for op, av in sub:
        if op in _REPEATS and av[0] != av[1]:
            return "a quantifier"
        if op == _sre.BRANCH or op == _sre.GROUPREF_EXISTS:
            return "an alternation"
        for child in _children(op, av):
            found = _variable(child)
            if found:
                return found
    return None


def _walk(sub: Any) -> str | None:
    """The first reason the parsed pattern is outside the accepted subset, else None."""
    for op, av in sub:
        if op in _REPEATS:
            lo, hi, body = av
            for count in (lo, hi):
                if count != _MAXREPEAT and count > MAX_REPEAT_COUNT:
                    return f"a counted repeat of {count} (at most {MAX_REPEAT_COUNT})"
            if hi == _MAXREPEAT or hi > 1:
                inner = _variable(body)
                if inner:
                    return (f"{inner} inside a repeated group, e.g. (a+)+ or (a|ab)*, which can take exponential "
                            "time (repeat a single character class instead, e.g. [\\w\\s]+)")
        for child in _children(op, av):
            found = _walk(child)
            if found:
                return found
    return None


@functools.lru_cache(maxsize=4096)
def _problem(pattern: str) -> str | None:
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"is {len(pattern)} characters long (at most {MAX_PATTERN_CHARS})"
    depth = _group_depth(pattern)
    if depth > MAX_GROUP_DEPTH:
        return f"nests groups {depth} deep (at most {MAX_GROUP_DEPTH})"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            parsed = _sre_parse.parse(pattern)  # uncached (unlike re.compile), so its warnings always show
            re.compile(pattern)
    except re.error as e:
        return f"is not a valid regular expression: {e}"
    except (OverflowError, RecursionError, ValueError, MemoryError) as e:
        return f"is not a valid regular expression: {e.__class__.__name__}: {e}"
    if caught:  # e.g. "Possible nested set": syntax whose meaning differs between engines and versions
        return f"uses ambiguous syntax ({caught[0].message})"
    reason = _walk(parsed)
    if reason:
        return f"has {reason}"
    try:
        regex.compile(pattern)
    except (regex.error, OverflowError, RecursionError, ValueError, MemoryError) as e:
        return f"is not supported by the bounded matcher: {e}"
    return None


def validate_pattern(pattern: str) -> None:
    """Raise ``ValueError`` (message starts with what is wrong, without the pattern) if ``pattern`` is
    outside the accepted regex subset; return None if it is fine. Cached per pattern."""
    problem = _problem(pattern)
    if problem:
        raise ValueError(problem)


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> Any:
    return regex.compile(pattern)


class _Alarm(Exception):
    """Raised by the SIGALRM handler inside a timed re.search."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Alarm()


def _can_use_alarm() -> bool:
    """SIGALRM timing is possible: POSIX, main thread, and no interval timer already running."""
    return (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
            and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0))


def _timed_re_search(pattern: str, text: str) -> bool:
    """re.search under a MATCH_TIMEOUT_S SIGALRM timer (re's C loop checks signals); raises TimeoutError."""
    old = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, MATCH_TIMEOUT_S)
        try:
            return re.search(pattern, text) is not None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0.0)
    except _Alarm:
        raise TimeoutError from None
    finally:
        signal.signal(signal.SIGALRM, old)


def check_search(pattern: str, text: str) -> bool:
    """Does ``pattern`` occur in ``text`` (``re.search``'s answer), bounded in time and reply length?

    Looks at the first ``MAX_REPLY_CHARS`` characters; a search that runs past ``MATCH_TIMEOUT_S`` counts
    as no match (a warning names the pattern). Main thread on POSIX: ``re.search`` under a SIGALRM timer
    (exact ``re`` semantics); otherwise the ``regex`` package with ``timeout=``.
    """
    text = text[:MAX_REPLY_CHARS]
    try:
        if _can_use_alarm():
            return _timed_re_search(pattern, text)
        return _compiled(pattern).search(text, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        log.warning("free-text check %r took over %.2f s on a %d-character reply: counted as failed",
                    pattern[:80], MATCH_TIMEOUT_S, len(text))
        return False
