"""Fast training path: run the frozen lower layers once, cache their output, train through the upper ones.

Adapters only target the last ``n_upper`` decoder layers, so a record's hidden state entering layer
``start = num_layers - n_upper`` never depends on the adapter. `LayerSplit` computes it once per record
(no grad, cached), and a training step then runs only layers ``start..`` (with per-row LoRA hooks), the final
norm, and the tied output embedding restricted to the options' first tokens at the answer position. On a
2-core CPU this is several times faster than a full forward + full-vocabulary loss.

Right padding is used: with a causal mask the real positions never see the pad tokens that follow them,
so no padding mask is needed and position ids are 0..T-1 for every row.
Works for Llama-family transformers models (``model.model.layers``, ``model.model.norm``, ``rotary_emb``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from hyperlora.modeling.padding import pad_right


def decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, nn.Module, nn.Module]:
    """(embed_tokens, layers, final norm, rotary_emb, lm_head) of a Llama-family causal LM, or a clear error."""
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
        raise TypeError(f"the fast layer-split path needs a Llama-family model (model.model.{{{', '.join(needed)}}} "
                        f"and lm_head); got {type(model).__name__}. Use the full-forward path instead.")
    return inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb, model.lm_head


class LayerSplit:
    """Split a frozen causal LM at decoder layer ``start``: `lower` (cached, no grad) and `upper` (trained through)."""

    def __init__(self, model: nn.Module, start: int):
        self.model = model
        self.embed, self.layers, self.norm, self.rotary, self.lm_head = decoder_parts(model)
        n = len(self.layers)
        if not 0 <= start < n:
            raise ValueError(f"start must be a decoder layer index in [0, {n}), got {start}")
        self.start = start

    def _pos(self, h: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        return pos, self.rotary(h, position_ids=pos)

    @torch.no_grad()
    def lower(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [N, T] (right padded) -> hidden state entering layer `start`, [N, T, d]."""
        h = self.embed(input_ids)
        pos, pe = self._pos(h)
        for layer in self.layers[: self.start]:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        return h

    def upper(self, h: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """h [N, T, d] entering layer `start`; last [N] index of each row's answer position.

        Returns the final-normed hidden state at the answer position, [N, d].
        """
        pos, pe = self._pos(h)
        for layer in self.layers[self.start:-1]:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        return self.norm(self._last_layer_at(h, last, pe))

    def _last_layer_at(self, h: torch.Tensor, last: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The final decoder layer evaluated only where it matters: keys/values of every position, the query,
        attention, o_proj and MLP of the answer position only (exactly the full layer's output there)."""
        layer = self.layers[-1]
        attn = layer.self_attn
        N, T, _ = h.shape
        rows = torch.arange(N, device=h.device)
        x = layer.input_layernorm(h)
        x_last = x[rows, last].unsqueeze(1)  # [N, 1, d]
        hd = attn.head_dim
        q = attn.q_proj(x_last).view(N, 1, -1, hd).transpose(1, 2)  # [N, H, 1, hd]
        k = attn.k_proj(x).view(N, T, -1, hd).transpose(1, 2)  # [N, KV, T, hd]
        v = attn.v_proj(x).view(N, T, -1, hd).transpose(1, 2)
        cos, sin = pe
        cos_l, sin_l = cos[:, last].transpose(0, 1), sin[:, last].transpose(0, 1)  # [N, 1, hd]
        q = q * cos_l.unsqueeze(1) + _rotate_half(q) * sin_l.unsqueeze(1)
        k = k * cos.unsqueeze(1) + _rotate_half(k) * sin.unsqueeze(1)
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) * attn.scaling  # [N, H, 1, T]
        mask = torch.arange(T, device=h.device)[None, :] > last[:, None]  # keys after the answer position
        scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
        o = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v  # [N, H, 1, hd]
        o = attn.o_proj(o.transpose(1, 2).reshape(N, 1, -1))
        r = h[rows, last].unsqueeze(1) + o
        r = r + layer.mlp(layer.post_attention_layernorm(r))
        return r[:, 0]


    def option_logits(self, h_last: torch.Tensor, option_ids: torch.Tensor) -> torch.Tensor:
        """h_last [N, d]; option_ids [N, K] first-token id of each option (-1 = padding option) -> [N, K]
        logits (padding options get -inf)."""
        w = self.lm_head.weight  # [V, d]
        ids = option_ids.clamp(min=0)
        logits = torch.einsum("nd,nkd->nk", h_last, w[ids].to(h_last.dtype))
        bias = getattr(self.lm_head, "bias", None)
        if bias is not None:
            logits = logits + bias[ids].to(logits.dtype)
        return logits.masked_fill(option_ids < 0, float("-inf"))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


@torch.no_grad()
def cache_lower(split: LayerSplit, record_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 32,
                dtype: torch.dtype = torch.bfloat16, autocast: bool = True, progress: bool = False) -> list[torch.Tensor]:
    """Hidden states entering layer `split.start` for every record: a list of [T_i, d] tensors (stored in `dtype`).

    Records are processed in length-sorted batches (little padding); with right padding and a causal mask,
    each record's states are exactly those of an unpadded forward.
    """
    prefix = _common_prefix(record_ids)
    if prefix >= 8 and split.start > 0:
        return _cache_lower_with_prefix(split, record_ids, pad_id, prefix, batch_size, dtype, autocast, progress)
    order = sorted(range(len(record_ids)), key=lambda i: len(record_ids[i]))
    out: list[torch.Tensor | None] = [None] * len(record_ids)
    dev = split.embed.weight.device
    it = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"caching layer-{split.start} states", unit="batch")
    for s in it:
        idx = order[s:s + batch_size]
        ids, last = pad_right([record_ids[i] for i in idx], pad_id)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            h = split.lower(ids.to(dev))
        for j, i in enumerate(idx):
            out[i] = h[j, : int(last[j]) + 1].to(dtype).cpu()
    return out  # type: ignore[return-value]


def stack_cached(cached: Sequence[torch.Tensor], idx: Sequence[int], dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Gather cached records -> (h [N, T_max, d] right padded with zeros, last [N])."""
    T = max(cached[i].shape[0] for i in idx)
    d = cached[idx[0]].shape[1]
    h = torch.zeros(len(idx), T, d, dtype=dtype)
    for j, i in enumerate(idx):
        h[j, : cached[i].shape[0]] = cached[i].to(dtype)
    last = torch.as_tensor([cached[i].shape[0] - 1 for i in idx], dtype=torch.long)
    return h.to(device), last.to(device)


@torch.no_grad()
def continue_states(split: LayerSplit, states: Sequence[torch.Tensor], from_layer: int, batch_size: int = 32,
                    autocast: bool = True) -> list[torch.Tensor]:
    """States entering layer `from_layer` (list of [T_i, d]) -> states entering layer `split.start`."""
    if from_layer > split.start:
        raise ValueError(f"cannot go from layer {from_layer} back to layer {split.start}")
    order = sorted(range(len(states)), key=lambda i: states[i].shape[0])
    out: list[torch.Tensor | None] = [None] * len(states)
    dev = split.embed.weight.device
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        h, last = stack_cached(states, idx, torch.float32, dev)
        pos, pe = split._pos(h)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            for layer in split.layers[from_layer:split.start]:
                h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        for j, i in enumerate(idx):
            out[i] = h[j, : int(last[j]) + 1].to(states[i].dtype).cpu()
    return out  # type: ignore[return-value]


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix shared by all sequences, leaving at least one token of each."""
    if len(seqs) < 2:
        return 0
    n = min(len(x) for x in seqs) - 1
    first = seqs[0]
    p = 0
    while p < n and all(x[p] == first[p] for x in seqs):
        p += 1
    return p


@torch.no_grad()
def _cache_lower_with_prefix(split: LayerSplit, record_ids: Sequence[Sequence[int]], pad_id: int, prefix: int,
                             batch_size: int, dtype: torch.dtype, autocast: bool, progress: bool) -> list[torch.Tensor]:
    """cache_lower for prompts sharing a prefix (the chat template's system turn): the prefix runs once and
    its key/value cache is reused, so each record costs only its own tokens (about half of a prompt)."""
    import copy
    import warnings

    inner = split.model.model
    dev = split.embed.weight.device
    first = torch.as_tensor([list(record_ids[0][:prefix])], device=dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            pre = inner(input_ids=first, use_cache=True, output_hidden_states=True)
        pre_states = pre.hidden_states[split.start][0]  # [P, d]
        order = sorted(range(len(record_ids)), key=lambda i: len(record_ids[i]))
        out: list[torch.Tensor | None] = [None] * len(record_ids)
        it = range(0, len(order), batch_size)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc=f"caching layer-{split.start} states (shared prefix {prefix} tokens)", unit="batch")
        for s in it:
            idx = order[s:s + batch_size]
            ids, last = pad_right([record_ids[i][prefix:] for i in idx], pad_id)
            cache = copy.deepcopy(pre.past_key_values)
            cache.batch_repeat_interleave(len(idx))
            T = ids.shape[1]
            pos = torch.arange(prefix, prefix + T, device=dev)[None].expand(len(idx), -1)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                o = inner(input_ids=ids.to(dev), past_key_values=cache, use_cache=True, output_hidden_states=True,
                          position_ids=pos)
            h = o.hidden_states[split.start]
            for j, i in enumerate(idx):
                out[i] = torch.cat([pre_states, h[j, : int(last[j]) + 1]]).to(dtype).cpu()
    return out  # type: ignore[return-value]
