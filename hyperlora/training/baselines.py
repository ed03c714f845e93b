"""Baselines trained with the same data path, targets, loss and budget as the hypernetwork.

  oracle_lora     one LoRA per held-out policy, trained on part of that policy's examples (the ceiling a
                  hypernetwork could reach for that policy): ``training/oracle.py`` (`train_oracles`, the same
                  `train_policy_lora` as ``hyperlora eval``'s oracle).
  multitask_lora  one LoRA trained on every training policy with the policy in the prompt (system turn):
                  the fine-tuned "read the policy from the prompt" alternative.
Both adapt the same modules (target types in the last n_upper layers) at the same rank as the hypernetwork.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from hyperlora._io import atomic_path
from hyperlora.adapters.functional import apply_lora
from hyperlora.training.data import Item, TaskData, sample_batch
from hyperlora.training.oracle import train_oracles  # re-exported: --method oracle_lora's trainer
from hyperlora.training.schedule import TimeBudget, warmup_cosine_lr
from hyperlora.training.session import Session

__all__ = ["save_lora_file", "LoraSet", "accuracy_with", "train_multitask", "train_oracles"]


def save_lora_file(path: str | Path, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
                   meta: dict[str, Any] | None = None) -> None:
    """Write P stacked adapters {module: (A [P, R, d_in], B [P, d_out, R])} atomically to one safetensors file:
    ``<module>.lora_A`` / ``.lora_B`` tensors, metadata ``scale`` and ``meta`` (JSON); read back by
    ``evaluation.sources.read_lora_file``."""
    state = {}
    for n, (a, b) in adapters.items():
        state[f"{n}.lora_A"] = a.detach().contiguous()
        state[f"{n}.lora_B"] = b.detach().contiguous()
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"scale": str(scale), "meta": json.dumps(meta or {})})


class LoraSet(nn.Module):
    """P independent LoRA adapters on the named modules: A [P, R, d_in] (LoRA init), B [P, d_out, R] (zeros)."""

    def __init__(self, model: nn.Module, names: Sequence[str], n_adapters: int, rank: int, alpha: float):
        super().__init__()
        mods = dict(model.named_modules())
        self.names = list(names)
        self.scale = float(alpha) / float(rank)
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        for n in self.names:
            m = mods[n]
            a = torch.empty(n_adapters, rank, m.in_features)
            nn.init.uniform_(a, -1 / math.sqrt(m.in_features), 1 / math.sqrt(m.in_features))
            self.a.append(nn.Parameter(a))
            self.b.append(nn.Parameter(torch.zeros(n_adapters, m.out_features, rank)))

    def adapters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: (a, b) for n, a, b in zip(self.names, self.a, self.b)}

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Write the adapters to one safetensors file (`save_lora_file`)."""
        save_lora_file(path, self.adapters(), self.scale, meta)


@torch.no_grad()
def accuracy_with(session: Session, states, items_by_row: Sequence[tuple[int, Item]], adapters=None, scale=1.0,
                  batch_rows: int = 64, families: dict[int, str] | None = None) -> tuple[float, dict[str, float], int]:
    """Accuracy (%) of first-token option choice; items_by_row: (adapter index or -1, item)."""
    correct: dict[str, list[int]] = {}
    for s in range(0, len(items_by_row), batch_rows):
        chunk = items_by_row[s:s + batch_rows]
        items = [it for _, it in chunk]
        if adapters is not None:
            with apply_lora(session.model, adapters, scale=scale, rows=torch.tensor([k for k, _ in chunk])):
                logits, ans = session.forward_options(states, items)
        else:
            logits, ans = session.forward_options(states, items)
        for it, o in zip(items, (logits.argmax(-1) == ans).tolist()):
            fam = (families or {}).get(it.task, "all")
            correct.setdefault(fam, []).append(int(o))
    allc = [o for v in correct.values() for o in v]
    return (100.0 * sum(allc) / max(1, len(allc)), {f: 100.0 * sum(v) / len(v) for f, v in correct.items()},
            len(allc))


def train_multitask(session: Session, log=print) -> tuple[LoraSet, list]:
    """One LoRA on all training policies with the policy in the prompt; same sampler/budget as SFT."""
    cfg = session.cfg
    data: TaskData = session.train  # type: ignore[assignment]
    torch.manual_seed(cfg.seed)
    lora = LoraSet(session.model, session.target_names, 1, cfg.rank, cfg.lora_alpha).to(cfg.device)
    opt = torch.optim.AdamW(lora.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history, ema = [], None
    budget = TimeBudget(cfg.time_budget_s)
    for step in tqdm(range(cfg.steps), desc="multitask_lora", unit="step", mininterval=5):
        if budget.exhausted():
            log(f"time budget reached at step {step}")
            break
        rng = random.Random(cfg.seed * 1_000_003 + step)
        items = sample_batch(data, rng, cfg.policies_per_step, cfg.examples_per_policy, cfg.contrastive)
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(step, cfg.lr, cfg.steps, cfg.warmup)
        with apply_lora(session.model, lora.adapters(), scale=lora.scale, rows=torch.zeros(len(items), dtype=torch.long)):
            logits, ans = session.forward_options(session.train_states, items)
        loss = nn.functional.cross_entropy(logits, ans)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora.parameters(), cfg.grad_clip)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % 10 == 0:
            history.append({"step": step + 1, "t": round(budget.elapsed(), 1), "loss": round(ema, 4)})
    return lora, history
