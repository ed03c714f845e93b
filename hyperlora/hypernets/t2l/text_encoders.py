"""Policy encoders for the hypernetwork's task embedding: MiniLM, or the base model's own hidden states.

All return a vector per policy text (the HyperNetwork's trunk input stays a vector, its head stays linear
in the latent z), but they differ in where the vector comes from:

  minilm     all-MiniLM-L6-v2 sentence embedding (384-d), via `hyperlora.hypernets.t2l.minilm.PolicyEncoder` (frozen)
  base_mean  the base model's hidden states of the policy text after `layer` decoder layers, mean-pooled
             over tokens (d_model), frozen and parameter-free: the policy is represented in the same space
             as the records the adapter will read
  base_attn  the same token-level hidden states, attention-pooled by `n_queries` learned queries and
             concatenated (n_queries * d_model): keeps token-level detail (which topic phrase, which answer
             words), Doc-to-LoRA style. Its weights are trained with the hypernetwork and saved beside it
             (`policy_encoder.safetensors` + `policy_encoder.json`).

Token-level states are computed once per distinct text and cached (frozen base model).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from hyperlora.hypernets.limits import MAX_POLICY_TOKENS, check_policy_tokens
from hyperlora.hypernets.t2l.minilm import PolicyEncoder
from hyperlora.modeling.layer_split import LayerSplit
from hyperlora.modeling.padding import pad_right

ENCODER_CONFIG = "policy_encoder.json"
ENCODER_WEIGHTS = "policy_encoder.safetensors"
KINDS = ("minilm", "base_mean", "base_attn")


class AttnPool(nn.Module):
    """Learned-query attention pooling: token states [T, d] -> [n_queries * d]."""

    def __init__(self, d: int, n_queries: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.queries = nn.Parameter(torch.randn(n_queries, d) / math.sqrt(d))
        self.key = nn.Linear(d, d, bias=False)
        nn.init.eye_(self.key.weight)

    def forward(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """states: one [T_i, d] tensor per text -> [P, n_queries * d]."""
        out = []
        for h in states:
            h = self.norm(h.to(self.queries.dtype))
            att = torch.softmax(self.queries @ self.key(h).T / math.sqrt(h.shape[-1]), dim=-1)  # [Q, T]
            out.append((att @ h).reshape(-1))
        return torch.stack(out)


class PolicyTextEncoder:
    """texts -> task embedding [P, dim]. `module` holds trainable weights (None for frozen kinds)."""

    def __init__(self, kind: str = "minilm", model: nn.Module | None = None, tokenizer: Any = None,
                 layer: int = 15, n_queries: int = 4, max_tokens: int = 96):
        if kind not in KINDS:
            raise ValueError(f"encoder kind must be one of {KINDS}, got {kind!r}")
        if kind != "minilm" and (model is None or tokenizer is None):
            raise ValueError(f"encoder kind {kind!r} reads the base model's hidden states: pass model= and tokenizer=")
        self.kind, self.layer, self.n_queries, self.max_tokens = kind, int(layer), int(n_queries), int(max_tokens)
        self.model, self.tokenizer = model, tokenizer
        self._states: dict[str, torch.Tensor] = {}
        self._minilm = None
        self.module: nn.Module | None = None
        if kind == "minilm":
            self._minilm = PolicyEncoder(cache_size=0)  # our own unbounded cache below: training reuses
            self._vectors: dict[str, torch.Tensor] = {}  # thousands of texts, beyond an LRU's size
            self.dim = int(self._minilm.dim)
        else:
            d = int(model.config.hidden_size)
            n_layers = int(model.config.num_hidden_layers)
            if not 0 < self.layer < n_layers:
                raise ValueError(f"encoder layer must be in [1, {n_layers - 1}], got {layer}")
            self.dim = d if kind == "base_mean" else d * self.n_queries
            if kind == "base_attn":
                self.module = AttnPool(d, self.n_queries)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "layer": self.layer, "n_queries": self.n_queries, "max_tokens": self.max_tokens,
                "dim": self.dim}

    @torch.no_grad()
    def token_states(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Per text: hidden states after `layer` decoder layers, [T, d] float32 (cached by text)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._states]
        if todo:
            split = LayerSplit(self.model, self.layer)
            for s in range(0, len(todo), 32):
                chunk = todo[s:s + 32]
                seqs = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in chunk]
                for t, q in zip(chunk, seqs):  # read whole or refused (max_tokens is the old window, unused)
                    check_policy_tokens(t, len(q), MAX_POLICY_TOKENS)
                ids, last = pad_right(seqs, self.tokenizer.pad_token_id or 0)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    h = split.lower(ids.to(split.embed.weight.device))
                for j, t in enumerate(chunk):
                    self._states[t] = h[j, : int(last[j]) + 1].float().cpu()
        return [self._states[t] for t in texts]

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[P, dim] float32; differentiable w.r.t. `module` for base_attn."""
        texts = list(texts)
        if self.kind == "minilm":
            todo = [t for t in dict.fromkeys(texts) if t not in self._vectors]
            if todo:
                with torch.no_grad():
                    emb = self._minilm.encode(todo).float()
                self._vectors.update(zip(todo, emb))
            return torch.stack([self._vectors[t] for t in texts])
        states = self.token_states(texts)
        if self.module is not None:
            dev = next(self.module.parameters()).device
            states = [h.to(dev) for h in states]
        if self.kind == "base_mean":
            return torch.stack([h.mean(0) for h in states])
        return self.module(states)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / ENCODER_CONFIG).write_text(json.dumps(self.config(), indent=2) + "\n")
        if self.module is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()},
                      str(d / ENCODER_WEIGHTS))


def load_policy_encoder(directory: str | Path, model: nn.Module | None = None, tokenizer: Any = None
                        ) -> PolicyTextEncoder:
    """The encoder a checkpoint was trained with (MiniLM if the directory has no policy_encoder.json)."""
    d = Path(directory)
    if not (d / ENCODER_CONFIG).is_file():
        return PolicyTextEncoder("minilm")
    cfg = json.loads((d / ENCODER_CONFIG).read_text())
    enc = PolicyTextEncoder(cfg["kind"], model, tokenizer, layer=cfg.get("layer", 15),
                            n_queries=cfg.get("n_queries", 4), max_tokens=cfg.get("max_tokens", 96))
    if enc.module is not None:
        from safetensors.torch import load_file

        enc.module.load_state_dict(load_file(str(d / ENCODER_WEIGHTS)))
    return enc
