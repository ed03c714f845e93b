"""The oracle LoRA: one LoRA trained on one policy's own examples, with no policy in the prompt. The ceiling a
policy-to-adapter model could reach for that policy, and the one trainer of it: ``hyperlora eval``'s oracle
condition, ``hyperlora train --method oracle_lora`` (`train_oracles`) and the reconstruction library
(``training/reconstruct.py: build_library``) all call `train_policy_lora`.
"""
from __future__ import annotations

import math
import random
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from hyperlora.adapters.adapter_set import AdapterSet
from hyperlora.adapters.functional import apply_lora
from hyperlora.modeling.layer_split import LayerSplit
from hyperlora.modeling.padding import pad_ids, pad_right
from hyperlora.modeling.prompts import prompt_text, target_text
from hyperlora.modeling.targets import layer_index, module_type_of
from hyperlora.tasks.format import Example
from hyperlora.training.data import Item, TaskData
from hyperlora.training.schedule import warmup_cosine_lr
from hyperlora.training.session import Session

__all__ = ["train_policy_lora", "train_oracles", "stack_adapters"]


def _linear_targets(model: nn.Module, types: Sequence[str]) -> dict[str, nn.Linear]:
    out = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and module_type_of(n) in types}
    if not out:
        raise ValueError(f"no nn.Linear modules of types {list(types)} in {type(model).__name__}")
    return out


def _lower_split(model: nn.Module, targets: Sequence[str]) -> Any:
    """A ``modeling.layer_split.LayerSplit`` at the lowest adapted layer when it is worth it (Llama family, start > 0)."""
    layers = [layer_index(n) for n in targets]
    if not layers or any(x is None for x in layers) or min(layers) == 0:
        return None
    try:
        return LayerSplit(model, min(layers))
    except (TypeError, ValueError):
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
    if steps <= 0:
        raise ValueError(f"train_policy_lora needs steps > 0, got {steps}")
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
        idx = [x for x in (layer_index(n) for n in targets) if x is not None]
        if n_upper is not None and idx:
            lo = max(idx) + 1 - n_upper
            targets = {n: m for n, m in targets.items() if (layer_index(n) or 0) >= lo}
    params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for n, m in targets.items():
        a = (torch.rand(1, rank, m.in_features, generator=g) * 2 - 1) / math.sqrt(m.in_features)
        params[n] = (a.to(dev).requires_grad_(), torch.zeros(1, m.out_features, rank, device=dev, requires_grad=True))
    opt = torch.optim.AdamW([t for ab in params.values() for t in ab], lr=lr, weight_decay=0.0)
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
    split = _lower_split(model, list(targets)) if cache_lower else None
    cached: list[torch.Tensor] = []
    if split is not None:  # states entering layer `start` never depend on the adapter: compute them once
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
        keep = max(len(t) for _, t in batch) + 1  # logits only where targets are predicted (vocab is large)
        ids, mask = pad_ids(seqs, pad, side="left")  # left padding: every row ends at the last position
        labels = torch.full((len(seqs), keep), -100, dtype=torch.long)
        for i, (_, t) in enumerate(batch):
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
    for step in range(steps):
        for group in opt.param_groups:  # warmup 5, cosine to 0 over all steps (LambdaLR's numbers, bit for bit)
            group["lr"] = warmup_cosine_lr(step, lr, steps, 5, floor=0.0, overlap=True, angle_pi_step_first=True)
        pick = [rng.randrange(len(enc)) for _ in range(batch_size)]
        with apply_lora(model, params, scale=scale, rows=torch.zeros(batch_size, dtype=torch.long)):
            loss = loss_upper(pick) if split is not None else loss_full(pick)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.train(was_training)
    return AdapterSet({n: (a.detach(), b.detach() * scale) for n, (a, b) in params.items()}, 1.0)


def stack_adapters(sets: Sequence[AdapterSet]) -> AdapterSet:
    """P=1 adapter sets with their scales folded in (what `train_policy_lora` returns), on the same modules,
    concatenated into one set of len(sets) adapters (scale 1)."""
    if not sets:
        raise ValueError("no adapters to stack")
    names = list(sets[0].modules)
    for s in sets[1:]:
        if list(s.modules) != names or float(s.scale) != 1.0:
            raise ValueError("stack_adapters needs P=1 sets on the same modules with their scale folded in (1.0)")
    return AdapterSet({n: (torch.cat([s.modules[n][0] for s in sets]), torch.cat([s.modules[n][1] for s in sets]))
                       for n in names}, 1.0)


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


def _item_examples(data: TaskData, task: int, tokenizer: Any) -> dict[int, Example]:
    """id(item) -> the task example it was built from (`build_task_data` keeps the usable examples in order)."""
    items = data.items[task]
    out: dict[int, Example] = {}
    k = 0
    for ex in data.tasks[task].examples:
        if k >= len(items):
            break
        it = items[k]
        if (ex.options is not None and ex.answer in ex.options and len(ex.options) == len(it.option_ids)
                and ex.options.index(ex.answer) == it.answer
                and prompt_text(tokenizer, ex.input) == data.records[it.record]):
            out[id(it)] = ex
            k += 1
    if k != len(items):
        raise ValueError(f"task {task}: {len(items) - k} of its records match none of its examples "
                         f"(oracle_lora needs task data built without the policy in the prompt)")
    return out


def train_oracles(session: Session, split_name: str, task_ids: Sequence[int], log: Callable[[str], None] = print
                  ) -> tuple[AdapterSet, dict[int, list[Item]], dict[int, list[Item]], float]:
    """`hyperlora train --method oracle_lora`: one `train_policy_lora` per task of one eval split, on the
    session's target modules at its rank, trained on a per-answer stratified `oracle_train_fraction` of the
    task's records (`oracle_steps` steps at `oracle_lr`, seed `seed + k` for the k-th task).

    Returns (the adapters stacked in task_ids order, scale folded in; train items per task; test items per
    task; seconds)."""
    cfg = session.cfg
    data = session.evals[split_name]
    rng = random.Random(cfg.seed)
    tr, te = {}, {}
    for t in task_ids:
        tr[t], te[t] = _split_items(data.items[t], cfg.oracle_train_fraction, rng)
    t0 = time.time()
    sets = []
    for k, t in enumerate(task_ids):
        examples = _item_examples(data, t, session.tokenizer)
        sets.append(train_policy_lora(session.model, session.tokenizer, [examples[id(it)] for it in tr[t]],
                                      rank=cfg.rank, alpha=cfg.lora_alpha, module_names=session.target_names,
                                      steps=cfg.oracle_steps, lr=cfg.oracle_lr, seed=cfg.seed + k,
                                      bf16=bool(cfg.bf16)))
    secs = time.time() - t0
    log(f"oracle_lora[{split_name}]: {len(task_ids)} policies, {cfg.oracle_steps} steps each, {secs:.0f} s")
    return stack_adapters(sets), tr, te, secs
