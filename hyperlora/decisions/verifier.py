"""The grounding verifier: an independent second opinion on a decision, from the base model reading the
policy in its context (no adapter), so it shares no weights with the generated adapter that decided.

Two readings, both plain option scoring (``hyperlora.decisions.scoring``):

- ``in_context`` (label rules): the base model with the policy in the system turn scores the same options
  for the same record. Verdict: its best option equals the proposed answer (agreement between two readings
  of the policy: generated adapter vs policy in context); score: its probability of the proposed answer.
- ``judge`` (any rule, free text included): the base model reads the policy, the record and the proposed
  reply and scores "yes" against "no" to "Does the reply follow the policy?". Verdict: p(yes) >= 0.5.

Neither is trained to judge compliance; docs/DECISIONS.md gives what each measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from hyperlora.decisions.scoring import BatchContext, ScoreRequest, option_logprobs, option_probabilities
from hyperlora.modeling.prompts import prompt_text

__all__ = ["VERIFIERS", "Verdict", "in_context_requests", "agreement", "judge_request", "judge_verdict", "verify"]

VERIFIERS = ("in_context", "judge")
JUDGE_OPTIONS = ("yes", "no")
JUDGE_QUESTION = ("Record: {record}\n\nProposed reply: {answer}\n\nDoes the proposed reply follow the policy "
                  "exactly? Answer yes or no.")


@dataclass
class Verdict:
    """ok: the verifier finds the decision compliant; score: its probability of that (0..1); kind: which
    reading; answer: the verifier's own answer (in_context only)."""

    ok: bool
    score: float
    kind: str
    answer: str | None = None


def in_context_requests(tokenizer: Any, records: Sequence[str], policies: Sequence[str],
                        options: Sequence[Sequence[str]]) -> list[ScoreRequest]:
    """The policy in the system turn, the record as the user turn, the same options; base model (row -1)."""
    return [ScoreRequest(prompt_text(tokenizer, r, p, "system"), list(o), -1)
            for r, p, o in zip(records, policies, options)]


def agreement(proposed: str, options: Sequence[str], scores: Sequence[float]) -> Verdict:
    """The in-context verdict on ``proposed`` from the in-context option scores."""
    p = option_probabilities(scores)
    best = max(range(len(p)), key=lambda i: p[i])
    k = list(options).index(proposed)
    return Verdict(best == k, float(p[k]), "in_context", options[best])


def judge_request(tokenizer: Any, record: str, policy: str, answer: str) -> ScoreRequest:
    """The judge's prompt: the policy in the system turn, the record and the proposed reply in the user turn."""
    q = JUDGE_QUESTION.format(record=record, answer=answer)
    return ScoreRequest(prompt_text(tokenizer, q, policy, "system"), list(JUDGE_OPTIONS), -1)


def judge_verdict(scores: Sequence[float]) -> Verdict:
    p_yes = option_probabilities(scores)[0]
    return Verdict(p_yes >= 0.5, float(p_yes), "judge")


def verify(model: Any, tokenizer: Any, records: Sequence[str], policies: Sequence[str], answers: Sequence[str],
           options: Sequence[Sequence[str] | None], *, kind: str = "in_context",
           batch_context: BatchContext | None = None, batch_size: int = 16, bf16: bool = False) -> list[Verdict]:
    """Verdicts on proposed ``answers``; ``kind="in_context"`` needs options (records without fall back to the
    judge). ``batch_context``: the context the base model runs in (a runtime's ``policies([None] * n)``)."""
    if kind not in VERIFIERS:
        raise ValueError(f"kind must be one of {VERIFIERS}, got {kind!r}")
    n = len(records)
    if not (len(policies) == len(answers) == len(options) == n):
        raise ValueError("records, policies, answers and options must have one entry per record")
    ic = [i for i in range(n) if kind == "in_context" and options[i] is not None]
    jd = [i for i in range(n) if i not in set(ic)]
    out: list[Verdict | None] = [None] * n
    if ic:
        reqs = in_context_requests(tokenizer, [records[i] for i in ic], [policies[i] for i in ic],
                                   [options[i] for i in ic])  # type: ignore[misc]
        sc = option_logprobs(model, tokenizer, reqs, batch_context=batch_context, batch_size=batch_size, bf16=bf16)
        for i, s in zip(ic, sc):
            out[i] = agreement(answers[i], options[i], s)  # type: ignore[arg-type]
    if jd:
        reqs = [judge_request(tokenizer, records[i], policies[i], answers[i]) for i in jd]
        sc = option_logprobs(model, tokenizer, reqs, batch_context=batch_context, batch_size=batch_size, bf16=bf16)
        for i, s in zip(jd, sc):
            out[i] = judge_verdict(s)
    return out  # type: ignore[return-value]
