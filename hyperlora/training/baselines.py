"""Baselines trained with the same data path, targets, loss and budget as the hypernetwork.

  oracle_lora     one LoRA per held-out policy, trained on part of that policy's examples (the ceiling a
                  hypernetwork could reach for that policy); all of a split's oracles train together as a
                  batch of per-row adapters.
  multitask_lora  one LoRA trained on every training policy with the policy in the prompt (system turn):
                  the fine-tuned "read the policy from the prompt" alternative.
Both adapt the same modules (target types in the last n_upper layers) at the same rank as the hypernetwork.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from hyperlora.training.data import Item, TaskData, sample_batch
from hyperlora.adapters.functional import apply_lora
from hyperlora.training.session import Session


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
        from safetensors.torch import save_file

        state = {}
        for n, a, b in zip(self.names, self.a, self.b):
            state[f"{n}.lora_A"] = a.detach().contiguous()
            state[f"{n}.lora_B"] = b.detach().contiguous()
        save_file(state, str(path), metadata={"scale": str(self.scale), "meta": json.dumps(meta or {})})

    @classmethod
    def load(cls, path: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, dict]:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
            keys = list(f.keys())
            out = {}
            for k in keys:
                if k.endswith(".lora_A"):
                    n = k[: -len(".lora_A")]
                    out[n] = (f.get_tensor(k), f.get_tensor(n + ".lora_B"))
        return out, float(md.get("scale", 1.0)), json.loads(md.get("meta", "{}"))


def _split_items(items: Sequence[Item], frac: float, rng: random.Random) -> tuple[list[Item], list[Item]]:
    """Per-answer stratified split of one task's examples into (train, test)."""
    by: dict[int, list[Item]] = {}
    for it in items:
        by.setdefault(it.answer, []).append(it)
    tr, te = [], []
    for lst in by.values():
        lst = list(lst)
        rng.shuffle(lst)
        k = max(1, int(round(frac * len(lst))))
        tr += lst[:k]
        te += lst[k:]
    return tr, te


def train_oracles(session: Session, split_name: str, task_ids: Sequence[int], log=print
                  ) -> tuple[LoraSet, dict[int, list[Item]], dict[int, list[Item]], float]:
    """One LoRA per task of one eval split, trained jointly (row -> its task's adapter).

    Returns (loras, train items per task, test items per task, seconds)."""
    cfg = session.cfg
    data = session.evals[split_name]
    states = session.eval_states[split_name]
    rng = random.Random(cfg.seed)
    tr, te = {}, {}
    for t in task_ids:
        tr[t], te[t] = _split_items(data.items[t], cfg.oracle_train_fraction, rng)
    torch.manual_seed(cfg.seed)
    loras = LoraSet(session.model, session.target_names, len(task_ids), cfg.rank, cfg.lora_alpha).to(cfg.device)
    opt = torch.optim.AdamW(loras.parameters(), lr=cfg.oracle_lr)
    t0 = time.time()
    per = cfg.examples_per_policy * 2
    for step in range(cfg.oracle_steps):
        items, rows = [], []
        for k, t in enumerate(task_ids):
            pick = [rng.choice(tr[t]) for _ in range(per)]
            items += pick
            rows += [k] * len(pick)
        with apply_lora(session.model, loras.adapters(), scale=loras.scale, rows=torch.tensor(rows)):
            logits, ans = session.forward_options(states, items)
        loss = nn.functional.cross_entropy(logits, ans)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    secs = time.time() - t0
    log(f"oracle_lora[{split_name}]: {len(task_ids)} policies, {cfg.oracle_steps} steps, {secs:.0f} s, "
        f"final loss {loss.item():.3f}")
    return loras, tr, te, secs


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
    from tqdm import tqdm

    from hyperlora.training.sft import _lr_at

    history, ema = [], None
    t0 = time.time()
    for step in tqdm(range(cfg.steps), desc="multitask_lora", unit="step", mininterval=5):
        if cfg.time_budget_s and time.time() - t0 > cfg.time_budget_s:
            log(f"time budget reached at step {step}")
            break
        rng = random.Random(cfg.seed * 1_000_003 + step)
        items = sample_batch(data, rng, cfg.policies_per_step, cfg.examples_per_policy, cfg.contrastive)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        with apply_lora(session.model, lora.adapters(), scale=lora.scale, rows=torch.zeros(len(items), dtype=torch.long)):
            logits, ans = session.forward_options(session.train_states, items)
        loss = nn.functional.cross_entropy(logits, ans)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora.parameters(), cfg.grad_clip)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % 10 == 0:
            history.append({"step": step + 1, "t": round(time.time() - t0, 1), "loss": round(ema, 4)})
    return lora, history
