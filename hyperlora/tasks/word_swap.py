"""Training-only answer words, and a task rewrite that swaps a policy's answer words for them.

Why: the generator has 54 answer words for training (36 verdicts, 18 queue names), and the reader copies the
answer word's token embeddings from the policy. With so few words it learns them, not the copy: held-out policies
with unseen answer words are at chance for routing and ~51% for topic and conjunction rules (docs/EXPERIMENTS.md
10). Swapping the words of some training policies for words from this list shows it many more words.

No word here is a generator word (any split, held-out ones included), a format word, or a word of a topic's
phrases or records, and none starts with the first token of a held-out answer word ('green' would prime
'greenlight'): training on them leaks nothing about the held-out splits (tests/test_word_swap.py).
"""
from __future__ import annotations

import random
import re
from dataclasses import replace

from .format import Example, PolicyTask

# Verdicts, actions and desk/queue names an enterprise policy might use; single and multi-token alike.
TRAIN_ONLY_WORDS: tuple[str, ...] = (
    "defer", "forward", "assign", "suspend", "freeze", "lock", "confirm", "deny", "refuse", "permit", "grant",
    "revoke", "retain", "discard", "drop", "park", "bounce", "reroute", "monitor", "track", "watch", "probe",
    "examine", "query", "dispute", "uphold", "endorse", "sanction", "ban", "restrict", "limit",
    "prioritize", "expedite", "rush", "postpone", "resume", "retry", "redo", "undo", "log",
    "shelve", "stamp", "seal", "certify", "validate", "authorize", "ratify",
    "penalize", "mute", "silence", "ping", "nudge", "remind", "prompt", "handoff", "redflag",
    "hotlist", "watchlist", "backlog", "sideline", "bench", "shortlist", "vet", "filter", "sift",
    "flagged", "cleared", "parked", "yes", "maybe", "ok", "go", "wait", "amber",
    "low", "medium", "high", "critical", "minor", "major", "tier1", "tier2", "normal", "urgentdesk",
    "helpline", "frontline", "backoffice", "intake", "escrow", "ledger", "cashier",
    "payroll", "procurement", "purchasing", "research", "quality", "risk", "governance",
    "infra", "devops", "platform", "mobile", "hardware", "outreach", "community", "events",
    "docs", "editorial", "media", "investors", "controller", "reception", "lobby", "registry",
    "underwriting", "collections", "disputes", "recovery", "growth", "strategy", "operations",
    "facilities", "hr", "corporate", "enterprise", "smb", "wholesale", "retail", "customs",
    "depot", "hub", "annex", "harbor", "beacon", "anchor", "compass", "falcon", "orchid",
    "cobalt", "maple", "cedar", "granite", "nimbus", "zephyr", "atlas", "delta", "sigma", "omega",
)


def _quoted(word: str) -> re.Pattern[str]:
    return re.compile(r"'" + re.escape(word) + r"'")


def swap_answer_words(task: PolicyTask, rng: random.Random, pool: tuple[str, ...] = TRAIN_ONLY_WORDS
                      ) -> PolicyTask | None:
    """The task with each answer word replaced by a distinct word from ``pool`` (policy, paraphrases, options and
    answers), or None where that cannot be done faithfully: a free-text task, or an answer word that some text
    of the policy (policy or paraphrase) does not mention in single quotes ('word'), the only form rewritten."""
    if task.is_free_text or not task.examples:
        return None
    words = sorted({o for e in task.examples for o in (e.options or ())})
    texts = task.texts()
    if any(not _quoted(w).search(t) for w in words for t in texts):
        return None
    choices = [w for w in pool if w not in words]
    new = dict(zip(words, rng.sample(choices, len(words))))

    def rewrite(text: str) -> str:
        return re.sub(r"'(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")'",
                      lambda m: f"'{new[m.group(1)]}'", text)

    exs = [Example(input=e.input, options=sorted(new[o] for o in e.options or ()), answer=new[e.answer],
                   check=e.check) for e in task.examples]
    return replace(task, policy=rewrite(task.policy), paraphrases=[rewrite(p) for p in task.paraphrases],
                   examples=exs, id=f"{task.id}-swap" if task.id else None)
