"""Scoring policy tasks: option log-likelihoods (batched), greedy generations, balanced accuracy.

Option choice: ``hyperlora.decisions.scoring`` (the one copy of option scoring, shared with ``decide``): each
option is scored by the summed log-probability of ``option + end-of-turn`` after the prompt; the prediction is
the best-scoring option. Here the adapters come from an ``AdapterSet``.

Free text: a greedy generation passes when the example's regex is found in it.

Per-row adapters: every request carries ``row`` (an index into the adapters, -1 = none), applied with
``hyperlora.adapters.functional.apply_lora``, so one batch mixes policies exactly as serving does.
Batches are left padded with explicit position ids, and only the last positions' logits are computed.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Callable, Iterable, Sequence

import torch

from hyperlora.adapters.adapter_set import AdapterSet
from hyperlora.adapters.functional import apply_lora
from hyperlora.decisions.scoring import ScoreRequest, predict_options
from hyperlora.decisions.scoring import option_logprobs as _option_logprobs
from hyperlora.modeling.decoding import greedy_decode_ids, greedy_decode_texts

__all__ = ["ScoreRequest", "AdapterSet", "option_logprobs", "predict_options", "greedy_generate", "greedy_generate_ids",
           "regex_pass", "balanced_accuracy", "macro_balanced_accuracy"]


def _adapter_ctx(model: Any, adapters: AdapterSet | None, rows: Sequence[int]):
    if adapters is None or not adapters.modules or all(r < 0 for r in rows):
        if adapters is None and any(r >= 0 for r in rows):
            raise ValueError("a request has row >= 0 but no adapters were given")
        return contextlib.nullcontext()
    return apply_lora(model, adapters.modules, scale=adapters.scale, rows=torch.tensor(list(rows), dtype=torch.long))


def option_logprobs(model: Any, tokenizer: Any, requests: Sequence[ScoreRequest], *,
                    adapters: AdapterSet | None = None, batch_size: int = 16, bf16: bool = True,
                    progress: Callable[[int], None] | None = None, share_prompt: bool = True) -> list[list[float]]:
    """Summed log p(option + end-of-turn | prompt) for every option of every request, aligned with its
    ``options``; each request's ``row`` indexes ``adapters`` (-1 = none). ``share_prompt``, ``batch_size`` and
    ``progress`` as in ``hyperlora.decisions.scoring.option_logprobs``, which this calls with ``apply_lora``
    over ``adapters`` as the per-forward context."""
    for ri, r in enumerate(requests):  # the checks in the order the shared scorer made them before
        if len(r.options) < 1:
            raise ValueError(f"request {ri} has no options")
        if r.row >= 0 and adapters is None:
            raise ValueError("a request has row >= 0 but no adapters were given")
    return _option_logprobs(model, tokenizer, requests, batch_context=lambda rows: _adapter_ctx(model, adapters, rows),
                            batch_size=batch_size, bf16=bf16, progress=progress, share_prompt=share_prompt)


def greedy_generate(model: Any, tokenizer: Any, prompts: Sequence[str], rows: Sequence[int] | None = None, *,
                    adapters: AdapterSet | None = None, max_new_tokens: int = 32, batch_size: int = 8,
                    bf16: bool = True, progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of each prompt, with per-row adapters
    (``hyperlora.modeling.decoding.greedy_decode_texts`` inside ``apply_lora`` for each batch's rows)."""
    return greedy_decode_texts(model, tokenizer, prompts, rows,
                               batch_context=lambda batch_rows: _adapter_ctx(model, adapters, batch_rows),
                               max_new_tokens=max_new_tokens, batch_size=batch_size, bf16=bf16, progress=progress)


def greedy_generate_ids(model: Any, tokenizer: Any, prompts: Sequence[str], rows: Sequence[int] | None = None, *,
                        adapters: AdapterSet | None = None, max_new_tokens: int = 32, batch_size: int = 8,
                        bf16: bool = True, eos_token_id: int | Sequence[int] | None = None,
                        progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """``greedy_generate`` as token ids (cut before the first of ``eos_token_id``, default the tokenizer's)."""
    return greedy_decode_ids(model, tokenizer, prompts, rows,
                             batch_context=lambda batch_rows: _adapter_ctx(model, adapters, batch_rows),
                             max_new_tokens=max_new_tokens, batch_size=batch_size, bf16=bf16,
                             eos_token_id=eos_token_id, progress=progress)


def regex_pass(generation: str, regex: str) -> bool:
    """Does the generation satisfy a free-text check (``re.search``)?"""
    return re.search(regex, generation) is not None


def balanced_accuracy(golds: Sequence[str], preds: Sequence[str]) -> float:
    """Mean recall over the gold classes present, in percent (a constant predictor gets 100 / #classes)."""
    if len(golds) != len(preds):
        raise ValueError(f"golds ({len(golds)}) and preds ({len(preds)}) differ in length")
    if not golds:
        return math.nan
    classes = sorted(set(golds))
    rec = []
    for c in classes:
        idx = [i for i, g in enumerate(golds) if g == c]
        rec.append(sum(preds[i] == c for i in idx) / len(idx))
    return 100.0 * sum(rec) / len(rec)


def macro_balanced_accuracy(groups: Iterable[tuple[Sequence[str], Sequence[str]]]) -> float:
    """Mean of per-group (per-policy) balanced accuracies, in percent; NaN if there are no groups.

    Answer words differ between policies, so classes are only meaningful within one policy: each policy's
    balanced accuracy is computed on its own examples, then policies are weighted equally.
    """
    vals = [balanced_accuracy(g, p) for g, p in groups if len(g)]
    return sum(vals) / len(vals) if vals else math.nan
