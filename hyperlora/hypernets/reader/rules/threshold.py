"""Numeric threshold rules ("Answer 'review' if the expense amount is over $500; otherwise 'approve'"): read the
threshold and the two answer words from the policy, and compile them into a rank-1 last-layer adapter.

Why a separate path: the reader's keys say what a record is *about*, not how large a number in it is, and the
policy's reading carries the threshold far too coarsely (docs/EXPERIMENTS.md 7a). But the record side does
carry it: at the answer position, a ridge read-out ``w`` of the last layer's ``down_proj`` input recovers
log(value) of the record's number (median error 0.16 on fields seen in training; EXPERIMENTS 8b). So:

* ``ThresholdHead`` (learned, tiny): from the reader's gate-layer states of the policy, a classifier says
  whether it is a threshold rule, a pointer picks the threshold among the policy's numbers (parsed, not
  read), and two pointers pick the answer word for values above it and the one for values below.
* The adapter (no training): one rank-1 slot, ``A = s (w - log(T) c)``, ``B = (E[above] - E[below]) / gamma``,
  where ``c . x ~ 1`` on records (the reader's constant direction: LoRA has no bias). The logit of the
  'above' word minus the 'below' word's then moves by ``~ s (log(value) - log(T))``.

Labels come from the tasks themselves (``derive_threshold``): a two-option task whose answer is decided by one
number in the record against a number in the policy. Limits (measured): fields never seen in training are
not read (their log(value) read-out is at chance); a multi-token answer word gets only its first token pushed.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from hyperlora.hypernets.reader.text import policy_words

HEAD_FILE = "threshold_rule.safetensors"
HEAD_CONFIG = "threshold_rule.json"
_NUMBER = re.compile(r"(?<![A-Za-z0-9.])\$?(\d[\d,]*(?:\.\d+)?)\s*([kKmM]\b)?")


def numbers(text: str) -> list[tuple[float, int, int]]:
    """Numbers written in a text: (value, start, end); '$1,240' -> 1240.0, '2.5k' -> 2500.0."""
    out = []
    for m in _NUMBER.finditer(text):
        try:
            v = float(m.group(1).replace(",", ""))
        except ValueError:
            continue
        if m.group(2):
            v *= 1e3 if m.group(2).lower() == "k" else 1e6
        out.append((v, m.start(), m.end()))
    return out


def derive_threshold(task: Any) -> tuple[int, str, str, int] | None:
    """(index of the threshold among the policy's numbers, answer above it, answer below it, index of the
    deciding number among each record's numbers) if a two-option task's answers are decided by one record
    number against one policy number; else None."""
    exs = list(task.examples)
    if len(exs) < 2 or any(e.check is not None or len(e.options) != 2 for e in exs):
        return None
    vals = [[v for v, _, _ in numbers(e.input)] for e in exs]
    if not all(vals):
        return None
    for ti, (T, _, _) in enumerate(numbers(task.policy)):
        for j in range(min(map(len, vals))):
            above = {e.answer for e, v in zip(exs, vals) if v[j] > T}
            below = {e.answer for e, v in zip(exs, vals) if v[j] < T}
            if len(above) == 1 and len(below) == 1 and above != below:
                return ti, above.pop(), below.pop(), j
    return None


def context_features(h: torch.Tensor, spans: Sequence[tuple[int, int]], items: Sequence[tuple[Any, int, int]],
                     width: int = 2) -> torch.Tensor:
    """[N, d]: per item (word or number), the mean state of the `width` tokens before and after its own tokens.

    The pointers read an answer word's *role* from its context ("Answer 'X' if", "'X'; every other one gets"),
    not from the word itself, so answer words never seen in training are pointed at like seen ones."""
    out = torch.zeros(len(items), h.shape[-1])
    for n, (_, s, e) in enumerate(items):
        own = [i for i, (a, b) in enumerate(spans) if a < e and b > s]
        if not own:
            continue
        ctx = [i for i in range(own[0] - width, own[0]) if i >= 0]
        ctx += [i for i in range(own[-1] + 1, own[-1] + 1 + width) if i < len(spans)]
        out[n] = h[ctx].mean(0) if ctx else h[own].mean(0)
    return out


class ThresholdHead(nn.Module):
    """Policy states -> (is-threshold logits [2], threshold-number logits [N], above-word [W], below-word [W]).

    Buffers: ``probe`` [d_in], the ridge read-out of log(value) at the answer position of the adapted module's
    input, and ``scale``, the slot's strength (logit units per unit of log(value / T), before the final norm)."""

    def __init__(self, hidden_size: int, probe_size: int, scale: float = 2000.0):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.cls = nn.Linear(hidden_size, 2)
        # which word answers "above" depends on the word's role (condition or default) AND on the policy's
        # direction (over / under): an interaction, so the pointers see word * pooled and have a hidden layer
        self.ptr_num = self._pointer(hidden_size)
        self.ptr_above = self._pointer(hidden_size)
        self.ptr_below = self._pointer(hidden_size)
        self.register_buffer("probe", torch.zeros(probe_size))
        self.register_buffer("scale", torch.tensor(float(scale)))

    @staticmethod
    def _pointer(d: int, hidden: int = 128) -> nn.Module:
        return nn.Sequential(nn.Linear(3 * d, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, h: torch.Tensor, words: torch.Tensor, nums: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [T, d] policy token states; words [W, d] / nums [N, d] their ``context_features``."""
        hn = self.norm(h)
        pooled = hn.mean(0)

        def point(ptr: nn.Module, feats: torch.Tensor) -> torch.Tensor:
            if not len(feats):
                return feats.new_zeros(0)
            f = self.norm(feats)
            p = pooled.expand(len(f), -1)
            return ptr(torch.cat([f, p, f * p], -1)).squeeze(-1)

        return self.cls(pooled), point(self.ptr_num, nums), point(self.ptr_above, words), point(self.ptr_below, words)

    @torch.no_grad()
    def predict(self, text: str, h: torch.Tensor, spans: Sequence[tuple[int, int]]
                ) -> tuple[float, str, str] | None:
        """(threshold, answer above, answer below), or None when the policy is not read as a threshold rule."""
        words, nums = policy_words(text), numbers(text)
        if not words or not nums:
            return None
        cl, nl, al, bl = self(h, context_features(h, spans, words), context_features(h, spans, nums))
        if int(cl.argmax()) == 0:
            return None
        above, below = words[int(al.argmax())][0], words[int(bl.argmax())][0]
        T = nums[int(nl.argmax())][0]
        if above == below or T <= 0:
            return None
        return T, above, below

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / HEAD_CONFIG).write_text(json.dumps({"hidden_size": self.norm.normalized_shape[0],
                                                 "probe_size": int(self.probe.numel()), **(extra or {})},
                                                indent=2) + "\n")
        save_file({k: v.detach().cpu().float().contiguous() for k, v in self.state_dict().items()}, str(d / HEAD_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> "ThresholdHead | None":
        """The head saved in a reader directory, or None if it has none."""
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / HEAD_FILE).is_file():
            return None
        cfg = json.loads((d / HEAD_CONFIG).read_text())
        head = cls(int(cfg["hidden_size"]), int(cfg["probe_size"]))
        head.load_state_dict(load_file(str(d / HEAD_FILE)))
        return head.eval()


def compile_threshold(head: ThresholdHead, constant: torch.Tensor, embedding: torch.Tensor, norm_weight: torch.Tensor,
                      tokenizer: Any, threshold: float, above: str, below: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [1, d_in], B [d_out, 1]): raises `above`'s first token over `below`'s by ~scale * log(value / T)."""
    if threshold <= 0 or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a positive finite number, got {threshold}")
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in (above, below)]
    if not ids[0] or not ids[1]:
        raise ValueError(f"answer words {above!r} / {below!r} tokenize to nothing")
    A = head.scale * (head.probe - math.log(threshold) * constant.float())
    B = (embedding[ids[0][0]].float() - embedding[ids[1][0]].float()) / norm_weight.float()
    return A[None].contiguous(), B[:, None].contiguous()
