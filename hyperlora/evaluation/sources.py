"""Where evaluation and the demo get adapters from: a hypernetwork checkpoint, a LoRA directory, a quick
per-policy LoRA (the oracle), all returned as ``scoring.AdapterSet`` (name -> stacked A/B, scale).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from hyperlora.adapters.functional import adapters_from_generated
from hyperlora.adapters.peft_io import read_peft
from hyperlora.evaluation.scoring import AdapterSet
from hyperlora.hypernets.checkpoints import SHIPPED_DIR, find_hypernet_dir, load_hypernet
from hyperlora.hypernets.reader.reader import ReaderSource, is_reader_dir
from hyperlora.training.oracle import train_policy_lora  # the one oracle LoRA trainer, re-exported for callers

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
        d = Path(directory)
        if is_reader_dir(d):
            return ReaderSource.from_dir(d, model, tokenizer)  # type: ignore[return-value]
        hn, encode = load_hypernet(d, model, tokenizer)
        return cls(hn, encode)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> AdapterSet:
        emb = self.encode(list(texts)).float()
        p = next(self.hypernet.parameters())
        gen = self.hypernet.generate(emb.to(p.device, p.dtype))
        names = {t: self.hypernet.module_names(t) for t in gen}
        mods = adapters_from_generated(gen, names)
        return AdapterSet({n: (a.float(), b.float()) for n, (a, b) in mods.items()}, float(self.hypernet.config.scale))


def read_lora_dir(path: str | Path) -> AdapterSet:
    """One LoRA from a PEFT-format directory as P=1, read and validated by `hyperlora.adapters.peft_io.read_peft`
    (per-module scales, rank_pattern / alpha_pattern included, are folded into B)."""
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
