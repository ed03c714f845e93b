"""THE prompt format, shared by training, evaluation and the demo.

ChatML through the tokenizer's own chat template: the record alone is the user turn, the assistant turn
is the answer followed by the end-of-turn marker. With no policy the template's default system turn (if
any) stays, so the adapter conditions and the baselines see identical prompts. In-context baselines put
the policy in the system turn (``where="system"``) or above the record in the user turn (``"user"``).

A tokenizer without a chat template (e.g. a tiny test tokenizer) gets a plain ChatML rendering.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

__all__ = ["build_messages", "render_messages", "prompt_text", "target_text", "end_of_turn", "PolicyPlacement"]

PolicyPlacement = Literal["system", "user"]
_MARK = "\u2063ANSWER\u2063"


def build_messages(record: str, policy: str | None = None, where: PolicyPlacement = "system",
                   shots: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """Chat messages for one record; the policy (if given) goes into the system or the user turn.

    ``shots``: labelled (record, answer) pairs shown before the record as earlier user / assistant turns (the
    few-shot in-context baseline); with ``where="user"`` the policy is put in the first user turn only."""
    if where not in ("system", "user"):
        raise ValueError(f"where must be 'system' or 'user', got {where!r}")
    turns = [r for rec, ans in shots for r in ({"role": "user", "content": rec}, {"role": "assistant", "content": ans})]
    turns.append({"role": "user", "content": record})
    if policy is None:
        return turns
    if where == "system":
        return [{"role": "system", "content": policy}] + turns
    turns[0] = {"role": "user", "content": f"Policy: {policy}\n\nRecord: {turns[0]['content']}"}
    return turns


def _chatml(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_messages(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Chat messages -> the prompt string: the tokenizer's chat template, or plain ChatML without one (tokenize
    it with ``add_special_tokens=False``). The one rendering of prompts, served chats included."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return _chatml(messages, add_generation_prompt)


def prompt_text(tokenizer: Any, record: str, policy: str | None = None, where: PolicyPlacement = "system",
                shots: Sequence[tuple[str, str]] = ()) -> str:
    """The full prompt string up to (and including) the assistant header; tokenize it without special
    tokens added (``add_special_tokens=False``): the template already holds them. ``shots``: see
    ``build_messages``."""
    return render_messages(tokenizer, build_messages(record, policy, where, shots), add_generation_prompt=True)


_EOT_CACHE: dict[int, str] = {}


def end_of_turn(tokenizer: Any) -> str:
    """The text the template puts right after an assistant answer (``<|im_end|>`` for ChatML)."""
    key = id(tokenizer)
    if key not in _EOT_CACHE:
        msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}]
        full = render_messages(tokenizer, msgs, add_generation_prompt=False)
        tail = full.split(_MARK, 1)[1] if _MARK in full else ""
        eot = tail.rstrip("\n")
        if not eot:
            eot = tokenizer.eos_token or ""
        _EOT_CACHE[key] = eot
    return _EOT_CACHE[key]


def target_text(tokenizer: Any, answer: str) -> str:
    """The assistant continuation that training and option scoring use: answer + end-of-turn marker."""
    return answer + end_of_turn(tokenizer)
