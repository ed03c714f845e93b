"""How long a policy text may be, and the named error above that: a policy is read whole or refused, never cut.

The policy reader and the base-model policy encoder read every token of a policy up to ``MAX_POLICY_TOKENS``
(a page of rules). Reading cost grows with length (one base-model forward over the policy; about linear up to
this bound on a CPU), so the bound is a documented limit, not a silent window.
"""
from __future__ import annotations

from typing import Any

__all__ = ["MAX_POLICY_TOKENS", "PolicyTooLongError", "check_policy_tokens", "token_count"]

MAX_POLICY_TOKENS = 1024


class PolicyTooLongError(ValueError):
    """A policy text has more tokens than the reader reads; the message gives both counts and the text's start."""


def check_policy_tokens(text: str, n_tokens: int, limit: int = MAX_POLICY_TOKENS) -> None:
    """Raise ``PolicyTooLongError`` if ``text`` (``n_tokens`` tokens of the base model's tokenizer) exceeds ``limit``."""
    if n_tokens > limit:
        head = text[:60].replace("\n", " ")
        raise PolicyTooLongError(f"policy text has {n_tokens} tokens, more than the {limit} this hypernetwork reads "
                                 f"(policy starting {head!r}...): split it into several policies or shorten it; "
                                 f"text past a window is never silently ignored")


def token_count(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` alone (no template, no special tokens)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
