"""Option scoring: the summed log-likelihood of each answer option after a prompt, batched, with a per-row
adapter chosen by the caller.

Each option is scored by the summed log-probability of ``option + end-of-turn`` after the prompt
(``hyperlora.modeling.prompts``); the prediction is the best-scoring option. The end-of-turn marker makes
"flag" and "flagged" different answers. Options are never shown in the prompt, so their listed order cannot
leak the answer.

Which adapter a row gets is the caller's: every request carries ``row`` (an integer only ``batch_context``
reads, -1 = none by convention) and each forward runs inside ``batch_context(rows of that forward)``. The
decision API passes a runtime's ``policies()`` context (pool slots, one forward for many policies); evaluation
passes ``hyperlora.adapters.functional.apply_lora`` over an ``AdapterSet``. Batches are left padded with
explicit position ids, and only the last positions' logits are computed.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch

from hyperlora.modeling.decoding import bf16_autocast, cache_kwarg, pad_id
from hyperlora.modeling.padding import left_pad
from hyperlora.modeling.prompts import target_text

__all__ = ["ScoreRequest", "option_logprobs", "predict_options", "option_probabilities"]

BatchContext = Callable[[list[int]], ContextManager[Any]]


@dataclass
class ScoreRequest:
    """One prompt with its candidate options; ``row`` selects the adapter (-1 = base model)."""

    prompt: str
    options: Sequence[str]
    row: int = -1


def _ctx(batch_context: BatchContext | None, rows: list[int]) -> ContextManager[Any]:
    return batch_context(rows) if batch_context is not None else contextlib.nullcontext()


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _forward_last_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits [N, keep, V] of the last ``keep`` positions (left padded batch, explicit positions)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, use_cache=False)
    except TypeError:  # models without logits_to_keep
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return out.logits[:, -keep:]


@torch.no_grad()
def option_logprobs(model: Any, tokenizer: Any, requests: Sequence[ScoreRequest], *,
                    batch_context: BatchContext | None = None, batch_size: int = 16, bf16: bool = True,
                    progress: Callable[[int], None] | None = None, share_prompt: bool = True) -> list[list[float]]:
    """Summed log p(option + end-of-turn | prompt) for every option of every request.

    Returns one list per request, aligned with its ``options``. ``batch_context(rows)``: the context each
    forward runs in, given the ``row`` of each of its batch rows in order (None: the model as it is).
    ``share_prompt`` (default): each prompt runs once, its KV cache is repeated for the options, and only the
    option tokens run again (~2-3x cheaper than one full sequence per option; falls back to full sequences if
    the model's cache cannot be repeated); the second forward has one row per (request, option slot).
    ``batch_size`` counts requests (shared prompt) or sequences (full). ``progress(n)`` is called with the
    number of scored sequences (options) after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _device(model)
    prompt_cache: dict[str, list[int]] = {}
    target_cache: dict[str, list[int]] = {}
    enc: list[tuple[list[int], list[list[int]], int]] = []
    for ri, r in enumerate(requests):
        if len(r.options) < 1:
            raise ValueError(f"request {ri} has no options")
        if r.prompt not in prompt_cache:
            prompt_cache[r.prompt] = tokenizer(r.prompt, add_special_tokens=False)["input_ids"]
        opts = []
        for o in r.options:
            if o not in target_cache:
                target_cache[o] = tokenizer(target_text(tokenizer, o), add_special_tokens=False)["input_ids"]
            if not target_cache[o]:
                raise ValueError(f"option {o!r} tokenizes to nothing")
            opts.append(target_cache[o])
        enc.append((prompt_cache[r.prompt], opts, int(r.row)))
    if share_prompt:
        try:
            return _scores_shared(model, enc, pad_id(tokenizer), device, batch_context, batch_size, bf16, progress)
        except _NoCacheRepeat:
            pass
    return _scores_full(model, enc, pad_id(tokenizer), device, batch_context, batch_size, bf16, progress)


class _NoCacheRepeat(Exception):
    pass


def _scores_full(model, enc, pad, device, batch_context, batch_size, bf16, progress) -> list[list[float]]:
    """One left-padded sequence per (request, option); logits only for the last positions."""
    seqs = [(ri, oi, p + t, len(t), row) for ri, (p, opts, row) in enumerate(enc) for oi, t in enumerate(opts)]
    out: list[list[float]] = [[math.nan] * len(e[1]) for e in enc]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][2]))
    for s in range(0, len(order), batch_size):
        chunk = [seqs[i] for i in order[s:s + batch_size]]
        ids, mask = left_pad([c[2] for c in chunk], pad, device)
        keep = max(c[3] for c in chunk) + 1
        with _ctx(batch_context, [c[4] for c in chunk]), bf16_autocast(bf16, device):
            logits = _forward_last_logits(model, ids, mask, keep)
        logp = torch.log_softmax(logits.float(), dim=-1)  # [N, keep, V]
        for j, (ri, oi, seq, L, _) in enumerate(chunk):
            tgt = torch.tensor(seq[-L:], device=logp.device)
            # logits at position p predict token p+1: the L target tokens are predicted by keep-1-L .. keep-2
            out[ri][oi] = float(logp[j, keep - 1 - L: keep - 1].gather(-1, tgt.unsqueeze(-1)).sum())
        if progress is not None:
            progress(len(chunk))
    return out


def _scores_shared(model, enc, pad, device, batch_context, batch_size, bf16, progress) -> list[list[float]]:
    """Prompt once (left padded, KV cache), then all options of each request against the repeated cache."""
    out: list[list[float]] = [[math.nan] * len(e[1]) for e in enc]
    order = sorted(range(len(enc)), key=lambda i: (len(enc[i][1]), len(enc[i][0])))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        B = len(idx)
        K = max(len(enc[i][1]) for i in idx)
        ids, mask = left_pad([enc[i][0] for i in idx], pad, device)
        rows = [enc[i][2] for i in idx]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with _ctx(batch_context, rows), bf16_autocast(bf16, device):
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(res.logits[:, -1].float(), dim=-1)  # [B, V]: predicts each option's 1st token
        L = max(len(t) for i in idx for t in enc[i][1])
        tail = None
        if L > 1:
            cache = getattr(res, "past_key_values", None)
            if cache is None or not hasattr(cache, "batch_repeat_interleave"):
                raise _NoCacheRepeat()
            cache.batch_repeat_interleave(K)
            cont = torch.full((B * K, L - 1), pad, dtype=torch.long)
            for b, i in enumerate(idx):
                opts = enc[i][1]
                for k in range(K):
                    t = opts[k] if k < len(opts) else opts[0]  # filler rows are ignored
                    if len(t) > 1:
                        cont[b * K + k, : len(t) - 1] = torch.tensor(t[:-1])
            cont = cont.to(device)
            # right padding of the continuation is harmless: causal attention never looks ahead
            cmask = torch.cat([mask.repeat_interleave(K, 0), torch.ones_like(cont)], dim=1)
            cpos = mask.sum(-1, keepdim=True).repeat_interleave(K, 0) + torch.arange(L - 1, device=device)
            with _ctx(batch_context, [r for r in rows for _ in range(K)]), bf16_autocast(bf16, device):
                res2 = model(input_ids=cont, attention_mask=cmask, position_ids=cpos, use_cache=True,
                             **{cache_kwarg(model): cache})
            tail = torch.log_softmax(res2.logits.float(), dim=-1)  # [B*K, L-1, V]
        n_done = 0
        for b, i in enumerate(idx):
            for k, t in enumerate(enc[i][1]):
                lp = float(first[b, t[0]])
                if len(t) > 1:
                    tg = torch.tensor(t[1:], device=tail.device)
                    lp += float(tail[b * K + k, : len(t) - 1].gather(-1, tg.unsqueeze(-1)).sum())
                out[i][k] = lp
                n_done += 1
        if progress is not None:
            progress(n_done)
    return out


def predict_options(requests: Sequence[ScoreRequest], scores: Sequence[Sequence[float]]) -> list[str]:
    """The best-scoring option of each request (first listed on an exact tie)."""
    return [r.options[max(range(len(s)), key=lambda i: s[i])] for r, s in zip(requests, scores)]


def option_probabilities(scores: Sequence[float], temperature: float = 1.0) -> list[float]:
    """Softmax of option log-likelihoods divided by ``temperature``: the raw (uncalibrated) option
    probabilities at temperature 1. The log-likelihoods are of whole option sequences, so a longer option is
    penalised by its length; calibration (``hyperlora.decisions.calibration``) is what makes these usable."""
    if not scores:
        raise ValueError("scores is empty: no options to normalise")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = torch.tensor([float(s) for s in scores], dtype=torch.float64) / float(temperature)
    return torch.softmax(t, dim=0).tolist()
