"""Reply-prefix rules ("Start every reply with 'Noted:'", "Put the tag [Ops] at the very start"): read which
prefix a policy demands, and compile that prefix into a last-layer adapter that makes replies start with it.

Why a separate path: the policy reader (``hyperlora/reader.py``) raises the logit of an answer word at the
answer position. A format rule needs 2-6 exact tokens in order (``[``, ``Help``, ``desk``, ``]``), each at its own
position, and a copied embedding also raises its neighbours (docs/EXPERIMENTS.md 7b). So:

* ``ReplyPrefixHead`` (learned, tiny): from the base model's reading of the policy (the reader's gate-layer
  states), a classifier picks a *template* (or "no prefix rule") and a pointer picks the policy *word* that fills
  it. Templates are learned from training tasks' reference replies (``derive_template``: ``"[Ops] Thanks..."``
  gives ``"[{w}]"``), so words never seen in training are copied, not memorized.
* ``PrefixCompiler`` (no training): the prefix's tokens t_1..t_K become K rank-1 slots on the last decoder
  layer's ``down_proj``. Slot k's key is a ridge read-out that is ~1 on the base model's own state just before
  t_k (states of a few built-in records followed by the prefix) and ~0 on ordinary reply text; its value is the
  least-squares direction that raises t_k's logit above every other token's (tied embeddings behind the final
  RMSNorm), scaled until t_k wins by a margin on the key records. The adapted layer is the last one, so its
  output changes no state the keys read: once t_1..t_{k-1} are out, slot k sees exactly the state it was built on.

Limits (measured, docs/EXPERIMENTS.md 8): only rules about how a reply *starts*; a sign-off rule has no common
reply prefix, so it gets no template and no adapter; a template kind never seen in training cannot be named.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

HEAD_FILE = "reply_prefix.safetensors"
HEAD_CONFIG = "reply_prefix.json"
SLOT = "{w}"
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9]*")


def policy_words(text: str) -> list[tuple[str, int, int]]:
    """Candidate fill words of a policy: (word, start, end) for each alphanumeric run starting with a letter."""
    return [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(text)]


def derive_template(policy: str, answers: Sequence[str]) -> tuple[str, str] | None:
    """The reply-prefix template a free-text task's reference replies share, with the policy word that fills it
    replaced by ``{w}``: replies "Noted: Thanks ..." / "Noted: We ..." under a policy naming 'Noted' give
    ``("{w}:", "Noted")``. The prefix ends after the word and the punctuation glued to it. None if the replies
    share no prefix starting with (at most 8 characters before) a word of the policy (e.g. a sign-off rule)."""
    if len(answers) < 2:
        return None
    common = os.path.commonprefix([a.lstrip() for a in answers])
    best = None
    for word, _, _ in policy_words(policy):
        m = re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", common)
        if m and (best is None or (m.start(), -len(word)) < (best.start(), -len(best.group(0)))):
            best = m
    if best is None or best.start() > 8:
        return None
    end = best.end()
    while end < len(common) and not common[end].isspace() and not common[end].isalnum():
        end += 1
    return common[: best.start()] + SLOT + common[best.end(): end], best.group(0)


def token_spans(tokenizer: Any, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character span of each token in ``tokenizer.decode(ids)`` (by incremental decoding)."""
    spans, prev = [], 0
    for i in range(len(ids)):
        n = len(tokenizer.decode(list(ids[: i + 1])))
        spans.append((prev, max(prev, n)))
        prev = max(prev, n)
    return spans


def word_features(h: torch.Tensor, spans: Sequence[tuple[int, int]], words: Sequence[tuple[str, int, int]]
                  ) -> torch.Tensor:
    """[W, d]: per word, the mean state of the tokens overlapping its characters."""
    out = torch.zeros(len(words), h.shape[-1])
    for w, (_, s, e) in enumerate(words):
        idx = [i for i, (a, b) in enumerate(spans) if a < e and b > s]
        out[w] = h[idx].mean(0) if idx else 0.0
    return out


class ReplyPrefixHead(nn.Module):
    """Policy states -> (template logits [1 + n_templates], word logits [W]). Class 0 means "no prefix rule"."""

    def __init__(self, hidden_size: int, templates: Sequence[str]):
        super().__init__()
        if any(SLOT not in t for t in templates):
            raise ValueError(f"every template must contain {SLOT!r}: {list(templates)}")
        self.templates = list(templates)
        self.norm = nn.LayerNorm(hidden_size)
        self.cls = nn.Linear(hidden_size, 1 + len(self.templates))
        self.ptr = nn.Linear(2 * hidden_size, 1)

    def forward(self, h: torch.Tensor, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, d] policy token states; words [W, d] word features (``word_features``)."""
        hn = self.norm(h)
        pooled = hn.mean(0)
        wn = self.norm(words) if len(words) else words.new_zeros(0, h.shape[-1])
        word_logits = self.ptr(torch.cat([wn, pooled.expand(len(wn), -1)], -1)).squeeze(-1)
        return self.cls(pooled), word_logits

    @torch.no_grad()
    def predict(self, text: str, h: torch.Tensor, spans: Sequence[tuple[int, int]]) -> str | None:
        """The prefix this policy demands ("Noted:"), or None when it is not a reply-prefix rule."""
        words = policy_words(text)
        cls_logits, word_logits = self(h, word_features(h, spans, words))
        c = int(cls_logits.argmax())
        if c == 0 or not words:
            return None
        return self.templates[c - 1].replace(SLOT, words[int(word_logits.argmax())][0])

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / HEAD_CONFIG).write_text(json.dumps({"templates": self.templates, "hidden_size": self.norm.normalized_shape[0],
                                                 **(extra or {})}, indent=2) + "\n")
        save_file({k: v.detach().cpu().float().contiguous() for k, v in self.state_dict().items()}, str(d / HEAD_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> "ReplyPrefixHead | None":
        """The head saved in a reader directory, or None if it has none."""
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / HEAD_FILE).is_file():
            return None
        cfg = json.loads((d / HEAD_CONFIG).read_text())
        head = cls(int(cfg["hidden_size"]), cfg["templates"])
        head.load_state_dict(load_file(str(d / HEAD_FILE)))
        return head.eval()


def _builtin_records(n: int, seed: int) -> list[str]:
    """Records of every choice family from the built-in generator (offline, deterministic)."""
    from hyperlora.tasks.generator import generate_tasks

    per = max(1, n // 4)
    recs: list[str] = []
    for fam in ("topic", "routing", "conjunction", "threshold"):
        tasks = generate_tasks(fam, "train", per, seed=seed, examples_per_task=2, strict=False)
        recs += [t.examples[0].input for t in tasks][:per]
    return recs[:n]


class PrefixCompiler:
    """Prefix string -> rank-K LoRA factors (A [K, d_in], B [d_out, K]) on the last layer's ``down_proj`` that
    make greedy replies start with the prefix. The background statistics (the base model's states over its own
    replies to built-in records) are computed once, on first use (~10-20 s on one CPU thread)."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, n_background: int = 32, n_keys: int = 8,
                 ridge: float = 1.0, key_weight: float = 20.0, init_scale: float = 40.0, margin: float = 4.0,
                 max_tokens: int = 16, seed: int = 7):
        from hyperlora.reader import module_name

        self.model, self.tokenizer = model, tokenizer
        self.layer = int(model.config.num_hidden_layers) - 1
        self.name = module_name(model, self.layer, "down_proj")
        self.ridge, self.key_weight, self.init_scale, self.margin = ridge, key_weight, init_scale, margin
        self.max_tokens, self.n_background, self.n_keys, self.seed = max_tokens, n_background, n_keys, seed
        self._stats: dict[str, Any] | None = None
        self.margins: torch.Tensor | None = None  # per-token logit margins on the key records, last compile
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def settings(self) -> str:
        return (f"{self.n_background}|{self.n_keys}|{self.ridge}|{self.key_weight}|{self.init_scale}|"
                f"{self.margin}|{self.max_tokens}|{self.seed}")

    def _enc(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _batch(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids [N, T] (causal attention keeps every real position exact) and their lengths."""
        n = torch.tensor([len(s) for s in seqs])
        ids = torch.full((len(seqs), int(n.max())), int(self.tokenizer.pad_token_id or 0), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(list(s))
        return ids, n

    @torch.no_grad()
    def _states(self, seqs: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """down_proj inputs of the last layer at every position, per sequence (no adapter)."""
        mod = dict(self.model.named_modules())[self.name]
        store: dict[str, torch.Tensor] = {}
        hook = mod.register_forward_hook(lambda m, i, o: store.__setitem__("x", i[0].detach()))
        dev = next(self.model.parameters()).device
        out: list[torch.Tensor] = []
        try:
            for s in range(0, len(seqs), 8):
                ids, n = self._batch(seqs[s:s + 8])
                self.model.model(ids.to(dev))
                out += [store["x"][j, : int(n[j])].float().cpu() for j in range(len(n))]
        finally:
            hook.remove()
        return out

    def _cache_file(self) -> Path:
        """Where the background statistics of this model and these settings are kept between processes."""
        import hashlib

        from hyperlora.models import cache_dir

        h = hashlib.sha256(self.settings().encode())
        mod = dict(self.model.named_modules())[self.name]
        for t in (mod.weight, self.model.get_input_embeddings().weight, self.model.model.norm.weight):
            h.update(t.detach().float().cpu().numpy().tobytes()[:1 << 20])
            h.update(str(tuple(t.shape)).encode())
        return cache_dir() / "reply_prefix" / f"background-{h.hexdigest()[:16]}.pt"

    def _background(self) -> dict[str, Any]:
        if self._stats is None:
            path = self._cache_file()
            if path.is_file():
                try:
                    saved = torch.load(path, map_location="cpu", weights_only=True)
                    self._stats = self._with_output_maps(saved)
                    return self._stats
                except Exception as e:  # a torn or foreign file: recompute and overwrite it
                    warnings.warn(f"ignoring unreadable reply-prefix cache {path}: {e}", stacklevel=2)
            self._stats = self._with_output_maps(self._compute_background())
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                torch.save({k: v for k, v in self._stats.items() if k in ("G", "starts", "key_prompts")}, tmp)
                tmp.replace(path)
            except OSError as e:
                warnings.warn(f"could not cache reply-prefix statistics at {path}: {e}", stacklevel=2)
        return self._stats

    def _with_output_maps(self, stats: dict[str, Any]) -> dict[str, Any]:
        E = self.model.get_input_embeddings().weight.detach().float().cpu()
        gamma = self.model.model.norm.weight.detach().float().cpu()
        return {**stats, "E": E, "gamma": gamma, "Minv": torch.linalg.inv(E.T @ E + 1e-3 * torch.eye(E.shape[1]))}

    def _compute_background(self) -> dict[str, Any]:
        """The ridge background (Gram matrix of ordinary reply states), answer-start states, key prompts."""
        from hyperlora.tasks.prompts import prompt_text
        from hyperlora.training.scoring import greedy_generate

        recs = _builtin_records(self.n_background + self.n_keys, self.seed)
        bg_recs, key_recs = recs[: self.n_background], recs[self.n_background:]
        prompts = [prompt_text(self.tokenizer, r) for r in bg_recs]
        replies = greedy_generate(self.model, self.tokenizer, prompts, max_new_tokens=16, batch_size=8, bf16=False)
        plen = [len(self._enc(p)) for p in prompts]
        xs = self._states([self._enc(p) + self._enc(r) for p, r in zip(prompts, replies)])
        starts = torch.stack([x[n - 1] for x, n in zip(xs, plen)])       # answer-start states: slot 0's keys
        rest = torch.cat([torch.cat([x[: n - 1], x[n:]]) for x, n in zip(xs, plen)])
        return {"G": rest.T @ rest, "starts": starts,
                "key_prompts": [self._enc(prompt_text(self.tokenizer, r)) for r in key_recs]}

    def prefix_ids(self, prefix: str) -> list[int]:
        """The prefix's tokens as they follow the assistant header."""
        from hyperlora.tasks.prompts import prompt_text

        head = self._enc(prompt_text(self.tokenizer, "x"))
        ids = self._enc(prompt_text(self.tokenizer, "x") + prefix)
        if ids[: len(head)] != head:
            raise ValueError(f"reply prefix {prefix!r} merges with the assistant header when tokenized")
        return ids[len(head):][: self.max_tokens]

    @torch.no_grad()
    def __call__(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not prefix or not prefix.strip():
            raise ValueError("reply prefix is empty")
        if prefix in self._cache:
            return self._cache[prefix]
        st = self._background()
        ids = self.prefix_ids(prefix)
        K = len(ids)
        seqs = [p + ids for p in st["key_prompts"]]
        xs = self._states([s[:-1] for s in seqs])
        plen = [len(p) for p in st["key_prompts"]]
        Xt = torch.cat([torch.stack([x[n - 1 + k] for k in range(K)]) for x, n in zip(xs, plen)]
                       + [st["starts"]])
        Yt = torch.cat([torch.eye(K).repeat(len(xs), 1), torch.eye(K)[[0] * len(st["starts"])]])
        A, B = self._fit(st["G"], Xt, Yt, seqs, plen, ids)
        self._cache[prefix] = (A, B)
        return A, B

    def _fit(self, G, Xt, Yt, seqs, plen, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Ridge keys, then each slot's scale raised until its token wins by ``margin`` on every key record."""
        st = self._background()
        d, w = Xt.shape[1], self.key_weight
        A = torch.linalg.solve(G + w * Xt.T @ Xt + self.ridge * torch.eye(d), w * Xt.T @ Yt).T     # [K, d_in]
        V = (st["Minv"] @ st["E"][ids].T).T / st["gamma"]
        V = V / V.norm(dim=-1, keepdim=True)                                                      # [K, d_out]
        scale = torch.full((len(ids),), float(self.init_scale))
        margins = self._margins(seqs, plen, ids, A, (V * scale[:, None]).T)
        for _ in range(12):  # the final RMSNorm bounds the logits: a margin can saturate below the target
            low = margins < self.margin
            if not bool(low.any()):
                break
            trial = torch.where(low, scale * 1.5, scale)
            m = self._margins(seqs, plen, ids, A, (V * trial[:, None]).T)
            if not bool((m[low] > margins[low] + 1e-3).any()):
                break
            scale, margins = trial, m
        self.margins = margins
        if bool((margins < self.margin).any()):
            warnings.warn(f"reply prefix {self.tokenizer.decode(ids)!r}: token margins {margins.tolist()} on the key "
                          f"records, below the target {self.margin}; replies may not start with it", stacklevel=3)
        return A.contiguous(), (V * scale[:, None]).T.contiguous()

    def _margins(self, seqs, plen, ids, A, B) -> torch.Tensor:
        """[K]: the smallest (over key records) logit margin of t_k over the best other token at its position."""
        from hyperlora.training.lora_fn import apply_lora

        dev = next(self.model.parameters()).device
        K = len(ids)
        batch, _ = self._batch([s[:-1] for s in seqs])
        pos = torch.tensor([[n - 1 + k for k in range(K)] for n in plen])            # [N, K]
        with apply_lora(self.model, {self.name: (A[None].to(dev), B[None].to(dev))}, scale=1.0,
                        rows=torch.zeros(len(seqs), dtype=torch.long)):
            h = self.model.model(batch.to(dev)).last_hidden_state
        h = h[torch.arange(len(seqs))[:, None], pos.to(dev)]                              # [N, K, d]
        logits = self.model.lm_head(h).float().cpu()
        tgt = torch.tensor(ids)
        hit = logits[..., tgt].diagonal(dim1=-2, dim2=-1).clone()                        # [N, K]
        logits[:, torch.arange(K), tgt] = float("-inf")
        return (hit - logits.max(-1).values).min(0).values
