"""End-to-end SFT of the hypernetwork through the frozen base model (upper layers only), and a quick eval.

One step: sample `policies_per_step` training policies (one random paraphrase each) and
`examples_per_policy` records per policy (balanced over answers; a `contrastive` share reuses records drawn
for another policy of the batch), encode the policy texts, generate one adapter per policy, run the cached
records through the adapted upper layers with per-row adapters, and take the cross-entropy of a softmax over
each record's own options (first-token logits at the answer position).
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from hyperlora._io import atomic_dir
from hyperlora.adapters.functional import adapters_from_generated, apply_lora
from hyperlora.hypernets.t2l.hypernet import HyperNetwork
from hyperlora.hypernets.t2l.text_encoders import PolicyTextEncoder
from hyperlora.tasks.generator import generate_tasks
from hyperlora.tasks.word_swap import swap_answer_words
from hyperlora.training.checkpointing import init_from, load_checkpoint, save_checkpoint
from hyperlora.training.data import Item, TaskData, sample_batch, spread_over_families
from hyperlora.training.relabel import augment_with_relabels
from hyperlora.training.schedule import TimeBudget, warmup_cosine_lr
from hyperlora.training.session import Session


def build_hypernet(session: Session, task_emb_dim: int) -> HyperNetwork:
    """A HyperNetwork for the session's target modules in the last n_upper layers only."""
    cfg = session.cfg
    hcfg = HyperNetwork.config_for_model(session.model, rank=cfg.rank, target_modules=tuple(cfg.target_modules),
                                         latent_dim=cfg.latent_dim, hidden_dim=cfg.hidden_dim,
                                         task_proj_dim=cfg.task_proj_dim, trunk_layers=cfg.trunk_layers,
                                         lora_alpha=cfg.lora_alpha, task_emb_dim=task_emb_dim,
                                         encoder=f"hyperlora:{cfg.encoder}")
    keep = set(session.target_names)
    for t in list(hcfg.module_names):
        pairs = [(n, i) for n, i in zip(hcfg.module_names[t], hcfg.layer_indices[t]) if n in keep]
        hcfg.module_names[t] = [n for n, _ in pairs]
        hcfg.layer_indices[t] = [i for _, i in pairs]
    hcfg.validate()
    return HyperNetwork(hcfg)


def _generate(hn: HyperNetwork, emb: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return adapters_from_generated(hn.generate(emb), hn.config.module_names)


def hypernet_step_loss(session: Session, hn: HyperNetwork, enc: PolicyTextEncoder, items: Sequence[Item],
                       texts: Sequence[str], task_of_row: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean option cross-entropy and accuracy of one batch. texts[p]: policy text of adapter p; task_of_row [N]."""
    emb = enc.encode(texts)
    p_drop = float(getattr(session.cfg, "emb_dropout", 0.0))
    if p_drop > 0.0:  # regularizer against memorizing the training policies' embeddings
        emb = nn.functional.dropout(emb, p=p_drop, training=True)
    adapters = _generate(hn, emb)
    with apply_lora(session.model, adapters, scale=hn.config.scale, rows=task_of_row):
        logits, ans = session.forward_options(session.train_states, items)
    loss = nn.functional.cross_entropy(logits, ans)
    acc = (logits.argmax(-1) == ans).float().mean().item()
    return loss, acc


@torch.no_grad()
def quick_eval(session: Session, hn: HyperNetwork, enc: PolicyTextEncoder, max_tasks: int = 16,
               seed: int = 0, batch_rows: int = 64) -> dict[str, Any]:
    """quick_eval_with for a HyperNetwork and its policy encoder."""
    return quick_eval_with(session, lambda texts: (_generate(hn, enc.encode(texts)), hn.config.scale),
                           max_tasks, seed, batch_rows)


@torch.no_grad()
def quick_eval_with(session: Session, generate: Callable[[Sequence[str]], tuple[Any, Any]], max_tasks: int = 16,
                    seed: int = 0, batch_rows: int = 64) -> dict[str, Any]:
    """Accuracy (first-token option choice, %) per held-out split: generated vs generated_shuffled (the adapter
    of another task in the same split), and per family. No policy text in the prompt.

    generate: policy texts -> (adapters {module name: (A [P, R, d_in], B [P, d_out, R])}, scale)."""
    out: dict[str, Any] = {}
    rng = random.Random(seed)
    for name, data in session.evals.items():
        tasks = spread_over_families(data, max_tasks)
        if len(tasks) < 2:
            continue
        texts = [data.tasks[t].policy for t in tasks]
        perm = list(range(len(tasks)))
        while any(i == p for i, p in enumerate(perm)):
            rng.shuffle(perm)
        res: dict[str, Any] = {}
        for cond, order in (("generated", list(range(len(tasks)))), ("generated_shuffled", perm)):
            adapters, scale = generate([texts[i] for i in order])
            correct: dict[str, list[int]] = {}
            rows = [(k, it) for k, t in enumerate(tasks) for it in data.items[t]]
            for s in range(0, len(rows), batch_rows):
                chunk = rows[s:s + batch_rows]
                with apply_lora(session.model, adapters, scale=scale, rows=torch.tensor([k for k, _ in chunk])):
                    logits, ans = session.forward_options(session.eval_states[name], [it for _, it in chunk])
                ok = (logits.argmax(-1) == ans).tolist()
                for (k, it), o in zip(chunk, ok):
                    fam = data.tasks[it.task].family or "tasks"
                    correct.setdefault(fam, []).append(int(o))
            allc = [o for v in correct.values() for o in v]
            res[cond] = round(100.0 * sum(allc) / len(allc), 1)
            res[cond + "_families"] = {f: round(100.0 * sum(v) / len(v), 1) for f, v in correct.items()}
        res["n"] = sum(len(data.items[t]) for t in tasks)
        out[name] = res
    return out


def _save_weights(hn: HyperNetwork, enc: PolicyTextEncoder) -> Callable[[Path], None]:
    def save(d: Path) -> None:
        hn.save_pretrained(d)
        enc.save(d)
    return save


def _load_weights(hn: HyperNetwork, enc: PolicyTextEncoder) -> Callable[[Path], None]:
    def load(d: Path) -> None:
        hn.load_state_dict(load_file(str(d / "hypernet.safetensors")))
        if enc.module is not None:
            enc.module.load_state_dict(load_file(str(d / "policy_encoder.safetensors")))
    return load


def save_training_state(out: Path, hn: HyperNetwork, enc: PolicyTextEncoder, opt: torch.optim.Optimizer,
                        params: dict[str, nn.Parameter], step: int, elapsed: float, cfg: Any, history: list) -> None:
    """Checkpoint (`checkpointing.save_checkpoint`, atomic): hypernetwork (save_pretrained), encoder, optimizer
    moments, step/time/recipe JSON."""
    save_checkpoint(out, _save_weights(hn, enc), opt, params, step, elapsed, cfg.recipe(), history)


def optimizer_and_state(out: Path, hn: HyperNetwork, enc: PolicyTextEncoder, cfg, resume: bool, log=print
                        ) -> tuple[torch.optim.Optimizer, dict[str, nn.Parameter], int, float, list]:
    """AdamW over the hypernetwork (+ a trainable encoder), resumed from `<out>/checkpoint` if asked and present,
    else initialised from `cfg.init_hypernet` when set. Returns (opt, params, step, elapsed_s, history)."""
    params = {f"hn.{k}": p for k, p in hn.named_parameters()}
    if enc.module is not None:
        params.update({f"enc.{k}": p for k, p in enc.module.named_parameters()})
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, elapsed, history = load_checkpoint(out, _load_weights(hn, enc), opt, params) if resume else (0, 0.0, [])
    if step:
        log(f"resumed from {out / 'checkpoint'} at step {step} ({elapsed:.0f} s trained)")
    elif cfg.init_hypernet:  # e.g. a reconstruction run's <out>/final
        init_from(hn, enc, cfg.init_hypernet, log=log)
    return opt, params, step, elapsed, history


def policy_batch(data: TaskData, cfg, step: int) -> tuple[list[Item], list[str], torch.Tensor]:
    """The batch of training step `step` (seeded by it, so a resumed run sees the same batches): items, one
    random paraphrase per distinct task, and each item's row -> adapter index."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    items = sample_batch(data, rng, cfg.policies_per_step, cfg.examples_per_policy, cfg.contrastive)
    tasks = list(dict.fromkeys(it.task for it in items))
    texts = [rng.choice(data.tasks[t].texts()) for t in tasks]
    return items, texts, torch.tensor([tasks.index(it.task) for it in items])


def swap_some_words(tasks: list, share: float, seed: int, log=print) -> list:
    """``tasks`` with a seeded ``share`` of them rewritten to training-only answer words (others unchanged)."""
    rng = random.Random(f"word-swap|{seed}")
    pick = set(rng.sample(range(len(tasks)), round(share * len(tasks))))
    out, n = [], 0
    for i, t in enumerate(tasks):
        s = swap_answer_words(t, rng) if i in pick else None
        n += s is not None
        out.append(s or t)
    log(f"answer words swapped for training-only words in {n} of {len(tasks)} extra policies")
    return out


def relabel_training_data(session: Session, log=print) -> TaskData:
    """The session's training data with `relabel_per_task` relabelled records per topic/routing policy (and
    `extra_policies_per_family` more such policies trained only on relabelled records), added once."""
    cfg = session.cfg
    data: TaskData = session.train  # type: ignore[assignment]
    if cfg.relabel_per_task > 0 and not getattr(data, "_relabelled", False):
        extra = []
        if cfg.extra_policies_per_family > 0:
            own = {t.policy for t in data.tasks}
            for fam in ("topic", "routing"):
                if fam in cfg.families:
                    extra += [t for t in generate_tasks(fam, "train", cfg.extra_policies_per_family,
                                                        seed=cfg.suite_seed + 1, examples_per_task=8, strict=False)
                              if t.policy not in own]
            if cfg.extra_word_swap > 0:
                extra = swap_some_words(extra, cfg.extra_word_swap, cfg.seed, log)
        augment_with_relabels(data, cfg.relabel_per_task, cfg.seed, log=log, extra_tasks=extra,
                              tokenizer=session.tokenizer)
        data._relabelled = True  # type: ignore[attr-defined]
    return data


def train_sft(session: Session, log=print, resume: bool = True) -> tuple[HyperNetwork, PolicyTextEncoder, list]:
    """SFT of a fresh (or `init_hypernet`) HyperNetwork on the session's training policies (module docstring);
    resumes from ``<out>/checkpoint``. Returns (hypernetwork, encoder, history)."""
    cfg = session.cfg
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    enc = PolicyTextEncoder(cfg.encoder, session.model, session.tokenizer, layer=cfg.encoder_layer,
                            n_queries=cfg.encoder_queries)
    data = relabel_training_data(session, log)
    # Precompute frozen text features of every policy text once.
    all_texts = [txt for t in data.usable_tasks for txt in data.tasks[t].texts()]
    all_texts += [d.tasks[t].policy for d in session.evals.values() for t in d.usable_tasks]
    if cfg.encoder == "minilm":
        enc.encode(all_texts)
    else:
        enc.token_states(all_texts)
    torch.manual_seed(cfg.seed)
    hn = build_hypernet(session, enc.dim).to(cfg.device)
    if enc.module is not None:
        enc.module.to(cfg.device)
    opt, params, step, elapsed, history = optimizer_and_state(out, hn, enc, cfg, resume, log)
    n_params = sum(p.numel() for p in params.values())
    log(f"hypernetwork: {n_params / 1e6:.2f}M trainable parameters, {len(session.target_names)} target modules "
        f"(layers {session.split.start}..{len(session.split.layers) - 1}), encoder {cfg.encoder} ({enc.dim}-d)")
    bar = tqdm(total=cfg.steps, initial=step, desc="sft", unit="step", mininterval=5)
    ema_loss, ema_acc = None, None
    best_gap = -math.inf
    budget = TimeBudget(cfg.time_budget_s, elapsed)
    while step < cfg.steps:
        if budget.exhausted():
            log(f"time budget {cfg.time_budget_s:.0f} s reached at step {step}")
            break
        items, texts, row = policy_batch(data, cfg, step)
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(step, cfg.lr, cfg.steps, cfg.warmup)
        loss, acc = hypernet_step_loss(session, hn, enc, items, texts, row)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        opt.step()
        step += 1
        lv = loss.item()
        ema_loss = lv if ema_loss is None else 0.95 * ema_loss + 0.05 * lv
        ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.2f}", refresh=False)  # mininterval applies
        if step % 10 == 0:
            history.append({"step": step, "t": round(budget.elapsed(), 1), "loss": round(ema_loss, 4),
                            "acc": round(ema_acc, 3)})
        if cfg.eval_every and step % cfg.eval_every == 0 and session.evals:
            ev = quick_eval(session, hn, enc, cfg.eval_tasks_per_split)
            history.append({"step": step, "t": round(budget.elapsed(), 1), "eval": ev})
            log(f"step {step} t={budget.elapsed():.0f}s eval: " + json.dumps(
                {k: (v["generated"], v["generated_shuffled"]) for k, v in ev.items()}))
            gap = sum(v["generated"] - v["generated_shuffled"] for v in ev.values())
            if cfg.save_best and gap > best_gap:  # early stopping: keep the best held-out snapshot
                best_gap = gap
                with atomic_dir(out / "best") as tmp:
                    _save_weights(hn, enc)(tmp)
                    (tmp / "eval.json").write_text(json.dumps({"step": step, "eval": ev}, indent=1))
                log(f"step {step}: new best held-out gap {gap:+.1f} -> {out / 'best'}")
        if cfg.save_every and step % cfg.save_every == 0:
            save_training_state(out, hn, enc, opt, params, step, budget.elapsed(), cfg, history)
    bar.close()
    save_training_state(out, hn, enc, opt, params, step, budget.elapsed(), cfg, history)
    return hn, enc, history
