"""Where evaluation and the demo get adapters from: a hypernetwork checkpoint, a LoRA directory, a quick
per-policy LoRA (the oracle), all returned as ``scoring.AdapterSet`` (name -> stacked A/B, scale).
"""
from __future__ import annotations

import logging
import math
import random
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from hyperlora.tasks.format import Example
from hyperlora.modeling.prompts import prompt_text, target_text
from hyperlora.evaluation.scoring import AdapterSet
from hyperlora.hypernets.checkpoints import SHIPPED_DIR, find_hypernet_dir, load_hypernet

log = logging.getLogger(__name__)

__all__ = ["SHIPPED_DIR", "find_hypernet_dir", "HypernetSource", "read_lora_dir", "read_lora_file", "load_lora",
           "train_policy_lora", "stack_adapter_sets"]

class HypernetSource:
    """Policy texts -> AdapterSet through a HyperNetwork and its policy encoder (no grad)."""

    def __init__(self, hypernet: nn.Module, encode: Callable[[list[str]], torch.Tensor]):
        self.hypernet = hypernet.eval()
        self.encode = encode

    @classmethod
    def from_dir(cls, directory: str | Path, model: nn.Module, tokenizer: Any) -> "HypernetSource":
        """The checkpoint in ``directory`` as an adapter source; a policy reader directory (config kind "reader")
        gives a ``ReaderSource`` instead."""
        from hyperlora.hypernets.reader.reader import ReaderSource, is_reader_dir

        d = Path(directory)
        if is_reader_dir(d):
            return ReaderSource.from_dir(d, model, tokenizer)  # type: ignore[return-value]
        hn, encode = load_hypernet(d, model, tokenizer)
        return cls(hn, encode)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> AdapterSet:
        from hyperlora.adapters.functional import adapters_from_generated

        emb = self.encode(list(texts)).float()
        p = next(self.hypernet.parameters())
        gen = self.hypernet.generate(emb.to(p.device, p.dtype))
        names = {t: self.hypernet.module_names(t) for t in gen}
        mods = adapters_from_generated(gen, names)
        return AdapterSet({n: (a.float(), b.float()) for n, (a, b) in mods.items()}, float(self.hypernet.config.scale))


def read_lora_dir(path: str | Path) -> AdapterSet:
    """One LoRA from a PEFT-format directory as P=1, read and validated by `hyperlora.adapters.peft_io.read_peft`
    (per-module scales, rank_pattern / alpha_pattern included, are folded into B)."""
    from hyperlora.adapters.peft_io import read_peft

    d = Path(path)
    if not (d / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{str(d)!r} is not a LoRA directory: it needs adapter_config.json and "
                                f"adapter_model.safetensors (PEFT format)")
    ad = read_peft(d)
    mods = {n: (a.float().unsqueeze(0), b.float().unsqueeze(0)) for n, (a, b) in ad.modules.items()}
    return AdapterSet(mods, 1.0)


def read_lora_file(path: str | Path, model: nn.Module | None = None) -> AdapterSet:
    """Adapters saved by ``hyperlora train`` (``LoraSet.save``: ``<name>.lora_A`` [P, R, d_in],
    ``<name>.lora_B`` [P, d_out, R], metadata ``scale``), e.g. ``multitask_lora.safetensors``."""
    from safetensors import safe_open

    p = Path(path)
    with safe_open(str(p), "pt") as f:
        md = f.metadata() or {}
        keys = list(f.keys())
        mods = {}
        for k in keys:
            if k.endswith(".lora_A"):
                n = k[: -len(".lora_A")]
                if n + ".lora_B" not in keys:
                    raise ValueError(f"{p}: {k!r} has no matching {n + '.lora_B'!r}")
                mods[n] = (f.get_tensor(k).float(), f.get_tensor(n + ".lora_B").float())
    if not mods:
        raise ValueError(f"{p}: no '<module>.lora_A' / '.lora_B' tensors (not a hyperlora LoRA file)")
    if model is not None:
        names = dict(model.named_modules())
        bad = [n for n in mods if n not in names]
        if bad:
            raise ValueError(f"{p}: targets {bad[:3]} are not modules of this base model")
    for n, (a, b) in mods.items():
        if a.dim() == 2:
            mods[n] = (a.unsqueeze(0), b.unsqueeze(0))
    return AdapterSet(mods, float(md.get("scale", 1.0)))


def load_lora(path: str | Path, model: nn.Module) -> AdapterSet:
    """A LoRA from a ``LoraSet`` safetensors file, a directory holding ``multitask_lora.safetensors``, or a
    PEFT directory."""
    p = Path(path)
    if p.is_file():
        return read_lora_file(p, model)
    if (p / "multitask_lora.safetensors").is_file():
        return read_lora_file(p / "multitask_lora.safetensors", model)
    return read_lora_dir(p)


def _linear_targets(model: nn.Module, types: Sequence[str]) -> dict[str, nn.Linear]:
    out = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in types}
    if not out:
        raise ValueError(f"no nn.Linear modules of types {list(types)} in {type(model).__name__}")
    return out


def _layer_of(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _lower_split(model: nn.Module, targets: Sequence[str]) -> Any:
    """A ``fastpath.LayerSplit`` at the lowest adapted layer when it is worth it (Llama family, start > 0)."""
    layers = [_layer_of(n) for n in targets]
    if not layers or any(x is None for x in layers) or min(layers) == 0:
        return None
    try:
        from hyperlora.modeling.layer_split import LayerSplit

        return LayerSplit(model, min(layers))
    except (ImportError, TypeError, ValueError):
        return None


# Weight of the language-model term next to the choice term: the answer words start tens of nats unlikely,
# and at full weight that term dominates a 60-step budget while the choice itself barely moves.
_LM_WEIGHT = 0.2


def _choice_loss(first_logits: torch.Tensor, choice: Sequence[tuple[list[int], int] | None]) -> torch.Tensor:
    """Cross-entropy of the gold option among the options' first tokens at the answer position ([B, V] logits);
    0 for free-text rows. It trains the choice directly, not only the answer words' likelihood."""
    terms = [nn.functional.cross_entropy(first_logits[r, ids].unsqueeze(0), torch.tensor([gold], device=first_logits.device))
             for r, c in enumerate(choice) if c is not None for ids, gold in [c]]
    return torch.stack(terms).mean() if terms else first_logits.sum() * 0.0


def train_policy_lora(model: nn.Module, tokenizer: Any, examples: Sequence[Example], *, rank: int = 8,
                      alpha: float = 16.0, target_modules: Sequence[str] = ("q_proj", "v_proj"),
                      module_names: Sequence[str] | None = None, n_upper: int | None = 12, steps: int = 60,
                      batch_size: int = 8, lr: float = 2e-3, seed: int = 0, bf16: bool = True,
                      cache_lower: bool = True) -> AdapterSet:
    """A LoRA trained on one policy's examples with no policy in the prompt (the ``oracle_lora`` baseline).

    Loss: cross-entropy on ``answer + end-of-turn`` (option tasks: the gold option; free text: the
    reference reply; free-text examples without one are skipped), weighted 0.2, plus for option tasks the
    cross-entropy of the gold option among the options' first tokens (the choice itself). Targets: ``module_names`` (full names,
    e.g. the hypernetwork's, so the oracle adapts the same modules), else the ``target_modules`` Linears
    of the last ``n_upper`` layers (None: all layers; 12 matches ``hyperlora train``'s default).
    When nothing below layer ``start`` is adapted (Llama family), the hidden states entering ``start`` are
    computed once per example and each step runs only the upper layers (``cache_lower=False``: full
    forwards every step; same result). Returns P=1, scale folded in.
    """
    used = [e for e in examples if e.answer]
    pairs = [(prompt_text(tokenizer, e.input), target_text(tokenizer, e.answer)) for e in used]
    if not pairs:
        raise ValueError("train_policy_lora needs examples with an 'answer' (gold option or reference reply)")
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    dev = next(model.parameters()).device
    if module_names is not None:
        mods = dict(model.named_modules())
        missing = [n for n in module_names if n not in mods]
        if missing:
            raise ValueError(f"module_names {missing[:3]} are not modules of the base model")
        targets = {n: mods[n] for n in module_names}
    else:
        targets = _linear_targets(model, target_modules)
        idx = [x for x in (_layer_of(n) for n in targets) if x is not None]
        if n_upper is not None and idx:
            lo = max(idx) + 1 - n_upper
            targets = {n: m for n, m in targets.items() if (_layer_of(n) or 0) >= lo}
    params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for n, m in targets.items():
        a = (torch.rand(1, rank, m.in_features, generator=g) * 2 - 1) / math.sqrt(m.in_features)
        params[n] = (a.to(dev).requires_grad_(), torch.zeros(1, m.out_features, rank, device=dev, requires_grad=True))
    opt = torch.optim.AdamW([t for ab in params.values() for t in ab], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    enc = [(tokenizer(p, add_special_tokens=False)["input_ids"], tokenizer(t, add_special_tokens=False)["input_ids"])
           for p, t in pairs]
    # option tasks: first token of each option (+ gold index) for the discriminative term of the loss
    choice: list[tuple[list[int], int] | None] = []
    for e in used:
        if e.options is None:
            choice.append(None)
            continue
        firsts = [tokenizer(target_text(tokenizer, o), add_special_tokens=False)["input_ids"][0] for o in e.options]
        choice.append((firsts, e.options.index(e.answer)) if len(set(firsts)) == len(firsts) else None)
    pad = int(getattr(tokenizer, "pad_token_id", None) or getattr(tokenizer, "eos_token_id", None) or 0)
    scale = alpha / rank
    from hyperlora.adapters.functional import apply_lora

    split = _lower_split(model, list(targets)) if cache_lower else None
    cached: list[torch.Tensor] = []
    if split is not None:  # states entering layer `start` never depend on the adapter: compute them once
        from hyperlora.modeling.layer_split import pad_right

        with torch.no_grad():
            for s0 in range(0, len(enc), 16):
                chunk = [p + t for p, t in enc[s0:s0 + 16]]
                ids, _ = pad_right(chunk, pad)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                    h = split.lower(ids.to(dev))
                cached.extend(h[j, : len(c)].float() for j, c in enumerate(chunk))

    def loss_upper(pick: list[int]) -> torch.Tensor:
        T = max(cached[i].shape[0] for i in pick)
        h = torch.zeros(len(pick), T, cached[0].shape[-1], device=dev)
        for r, i in enumerate(pick):  # right padding + causal attention: real positions never see the pads
            h[r, : cached[i].shape[0]] = cached[i]
        rows_, cols, labels = [], [], []
        for r, i in enumerate(pick):
            P, t = len(enc[i][0]), enc[i][1]
            rows_ += [r] * len(t)
            cols += list(range(P - 1, P - 1 + len(t)))  # position P-1+j predicts target token j
            labels += t
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            pos, pe = split._pos(h)
            for layer in split.layers[split.start:]:
                h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
                if isinstance(h, tuple):
                    h = h[0]
            hs = split.norm(h[torch.tensor(rows_, device=dev), torch.tensor(cols, device=dev)])
            logits = split.lm_head(hs).float()
        firsts = [rows_.index(r) for r in range(len(pick))]  # row of each example's first target token
        return _LM_WEIGHT * nn.functional.cross_entropy(logits, torch.tensor(labels, device=dev)) + _choice_loss(
            logits[torch.tensor(firsts, device=dev)], [choice[i] for i in pick])

    def loss_full(pick: list[int]) -> torch.Tensor:
        batch = [enc[i] for i in pick]
        seqs = [p + t for p, t in batch]
        T = max(len(s) for s in seqs)
        keep = max(len(t) for _, t in batch) + 1  # logits only where targets are predicted (vocab is large)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        labels = torch.full((len(seqs), keep), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, ((p, t), s) in enumerate(zip(batch, seqs)):  # left padding: every row ends at T-1
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
            labels[i, keep - len(t):] = torch.tensor(t)  # label j is predicted by kept logit j-1
        ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                           logits_to_keep=keep).logits.float()
        first = logits[torch.arange(len(batch)), torch.tensor([keep - 1 - len(t) for _, t in batch])]
        return _LM_WEIGHT * nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        ) + _choice_loss(first, [choice[i] for i in pick])

    was_training = model.training
    model.eval()
    for _ in range(steps):
        pick = [rng.randrange(len(enc)) for _ in range(batch_size)]
        with apply_lora(model, params, scale=scale, rows=torch.zeros(batch_size, dtype=torch.long)):
            loss = loss_upper(pick) if split is not None else loss_full(pick)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.train(was_training)
    return AdapterSet({n: (a.detach(), b.detach() * scale) for n, (a, b) in params.items()}, 1.0)


def stack_adapter_sets(sets: Sequence[AdapterSet]) -> AdapterSet:
    """Concatenate P=1.. adapter sets on the same modules into one set (scales folded into B)."""
    if not sets:
        raise ValueError("no adapter sets to stack")
    names = list(sets[0].modules)
    for s in sets[1:]:
        if set(s.modules) != set(names):
            raise ValueError("adapter sets target different modules; cannot stack")
    mods = {}
    for n in names:
        a_list, b_list = [], []
        for s in sets:
            a, b = s.modules[n]
            sc = s.scale if isinstance(s.scale, torch.Tensor) else torch.full((a.shape[0],), float(s.scale))
            a_list.append(a)
            b_list.append(b * sc.to(b.dtype).view(-1, 1, 1))
        ranks = {a.shape[1] for a in a_list}
        if len(ranks) != 1:  # zero-pad to the largest rank
            R = max(ranks)
            a_list = [torch.nn.functional.pad(a, (0, 0, 0, R - a.shape[1])) for a in a_list]
            b_list = [torch.nn.functional.pad(b, (0, R - b.shape[2])) for b in b_list]
        mods[n] = (torch.cat(a_list), torch.cat(b_list))
    return AdapterSet(mods, 1.0)
