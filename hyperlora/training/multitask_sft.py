"""The fair multi-task baseline (issue 20, item 4): one LoRA on every layer's projections that reads the policy
from the system turn and is trained to *reply* with the answer and end the turn.

What a user would build instead of hyperlora: fine-tune one model to follow policies written in its prompt.
Unlike ``baselines.train_multitask`` (option choice at the first answer token, the last ``n_upper`` layers on
cached states), this trainer runs the whole model on (policy, record, answer) sequences and minimises the
cross-entropy of the answer's tokens and the end-of-turn marker (plain SFT), so its greedy replies are the
label. Each step samples ``policies_per_step`` training policies, a wording of each (the policy or one of its
paraphrases), and ``examples_per_policy`` records of each. Free-text tasks with a reference reply train on that
reply. Checkpoints every ``save_every`` steps to ``<out>/checkpoint`` (``training/checkpointing.py``) and resumes
from there; the adapter is ``<out>/multitask_lora.safetensors`` (``baselines.save_lora_file``), which
``hyperlora eval --multitask-lora`` reads.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from hyperlora.adapters.functional import apply_lora
from hyperlora.modeling.padding import pad_ids
from hyperlora.modeling.prompts import prompt_text, target_text
from hyperlora.tasks.format import PolicyTask
from hyperlora.training.baselines import LoraSet
from hyperlora.training.checkpointing import load_checkpoint, save_checkpoint
from hyperlora.training.config import TrainConfig
from hyperlora.training.schedule import TimeBudget, warmup_cosine_lr

__all__ = ["LORA_FILE", "all_layer_targets", "sft_pairs", "train_multitask_sft"]

LORA_FILE = "multitask_lora.safetensors"


def all_layer_targets(model: nn.Module, types: Sequence[str], n_upper: int) -> list[str]:
    """Full names of the ``types`` Linear modules in the last ``n_upper`` decoder layers, in layer order."""
    layers = model.model.layers
    start = len(layers) - int(n_upper)
    out = []
    for li in range(start, len(layers)):
        for name, m in layers[li].named_modules():
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in types:
                out.append(f"model.layers.{li}.{name}")
    if not out:
        raise ValueError(f"no {list(types)} Linear modules in the last {n_upper} layers of this model")
    return out


def sft_pairs(tasks: Sequence[PolicyTask]) -> list[tuple[int, int]]:
    """(task index, example index) of every example with an answer to train on (free text without one: none)."""
    return [(ti, ei) for ti, t in enumerate(tasks) for ei, ex in enumerate(t.examples) if ex.answer]


def _batch(tok: Any, tasks: Sequence[PolicyTask], picks: Sequence[tuple[str, int, int]]
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 outside the answer + end of turn) for
    (policy wording, task, example) picks."""
    seqs, labels = [], []
    for policy, ti, ei in picks:
        ex = tasks[ti].examples[ei]
        p = tok(prompt_text(tok, ex.input, policy, "system"), add_special_tokens=False)["input_ids"]
        a = tok(target_text(tok, ex.answer), add_special_tokens=False)["input_ids"]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    ids, mask = pad_ids(seqs, tok.pad_token_id or 0)
    lab, _ = pad_ids(labels, -100)
    return ids, mask, lab


def train_multitask_sft(model: nn.Module, tok: Any, tasks: Sequence[PolicyTask], cfg: TrainConfig, out: str | Path,
                        log: Callable[[str], None] = print, resume: bool = True) -> tuple[LoraSet, list]:
    """Train the fair multi-task LoRA on ``tasks`` (see the module docstring); returns (lora, history)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for p in model.parameters():
        p.requires_grad_(False)
    names = all_layer_targets(model, cfg.target_modules, cfg.n_upper)
    torch.manual_seed(cfg.seed)
    lora = LoraSet(model, names, 1, cfg.rank, cfg.lora_alpha).to(cfg.device)
    params = dict(lora.named_parameters())
    opt = torch.optim.AdamW(lora.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def load_weights(d: Path) -> None:
        state = load_file(str(d / LORA_FILE))
        with torch.no_grad():
            for n, a, b in zip(lora.names, lora.a, lora.b):
                a.copy_(state[f"{n}.lora_A"])
                b.copy_(state[f"{n}.lora_B"])

    def save_weights(d: Path) -> None:
        lora.save(d / LORA_FILE, {"config": cfg.recipe()})

    start, elapsed, history = load_checkpoint(out, load_weights, opt, params) if resume else (0, 0.0, [])
    if start:
        log(f"resumed at step {start} ({elapsed:.0f} s trained)")
    by_task: dict[int, list[int]] = {}
    for ti, ei in sft_pairs(tasks):
        by_task.setdefault(ti, []).append(ei)
    usable = sorted(by_task)
    if not usable:
        raise ValueError("no training example has an answer to train on")
    log(f"multitask_sft: {len(usable)} policies, {sum(map(len, by_task.values()))} examples, {len(names)} modules, "
        f"rank {cfg.rank}")
    budget = TimeBudget(cfg.time_budget_s, elapsed_s=elapsed)
    model.train(False)  # no dropout: the LoRA factors are the only thing that learns
    ema = None
    step = start
    for step in tqdm(range(start, cfg.steps), desc="multitask_sft", unit="step", mininterval=10,
                     initial=start, total=cfg.steps):
        if budget.exhausted():
            log(f"time budget reached at step {step}")
            break
        rng = random.Random(cfg.seed * 1_000_003 + step)
        picks = []
        for ti in rng.sample(usable, min(cfg.policies_per_step, len(usable))):
            t = tasks[ti]
            for ei in rng.sample(by_task[ti], min(cfg.examples_per_policy, len(by_task[ti]))):
                picks.append((rng.choice([t.policy, *t.paraphrases]), ti, ei))
        ids, mask, lab = _batch(tok, tasks, picks)
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(step, cfg.lr, cfg.steps, cfg.warmup)
        with apply_lora(model, lora.adapters(), scale=lora.scale, rows=torch.zeros(len(picks), dtype=torch.long)):
            logits = model(input_ids=ids.to(cfg.device), attention_mask=mask.to(cfg.device)).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), lab[:, 1:].flatten().to(cfg.device),
                                           ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(lora.parameters(), cfg.grad_clip)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % 10 == 0:
            history.append({"step": step + 1, "t": round(budget.elapsed(), 1), "loss": round(ema, 4)})
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_checkpoint(out, save_weights, opt, params, step + 1, budget.elapsed(), cfg.recipe(), history)
    else:
        step = cfg.steps
    save_checkpoint(out, save_weights, opt, params, step, budget.elapsed(), cfg.recipe(), history)
    lora.save(out / LORA_FILE, {"config": cfg.recipe(), "steps": step, "seconds": round(budget.elapsed(), 1)})
    return lora, history
