"""Reply-format rules: how a reply starts ("Start every reply with 'Noted:'", "Put the tag [Ops] at the very
start") or how it ends ("End every reply with the sign-off '-- Desk'"). Read which format a policy demands, and
compile it into a last-layer adapter that makes replies follow it.

Why a separate path: the policy reader (``hyperlora/hypernets/reader/reader.py``) raises the logit of an answer word at the
answer position. A format rule needs 2-6 exact tokens in order (``[``, ``Help``, ``desk``, ``]``), each at its own
position, and a copied embedding also raises its neighbours (docs/EXPERIMENTS.md 7b). So:

* ``ReplyPrefixHead`` (learned, tiny): from the base model's reading of the policy (the reader's gate-layer
  states), a classifier picks a *template* (or "no format rule") and a pointer picks the policy *word* that fills
  it. Templates are learned from training tasks' reference replies (``derive_template``: ``"[Ops] Thanks..."``
  gives ``"[{w}]"``, ``"Thanks. -- Ops"`` gives ``"{reply} -- {w}"``), so words never seen in training are
  copied, not memorized.
* ``PrefixCompiler`` (no training): the prefix's tokens t_1..t_K become K rank-1 slots on the last decoder
  layer's ``down_proj``. Slot k's key is a ridge read-out that is ~1 on the base model's own state just before
  t_k (states of a few built-in records followed by the prefix) and ~0 on ordinary reply text; its value is the
  least-squares direction that raises t_k's logit above every other token's (tied embeddings behind the final
  RMSNorm), scaled until t_k wins by a margin on the key records. The adapted layer is the last one, so its
  output changes no state the keys read: once t_1..t_{k-1} are out, slot k sees exactly the state it was built on.
  A sign-off (``PrefixCompiler.signoff``) is built the same way, with slot 0 keyed on the base model's own
  sentence ends instead of the answer start, and a last slot for the end of turn: the reply is signed after its
  first sentence, like the tasks' reference replies.

The compiler's *background records* (the user messages whose replies give the statistics) are data shipped
with the reader (``reply_background.json`` beside the head, ``load_background_records``), written once from the
task generator by ``hyperlora.training.reply_background``: serving never runs the generator.

Limits (measured, docs/EXPERIMENTS.md 8-9): a template kind never seen in training cannot be named; a sign-off
is missed when the reply's first sentence runs past the tokens a reader allows it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from hyperlora.adapters.functional import apply_lora
from hyperlora.hypernets.reader.text import policy_words, quoted_spans, sentence_ends, token_spans, whole_word
from hyperlora.modeling.base_model import cache_dir
from hyperlora.modeling.capture import InputCapture
from hyperlora.modeling.decoding import greedy_decode_texts
from hyperlora.modeling.padding import pad_ids
from hyperlora.modeling.prompts import end_of_turn, prompt_text
from hyperlora.modeling.targets import module_name

# policy_words, quoted_spans, sentence_ends and token_spans stay importable from here (their old home)
__all__ = ["HEAD_FILE", "HEAD_CONFIG", "BACKGROUND_FILE", "SLOT", "REPLY", "derive_template", "quoted_literal",
           "split_template", "word_features", "ReplyPrefixHead", "PrefixCompiler", "save_background_records",
           "load_background_records", "policy_words", "quoted_spans", "sentence_ends", "token_spans"]

HEAD_FILE = "reply_prefix.safetensors"
HEAD_CONFIG = "reply_prefix.json"
BACKGROUND_FILE = "reply_background.json"
SLOT = "{w}"
REPLY = "{reply}"  # a sign-off template: the reply, then the sign-off
# the compiler's default background: records and seed (the records file shipped with a reader must match them)
N_BACKGROUND, N_KEYS, BACKGROUND_SEED = 32, 8, 7


def derive_template(policy: str, answers: Sequence[str]) -> tuple[str, str] | None:
    """The reply-format template a free-text task's reference replies share, with the policy word that fills it
    replaced by ``{w}``, or None.

    A shared *prefix* comes first: replies "Noted: Thanks ..." / "Noted: We ..." under a policy naming 'Noted'
    give ``("{w}:", "Noted")``; the prefix ends after the word and the punctuation glued to it, and must start
    at most 8 characters before the word. Otherwise a shared *sign-off*: replies "Thanks. -- Desk" / "We will.
    -- Desk" give ``("{reply} -- {w}", "Desk")`` (``{reply}`` stands for the reply itself); the sign-off starts
    at the punctuation run before the word and must end at most 8 characters after it."""
    if len(answers) < 2:
        return None
    return _shared_prefix(policy, answers) or _shared_signoff(policy, answers)


def _word_in(policy: str, text: str) -> list[re.Match]:
    """Whole-word occurrences of the policy's words in `text`."""
    return [m for word, _, _ in policy_words(policy) for m in whole_word(word).finditer(text)]


def _shared_prefix(policy: str, answers: Sequence[str]) -> tuple[str, str] | None:
    common = os.path.commonprefix([a.lstrip() for a in answers])
    found = _word_in(policy, common)
    if not found:
        return None
    best = min(found, key=lambda m: (m.start(), -len(m.group(0))))
    if best.start() > 8:
        return None
    end = best.end()
    while end < len(common) and not common[end].isspace() and not common[end].isalnum():
        end += 1
    return common[: best.start()] + SLOT + common[best.end(): end], best.group(0)


def _shared_signoff(policy: str, answers: Sequence[str]) -> tuple[str, str] | None:
    common = os.path.commonprefix([a.rstrip()[::-1] for a in answers])[::-1]
    first = answers[0].rstrip()
    before = first[: len(first) - len(common)]  # what precedes the shared text in one reply
    found = _word_in(policy, common)
    if not found:
        return None
    best = max(found, key=lambda m: (m.end(), len(m.group(0))))
    if len(common) - best.end() > 8:
        return None
    start = best.start()
    while start > 0 and common[start - 1].isspace():
        start -= 1
    while start > 0 and not common[start - 1].isspace() and not common[start - 1].isalnum():
        start -= 1
    prev = common[start - 1] if start > 0 else before[-1:]
    if prev and not prev.isspace():
        start = best.start()  # punctuation glued to the reply ("Thanks. Desk") ends the reply, not the sign-off
    sep = len(common[:start]) - len(common[:start].rstrip())
    return REPLY + (common[start - sep: start] or " ") + common[start: best.start()] + SLOT + common[best.end():], \
        best.group(0)


def quoted_literal(policy: str, word: str) -> str | None:
    """The policy's quoted text that holds `word` and punctuation besides it ('Noted:', '-- Desk', '- Noted'),
    stripped; None if no quote holds the word, or the quote is the bare word ('Noted', "Memo")."""
    for content, _, _ in quoted_spans(policy):
        q = content.strip()
        if whole_word(word).search(q) and q != word \
                and re.search(r"[^\w\s]", q.replace(word, "")):
            return q
    return None


def split_template(filled: str) -> tuple[str, str]:
    """("prefix", text) for a filled prefix template, ("signoff", text to append) for a sign-off template."""
    if filled.startswith(REPLY):
        return "signoff", filled[len(REPLY):]
    return "prefix", filled


def word_features(h: torch.Tensor, spans: Sequence[tuple[int, int]], words: Sequence[tuple[str, int, int]]
                  ) -> torch.Tensor:
    """[W, d]: per word, the mean state of the tokens overlapping its characters."""
    out = torch.zeros(len(words), h.shape[-1])
    for w, (_, s, e) in enumerate(words):
        idx = [i for i, (a, b) in enumerate(spans) if a < e and b > s]
        out[w] = h[idx].mean(0) if idx else 0.0
    return out


class ReplyPrefixHead(nn.Module):
    """Policy states -> (template logits [1 + n_templates], word logits [W]). Class 0 means "no format rule"."""

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
        """The filled template this policy demands ("Noted:", "{reply} -- Desk"), or None when it is not a
        reply-format rule (``split_template`` tells prefixes from sign-offs). Where the policy quotes the exact
        text around the fill word ("... the bullet '- Noted'"), that text is used verbatim (``quoted_literal``):
        the learned templates only cover the kinds seen in training."""
        words = policy_words(text)
        cls_logits, word_logits = self(h, word_features(h, spans, words))
        c = int(cls_logits.argmax())
        if c == 0 or not words:
            return None
        word = words[int(word_logits.argmax())][0]
        template = self.templates[c - 1]
        literal = quoted_literal(text, word)
        if literal is not None:
            return (REPLY + " " + literal) if template.startswith(REPLY) else literal
        return template.replace(SLOT, word)

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


def save_background_records(directory: str | Path, records: Sequence[str], *, seed: int,
                            source: str = "") -> Path:
    """Write the compiler's background records (``BACKGROUND_FILE``) into a reader directory; returns the path.
    ``seed`` is the compiler seed they were drawn with, ``source`` says how (free text)."""
    recs = _check_records(records, "records")
    path = Path(directory) / BACKGROUND_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"n_records": len(recs), "seed": int(seed), "source": source, "records": recs}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def load_background_records(directory: str | Path, *, n: int = N_BACKGROUND + N_KEYS,
                            seed: int = BACKGROUND_SEED) -> list[str] | None:
    """The background records shipped in a reader directory, or None if it has no ``BACKGROUND_FILE``.

    Raises ValueError when the file is malformed or was written for another record count or seed than the
    compiler's (``n`` = n_background + n_keys, ``seed``): its adapters would differ from the ones it was made for."""
    path = Path(directory) / BACKGROUND_FILE
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(body, dict) or "records" not in body:
        raise ValueError(f"{path} holds no 'records' list")
    recs = _check_records(body["records"], str(path))
    if len(recs) != n or body.get("seed") != seed:
        raise ValueError(f"{path} holds {len(recs)} records for seed {body.get('seed')!r}; the reply-prefix "
                         f"compiler needs {n} records for seed {seed}")
    return recs


def _check_records(records: Any, where: str) -> list[str]:
    if isinstance(records, str) or not isinstance(records, Sequence):
        raise ValueError(f"{where}: background records must be a list of texts, got {type(records).__name__}")
    bad = [i for i, r in enumerate(records) if not isinstance(r, str) or not r.strip()]
    if bad:
        raise ValueError(f"{where}: background records {bad[:5]} are not non-empty texts")
    if not records:
        raise ValueError(f"{where}: no background records")
    return list(records)


class PrefixCompiler:
    """Prefix string -> rank-K LoRA factors (A [K, d_in], B [d_out, K]) on the last layer's ``down_proj`` that
    make greedy replies start with the prefix (``__call__``), or end with a sign-off (``signoff``). The
    background statistics (the base model's states over its own replies to the background ``records``: the
    first ``n_background`` give the ridge background, the next ``n_keys`` the key records) are computed once
    per kind, on first use (~10-20 s for prefixes, ~45 s for sign-offs on one CPU thread), and cached on disk.

    ``records``: n_background + n_keys user messages, the ones shipped with a reader
    (``load_background_records``; ``hyperlora.training.reply_background`` draws them from the task generator)."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, records: Sequence[str], n_background: int = N_BACKGROUND,
                 n_keys: int = N_KEYS, ridge: float = 1.0, key_weight: float = 20.0, init_scale: float = 40.0,
                 margin: float = 4.0, max_tokens: int = 16, seed: int = BACKGROUND_SEED, signoff_tokens: int = 48):
        recs = _check_records(records, "PrefixCompiler")
        if len(recs) != n_background + n_keys:
            raise ValueError(f"PrefixCompiler needs n_background + n_keys = {n_background + n_keys} background "
                             f"records, got {len(recs)}")
        self.records = recs
        self.model, self.tokenizer = model, tokenizer
        self.layer = int(model.config.num_hidden_layers) - 1
        self.name = module_name(model, self.layer, "down_proj")
        self.ridge, self.key_weight, self.init_scale, self.margin = ridge, key_weight, init_scale, margin
        self.max_tokens, self.n_background, self.n_keys, self.seed = max_tokens, n_background, n_keys, seed
        self.signoff_tokens = signoff_tokens
        self._stats: dict[str, Any] | None = None
        self._signoff_stats: dict[str, Any] | None = None
        self._outputs: dict[str, torch.Tensor] | None = None
        self.margins: torch.Tensor | None = None  # per-token logit margins on the key records, last compile
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _prefix_settings(self) -> str:
        return (f"{self.n_background}|{self.n_keys}|{self.ridge}|{self.key_weight}|{self.init_scale}|"
                f"{self.margin}|{self.max_tokens}|{self.seed}")

    def settings(self) -> str:
        """Every setting a compiled adapter depends on (part of the served reader's weights id)."""
        return f"{self._prefix_settings()}|{self.signoff_tokens}"

    def _enc(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _batch(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids [N, T] (causal attention keeps every real position exact) and their lengths."""
        ids, _ = pad_ids(seqs, int(self.tokenizer.pad_token_id or 0))
        return ids, torch.tensor([len(s) for s in seqs])

    @torch.no_grad()
    def _states(self, seqs: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """down_proj inputs of the last layer at every position, per sequence (no adapter)."""
        dev = next(self.model.parameters()).device
        out: list[torch.Tensor] = []
        with InputCapture(self.model, {"x": self.name}) as store:
            for s in range(0, len(seqs), 8):
                ids, n = self._batch(seqs[s:s + 8])
                self.model.model(ids.to(dev))
                out += [store["x"][j, : int(n[j])].float().cpu() for j in range(len(n))]
        return out

    def _cache_file(self, kind: str = "background") -> Path:
        """Where the `kind` statistics of this model, these settings and these records are kept between processes."""
        h = hashlib.sha256((self.settings() if kind == "signoff" else self._prefix_settings()).encode())
        h.update(json.dumps(self.records).encode())
        mod = dict(self.model.named_modules())[self.name]
        for t in (mod.weight, self.model.get_input_embeddings().weight, self.model.model.norm.weight):
            h.update(t.detach().float().cpu().numpy().tobytes()[:1 << 20])
            h.update(str(tuple(t.shape)).encode())
        return cache_dir() / "reply_prefix" / f"{kind}-{h.hexdigest()[:16]}.pt"

    def _load_or_compute(self, kind: str, compute: Any) -> dict[str, Any]:
        """The `kind` statistics from the disk cache, else from `compute()` (then written to the cache)."""
        path = self._cache_file(kind)
        if path.is_file():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # a torn or foreign file: recompute and overwrite it
                warnings.warn(f"ignoring unreadable reply-prefix cache {path}: {e}", stacklevel=3)
        stats = compute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(stats, tmp)
            tmp.replace(path)
        except OSError as e:
            warnings.warn(f"could not cache reply-prefix statistics at {path}: {e}", stacklevel=3)
        return stats

    def _background(self) -> dict[str, Any]:
        """Prefix statistics: Gram matrix of ordinary reply states, answer-start states, key prompts."""
        if self._stats is None:
            self._stats = self._load_or_compute("background", self._compute_background)
        return self._stats

    def _signoff_background(self) -> dict[str, Any]:
        """Sign-off statistics: Gram matrix of reply states that end no sentence, sentence-end states, and key
        sequences (a prompt and the first sentence of the base model's reply)."""
        if self._signoff_stats is None:
            self._signoff_stats = self._load_or_compute("signoff", self._compute_signoff_background)
        return self._signoff_stats

    def _output_maps(self) -> dict[str, torch.Tensor]:
        """Tied embeddings E, the final RMSNorm's gain and (E^T E + eps)^-1, for least-squares output directions."""
        if self._outputs is None:
            E = self.model.get_input_embeddings().weight.detach().float().cpu()
            gamma = self.model.model.norm.weight.detach().float().cpu()
            self._outputs = {"E": E, "gamma": gamma,
                             "Minv": torch.linalg.inv(E.T @ E + 1e-3 * torch.eye(E.shape[1]))}
        return self._outputs

    def _compute_background(self) -> dict[str, Any]:
        """The ridge background (Gram matrix of ordinary reply states), answer-start states, key prompts."""
        recs = self.records
        bg_recs, key_recs = recs[: self.n_background], recs[self.n_background:]
        prompts = [prompt_text(self.tokenizer, r) for r in bg_recs]
        replies = greedy_decode_texts(self.model, self.tokenizer, prompts, max_new_tokens=16, batch_size=8,
                                      bf16=False)
        plen = [len(self._enc(p)) for p in prompts]
        xs = self._states([self._enc(p) + self._enc(r) for p, r in zip(prompts, replies)])
        starts = torch.stack([x[n - 1] for x, n in zip(xs, plen)])       # answer-start states: slot 0's keys
        rest = torch.cat([torch.cat([x[: n - 1], x[n:]]) for x, n in zip(xs, plen)])
        return {"G": rest.T @ rest, "starts": starts,
                "key_prompts": [self._enc(prompt_text(self.tokenizer, r)) for r in key_recs]}

    def _compute_signoff_background(self) -> dict[str, Any]:
        """The base model's replies to the background records (``signoff_tokens`` each), split at sentence ends."""
        texts = [prompt_text(self.tokenizer, r) for r in self.records]
        replies = greedy_decode_texts(self.model, self.tokenizer, texts, max_new_tokens=self.signoff_tokens,
                                      batch_size=8, bf16=False)
        prompts, rids = [self._enc(t) for t in texts], [self._enc(r) for r in replies]
        xs = self._states([p + r for p, r in zip(prompts, rids)])
        ends, rest, key_seqs = [], [], []
        for j, (x, p, r) in enumerate(zip(xs, prompts, rids)):
            stops = sentence_ends(self.tokenizer, r)
            if j >= self.n_background:  # key records: the prompt and the reply's first sentence
                key_seqs.append(p + r[: stops[0] + 1] if stops else p + r)
                continue
            n = len(p)
            is_end = torch.zeros(len(r) + 1, dtype=torch.bool)  # index 0: the answer start
            is_end[[i + 1 for i in stops]] = True
            states = x[n - 1:]
            ends.append(states[is_end])
            rest.append(states[~is_end])
        rest_t = torch.cat(rest)
        ends_t = torch.cat(ends)
        if len(ends_t) == 0:
            raise RuntimeError("the base model's replies to the built-in records end no sentence: cannot learn "
                               "where a sign-off goes")
        return {"G": rest_t.T @ rest_t, "n_rest": len(rest_t), "ends": ends_t, "key_seqs": key_seqs}

    def prefix_ids(self, prefix: str) -> list[int]:
        """The prefix's tokens as they follow the assistant header."""
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
        A, B = self._compile_after(st["key_prompts"], self.prefix_ids(prefix), st["starts"], st["G"])
        self._cache[prefix] = (A, B)
        return A, B

    @torch.no_grad()
    def signoff(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Sign-off text (" -- Desk") -> (A [K, d_in], B [d_out, K]): at the end of a sentence of the reply, emit
        the text and then the end of turn. Slot 0's key fires at the base model's own sentence ends, so the reply
        is signed after its first sentence (the shape of the tasks' reference replies, and short enough for a
        reply read in a few dozen tokens); the others fire after each piece of the sign-off."""
        if not text or not text.strip():
            raise ValueError("sign-off is empty")
        key = "\0signoff" + text
        if key in self._cache:
            return self._cache[key]
        st = self._signoff_background()
        ids = (self._enc(text) + self._enc(end_of_turn(self.tokenizer)))[: self.max_tokens]
        A, B = self._compile_after(st["key_seqs"], ids, st["ends"], st["G"])
        self._cache[key] = (A, B)
        return A, B

    def _compile_after(self, heads: Sequence[Sequence[int]], ids: list[int], slot0_keys: torch.Tensor,
                       G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots that emit `ids` in order after each key sequence in `heads`; slot 0 also fires on the states
        `slot0_keys` (answer starts for a prefix, sentence ends for a sign-off); G is the ridge background."""
        K = len(ids)
        seqs = [list(h) + ids for h in heads]
        plen = [len(h) for h in heads]
        xs = self._states([q[:-1] for q in seqs])
        Xt = torch.cat([torch.stack([x[n - 1 + k] for k in range(K)]) for x, n in zip(xs, plen)] + [slot0_keys])
        Yt = torch.cat([torch.eye(K).repeat(len(xs), 1), torch.eye(K)[[0] * len(slot0_keys)]])
        return self._fit(G, Xt, Yt, seqs, plen, ids)

    def _fit(self, G, Xt, Yt, seqs, plen, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Ridge keys, then each slot's scale raised until its token wins by ``margin`` on every key record."""
        st = self._output_maps()
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
