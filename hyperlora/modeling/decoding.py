"""Token decoding for transformers causal LMs (not adapter generation: that is the hypernetworks' job).

* `decode`: a small decoding loop, left padding, KV cache, greedy or sampled, per-row RNG. `Runtime.generate`
  runs it inside a `policies()` context. It is written so that every row of a batch gets exactly the tokens it
  would get when decoded alone: positions come from the row's own attention mask (left padding never shifts
  them), and sampling draws from a generator per row, so a row's random stream does not depend on its
  batch-mates.
* `greedy_decode_texts` (and `greedy_decode_ids`, the token ids it decodes): prompt texts in, greedy reply
  texts out, through transformers' ``generate`` in length-sorted left-padded batches, optionally inside a
  per-batch context (e.g. per-row adapters). The one copy used by serving code (the reply-format compiler's
  background replies) and by evaluation (``hyperlora.evaluation.scoring.greedy_generate`` and
  ``greedy_generate_ids`` wrap them with an ``AdapterSet``).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn

from hyperlora.modeling.padding import left_pad


def _check_left_padded(mask: torch.Tensor) -> None:
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, T], got shape {tuple(mask.shape)}")
    if mask.shape[1] and not bool((mask[:, -1] != 0).all()):
        raise ValueError("attention_mask has padding on the right: generate() needs left padding (with a tokenizer: "
                         "tokenizer.padding_side = 'left'), so that every row's next token follows its last one")
    m = (mask != 0).to(torch.int8)
    # left padding: once a row's mask turns 1 it stays 1
    if mask.shape[1] > 1 and bool((m[:, 1:] < m[:, :-1]).any()):
        raise ValueError("attention_mask has holes (a 0 after a 1): only left padding is supported")


def _eos_set(model: nn.Module, eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(e) for e in eos_token_id]


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """[B, V] float logits -> logits with temperature applied and tokens outside top-k / top-p set to -inf."""
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _generators(seed: int | Sequence[int] | None, rows: int, device: torch.device) -> list[torch.Generator]:
    if seed is None:
        seeds = [int(torch.randint(0, 2**62, ()).item()) for _ in range(rows)]
    elif isinstance(seed, int):
        seeds = [seed] * rows
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != rows:
            raise ValueError(f"seed must be one int or one per row ({rows}), got {len(seeds)} values")
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(s)
        gens.append(g)
    return gens


def cache_kwarg(model: nn.Module) -> str:
    """The forward's KV-cache argument: `cache` (transformers >= 5.2x) or `past_key_values` (older)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_of(out) -> object:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@torch.no_grad()
def decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
           max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int | Sequence[int] | None = None,
           eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> torch.Tensor:
    """input_ids [B, T] (left padded) -> [B, T + n] with n <= max_new_tokens new tokens (stops when every row
    has produced an EOS; finished rows are filled with `pad_token_id`, default the first EOS id or 0)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and not (temperature > 0):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if top_p is not None and not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    B, T = input_ids.shape
    device = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    _check_left_padded(mask)
    if max_new_tokens == 0 or B == 0:
        return input_ids.clone()
    eos = _eos_set(model, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    eos_t = torch.tensor(eos, dtype=input_ids.dtype, device=device)
    gens = _generators(seed, B, device) if do_sample else None

    mask = mask.to(torch.long)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_kw = cache_kwarg(model)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
    past = cache_of(out)
    last_pos = position_ids[:, -1:]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()
        if do_sample:
            probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
            tok = torch.cat([torch.multinomial(probs[i], 1, generator=gens[i]) for i in range(B)])
        else:
            tok = logits.argmax(dim=-1)
        tok = tok.to(input_ids.dtype)
        new_tokens.append(torch.where(finished, torch.full_like(tok, pad), tok))
        if eos:
            finished = finished | torch.isin(tok, eos_t)
            if bool(finished.all()):
                break
        if step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last_pos = last_pos + 1
        # finished rows keep feeding their own (valid) token; their outputs are replaced by pad anyway
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=last_pos, use_cache=True,
                    **{cache_kw: past})
        past = cache_of(out)
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad token id, else its end-of-sequence id, else 0."""
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    return int(pid or 0)


def bf16_autocast(enabled: bool, device: torch.device) -> ContextManager[Any]:
    """bfloat16 autocast on `device` when `enabled`, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def greedy_decode_ids(model: nn.Module, tokenizer: Any, prompts: Sequence[str],
                      rows: Sequence[int] | None = None, *,
                      batch_context: Callable[[list[int]], ContextManager[Any]] | None = None,
                      max_new_tokens: int = 32, batch_size: int = 8, bf16: bool = True,
                      eos_token_id: int | Sequence[int] | None = None,
                      progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """The new token ids of each prompt's greedy continuation, cut before the first end token.

    Prompts are tokenized without special tokens, sorted by length and decoded ``batch_size`` at a time with
    left padding. ``rows`` (default all -1) is one integer per prompt that only ``batch_context`` reads: each
    batch runs inside ``batch_context(rows of the batch)`` (e.g. per-row adapters); None runs the base model.
    ``eos_token_id``: the id(s) that end a reply (default the tokenizer's ``eos_token_id``); generation stops
    at the first of them and the returned ids exclude it."""
    rows = list(rows) if rows is not None else [-1] * len(prompts)
    if len(rows) != len(prompts):
        raise ValueError(f"rows has {len(rows)} entries for {len(prompts)} prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    stop = set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(e) for e in eos})
    if isinstance(eos, (list, tuple)):
        eos = list(eos)
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(enc[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = left_pad([enc[i] for i in idx], pad, device)
        ctx = batch_context([rows[i] for i in idx]) if batch_context is not None else contextlib.nullcontext()
        with ctx, bf16_autocast(bf16, device):
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=eos)
        new = gen[:, ids.shape[1]:]
        for j, i in enumerate(idx):
            toks = new[j].tolist()
            cut = next((k for k, t in enumerate(toks) if t in stop), len(toks))
            out[i] = toks[:cut]
        if progress is not None:
            progress(len(idx))
    return out


@torch.no_grad()
def greedy_decode_texts(model: nn.Module, tokenizer: Any, prompts: Sequence[str],
                        rows: Sequence[int] | None = None, *,
                        batch_context: Callable[[list[int]], ContextManager[Any]] | None = None,
                        max_new_tokens: int = 32, batch_size: int = 8, bf16: bool = True,
                        progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of each prompt text (``greedy_decode_ids``,
    stopping at the tokenizer's ``eos_token_id``)."""
    ids = greedy_decode_ids(model, tokenizer, prompts, rows, batch_context=batch_context,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, bf16=bf16, progress=progress)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in ids]
