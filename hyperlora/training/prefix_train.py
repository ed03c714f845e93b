"""Train the reply-prefix head (``hyperlora/reply_prefix.py``) of a trained policy reader.

    hyperlora train --method reply_prefix --config hyperlora/training/configs/reply_prefix_cpu.json

Data: the training split's policies of every family (their paraphrases too). A free-text task whose reference
replies share a prefix built on a policy word is labelled with that template and word (``derive_template``);
every other task (choice families, sign-off rules) is labelled "no prefix rule". The head reads the reader's own
gate-layer states of the policy, so the base model runs once per policy text (~1-2 min on one thread); the head
itself trains in seconds. The output directory is the reader (copied from ``reader_init``) plus the head.
"""
from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from hyperlora.reply_prefix import ReplyPrefixHead, derive_template, policy_words, token_spans, word_features
from hyperlora.tasks.format import PolicyTask


def _label(task: PolicyTask) -> tuple[str, str] | None:
    if task.examples and task.examples[0].check is not None:
        return derive_template(task.policy, [ex.answer for ex in task.examples])
    return None


def build_examples(tasks: Sequence[PolicyTask], features: Any, tokenizer: Any
                   ) -> tuple[list[dict[str, Any]], list[str]]:
    """Per policy text: states, word features, template class (0 = none) and word index (-1 = no pointer target)."""
    labels = [_label(t) for t in tasks]
    templates = sorted({lab[0] for lab in labels if lab})
    texts, meta = [], []
    for t, lab in zip(tasks, labels):
        for text in [t.policy, *t.paraphrases]:
            texts.append(text)
            meta.append(lab)
    feats = features(texts)
    out = []
    for text, lab, f in zip(texts, meta, feats):
        words = policy_words(text)
        spans = token_spans(tokenizer, f["ids"].tolist())
        cls = 0 if lab is None else 1 + templates.index(lab[0])
        widx = -1
        if lab is not None:
            widx = next((i for i, (w, _, _) in enumerate(words) if w == lab[1]), -1)
        out.append({"text": text, "h": f["h"], "spans": spans, "words": word_features(f["h"], spans, words),
                    "cls": cls, "word": widx})
    return out, templates


def fit_head(examples: Sequence[dict[str, Any]], templates: Sequence[str], *, epochs: int = 60, lr: float = 3e-3,
             seed: int = 0, log: Callable[[str], None] = print) -> ReplyPrefixHead:
    """Cross-entropy on the template class plus, for prefix rules, on the pointer to the fill word."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    head = ReplyPrefixHead(examples[0]["h"].shape[-1], templates)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    order = list(range(len(examples)))
    for ep in range(epochs):
        rng.shuffle(order)
        tot = 0.0
        for s in range(0, len(order), 32):
            loss = torch.zeros(())
            for i in order[s:s + 32]:
                e = examples[i]
                cl, wl = head(e["h"], e["words"])
                loss = loss + nn.functional.cross_entropy(cl[None], torch.tensor([e["cls"]]))
                if e["word"] >= 0:
                    loss = loss + nn.functional.cross_entropy(wl[None], torch.tensor([e["word"]]))
            opt.zero_grad()
            (loss / len(order[s:s + 32])).backward()
            opt.step()
            tot += float(loss.detach())
        if ep % 10 == 0 or ep == epochs - 1:
            log(f"reply-prefix head epoch {ep}: loss {tot / len(order):.4f}")
    return head.eval()


def prefix_accuracy(head: ReplyPrefixHead, tasks: Sequence[PolicyTask], features: Any, tokenizer: Any
                    ) -> dict[str, float]:
    """On tasks' main policy texts: share of prefix rules whose exact prefix is predicted, and share of other
    tasks wrongly given a prefix."""
    hit = n_rule = false_pos = n_other = 0
    for t, f in zip(tasks, features([t.policy for t in tasks])):
        lab = _label(t)
        pred = head.predict(t.policy, f["h"], token_spans(tokenizer, f["ids"].tolist()))
        if lab is None:
            n_other += 1
            false_pos += pred is not None
        else:
            n_rule += 1
            hit += pred == lab[0].replace("{w}", lab[1])
    return {"prefix_exact": round(100 * hit / max(1, n_rule), 1), "n_prefix_rules": n_rule,
            "false_prefix": round(100 * false_pos / max(1, n_other), 1), "n_other": n_other}


def train_reply_prefix(cfg: Any, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    from hyperlora.models import load_base_model
    from hyperlora.reader import PolicyFeatures, PolicyReader
    from hyperlora.tasks.generator import SPLITS, generate_tasks

    if not cfg.reader_init:
        raise ValueError("--method reply_prefix needs reader_init: the trained reader directory to add the head to")
    t0 = time.time()
    model, tok = load_base_model(cfg.base_model)
    reader = PolicyReader.from_pretrained(cfg.reader_init, model)
    features = PolicyFeatures(model, tok, reader.cfg)
    fams = list(dict.fromkeys([*cfg.families, "format"]))
    train = [t for fam in fams for t in generate_tasks(fam, "train", cfg.train_per_family, seed=cfg.suite_seed,
                                                         examples_per_task=4, strict=False)]
    log(f"reply-prefix head: reading {len(train)} training policies and their paraphrases")
    examples, templates = build_examples(train, features, tok)
    log(f"templates learned from the training replies: {templates}")
    head = fit_head(examples, templates, seed=cfg.seed, log=log)
    final = out / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(cfg.reader_init, final)
    held = {}
    for sp in SPLITS:
        if sp == "train":
            continue
        tasks = [t for fam in fams for t in generate_tasks(fam, sp, cfg.held_out_per_family, seed=cfg.suite_seed,
                                                             examples_per_task=4, strict=False)]
        held[sp] = prefix_accuracy(head, tasks, features, tok)
        log(f"{sp}: {held[sp]}")
    head.save(final, extra={"trained": {"reader_init": str(cfg.reader_init), "policies": len(train),
                                        "held_out": held}})
    return {"method": "reply_prefix", "eval": held, "templates": templates, "train_seconds": round(time.time() - t0, 1)}
