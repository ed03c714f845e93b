"""Train the rule heads of a trained policy reader: reply-prefix format rules (``hyperlora/hypernets/reader/rules/reply_format.py``)
and numeric thresholds (``hyperlora/hypernets/reader/rules/threshold.py``).

    hyperlora train --config hyperlora/training/configs/rule_heads_cpu.json

Data: the training split's policies of every family (their paraphrases too), labelled from the tasks
themselves. A free-text task whose reference replies share a prefix or an ending built on a policy word is labelled with
that template and word (``derive_template``); a two-option task decided by one record number against one
policy number with its threshold and answers (``derive_threshold``); every other task "no rule". The heads
read the reader's own gate-layer states of the policy, so the base model runs once per policy text; the
threshold probe reads the threshold training records once. ~35 min on one thread the first time (reading
~4,200 policy texts; kept under $HYPERLORA_CACHE/reader/ for the next run); the heads train in seconds.
The output directory is the reader (copied from ``reader_init``) plus both heads.
"""
from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from hyperlora.hypernets.reader.reader import PolicyFeatures, PolicyReader
from hyperlora.modeling.base_model import load_base_model
from hyperlora.modeling.capture import InputCapture
from hyperlora.modeling.padding import pad_ids
from hyperlora.modeling.prompts import prompt_text
from hyperlora.ops.precision import use_bf16
from hyperlora.hypernets.reader.rules.reply_format import ReplyPrefixHead, derive_template, policy_words, token_spans, word_features
from hyperlora.tasks.format import PolicyTask
from hyperlora.tasks.generator import SPLITS, generate_tasks
from hyperlora.hypernets.reader.rules.threshold import ThresholdHead, context_features, derive_threshold, numbers
from hyperlora.training.reply_background import write_background_records
from hyperlora.training.reader_train import read_policies_cached


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
    feats = features(texts, progress=True)
    out = []
    for text, lab, f in zip(texts, meta, feats):
        words = policy_words(text)
        spans = token_spans(tokenizer, f["ids"].tolist())
        cls = 0 if lab is None else 1 + templates.index(lab[0])
        widx = -1
        if lab is not None:
            widx = next((i for i, (w, _, _) in enumerate(words) if w == lab[1]), -1)
        out.append({"text": text, "h": f["h"], "spans": spans, "words": word_features(f["h"], spans, words),
                    "cls": cls, "word": widx, "wctx": context_features(f["h"], spans, words),
                    "nctx": context_features(f["h"], spans, numbers(text))})
    return out, templates


def threshold_labels(tasks: Sequence[PolicyTask], examples: Sequence[dict[str, Any]]) -> None:
    """Add threshold labels to `examples` (aligned with the tasks' texts, as `build_examples` orders them):
    "tcls" 1/0, and for rules the indices "tnum", "tabove", "tbelow" in that text (-1 where absent)."""
    i = 0
    for t in tasks:
        lab = derive_threshold(t)
        T = numbers(t.policy)[lab[0]][0] if lab else None
        for _ in [t.policy, *t.paraphrases]:
            e = examples[i]
            i += 1
            e["tcls"], e["tnum"], e["tabove"], e["tbelow"] = int(lab is not None), -1, -1, -1
            if lab:
                words = [w for w, _, _ in policy_words(e["text"])]
                e["tnum"] = next((k for k, (v, _, _) in enumerate(numbers(e["text"])) if v == T), -1)
                e["tabove"] = words.index(lab[1]) if lab[1] in words else -1
                e["tbelow"] = words.index(lab[2]) if lab[2] in words else -1


@torch.no_grad()
def threshold_probe(model: Any, tokenizer: Any, module: str, tasks: Sequence[PolicyTask], ridge: float = 1.0,
                    log: Callable[[str], None] = print) -> torch.Tensor:
    """Ridge read-out (no intercept: LoRA has none) of log(deciding number) from `module`'s input at the answer
    position of the threshold training tasks' records (no adapter)."""
    recs, vals = [], []
    for t in tasks:
        lab = derive_threshold(t)
        if lab:
            for e in t.examples:
                v = numbers(e.input)[lab[3]][0]
                if v > 0:
                    recs.append(e.input)
                    vals.append(math.log(v))
    if len(recs) < 8:
        raise ValueError(f"only {len(recs)} threshold training records: the probe needs threshold tasks")
    capture = InputCapture(model, {"x": module})
    store = capture.inputs
    xs = []
    try:
        for s in range(0, len(recs), 32):
            enc = [tokenizer(prompt_text(tokenizer, r), add_special_tokens=False)["input_ids"] for r in recs[s:s + 32]]
            ids, _ = pad_ids(enc, int(tokenizer.pad_token_id or 0))  # right padding: each answer position is exact
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16(None, "cpu")):
                model.model(ids)
            xs += [store["x"][j, len(e) - 1].float() for j, e in enumerate(enc)]
    finally:
        capture.remove()
    X, y = torch.stack(xs), torch.tensor(vals)
    w = torch.linalg.solve(X.T @ X + ridge * torch.eye(X.shape[1]), X.T @ y)
    log(f"threshold probe: {len(recs)} records, median |error| of log(value) {float((X @ w - y).abs().median()):.3f} (train)")
    return w


def _train(head: nn.Module, examples: Sequence[dict[str, Any]], example_loss: Callable[[nn.Module, dict], torch.Tensor],
           *, epochs: int, lr: float, seed: int, name: str, log: Callable[[str], None]) -> nn.Module:
    """Adam over shuffled batches of 32 examples, the mean of `example_loss`; logs every 20 epochs."""
    rng = random.Random(seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    order = list(range(len(examples)))
    for ep in range(epochs):
        rng.shuffle(order)
        tot = 0.0
        for s in range(0, len(order), 32):
            batch = order[s:s + 32]
            loss = sum((example_loss(head, examples[i]) for i in batch), torch.zeros(()))
            opt.zero_grad()
            (loss / len(batch)).backward()
            opt.step()
            tot += float(loss.detach())
        if ep % 20 == 0 or ep == epochs - 1:
            log(f"{name} epoch {ep}: loss {tot / len(order):.4f}")
    return head.eval()


def _ce(logits: torch.Tensor, target: int) -> torch.Tensor:
    return nn.functional.cross_entropy(logits[None], torch.tensor([target]))


def fit_threshold_head(examples: Sequence[dict[str, Any]], probe: torch.Tensor, *, epochs: int = 80, lr: float = 2e-3,
                       seed: int = 0, log: Callable[[str], None] = print) -> ThresholdHead:
    """Cross-entropy on is-threshold, and for rules on the three pointers (threshold number, both answers)."""
    torch.manual_seed(seed)
    head = ThresholdHead(examples[0]["h"].shape[-1], probe.numel())
    head.probe.copy_(probe)

    def loss(m: nn.Module, e: dict) -> torch.Tensor:
        cl, nl, al, bl = m(e["h"], e["wctx"], e["nctx"])
        out = _ce(cl, e["tcls"])
        for logits, k in ((nl, "tnum"), (al, "tabove"), (bl, "tbelow")):
            if e.get(k, -1) >= 0:
                out = out + _ce(logits, e[k])
        return out

    return _train(head, examples, loss, epochs=epochs, lr=lr, seed=seed, name="threshold head", log=log)


def fit_head(examples: Sequence[dict[str, Any]], templates: Sequence[str], *, epochs: int = 60, lr: float = 3e-3,
             seed: int = 0, log: Callable[[str], None] = print) -> ReplyPrefixHead:
    """Cross-entropy on the template class plus, for prefix rules, on the pointer to the fill word."""
    torch.manual_seed(seed)
    head = ReplyPrefixHead(examples[0]["h"].shape[-1], templates)

    def loss(m: nn.Module, e: dict) -> torch.Tensor:
        cl, wl = m(e["h"], e["words"])
        return _ce(cl, e["cls"]) + (_ce(wl, e["word"]) if e["word"] >= 0 else 0.0)

    return _train(head, examples, loss, epochs=epochs, lr=lr, seed=seed, name="reply-prefix head", log=log)


def threshold_accuracy(head: ThresholdHead, tasks: Sequence[PolicyTask], features: Any, tokenizer: Any
                       ) -> dict[str, float]:
    """On tasks' main policy texts: share of threshold rules read exactly (threshold and both answers), and
    share of other tasks wrongly read as threshold rules."""
    hit = n_rule = false_pos = n_other = 0
    for t, f in zip(tasks, features([t.policy for t in tasks])):
        lab = derive_threshold(t)
        pred = head.predict(t.policy, f["h"], token_spans(tokenizer, f["ids"].tolist()))
        if lab is None:
            n_other += 1
            false_pos += pred is not None
        else:
            n_rule += 1
            hit += pred == (numbers(t.policy)[lab[0]][0], lab[1], lab[2])
    return {"threshold_exact": round(100 * hit / max(1, n_rule), 1), "n_threshold_rules": n_rule,
            "false_threshold": round(100 * false_pos / max(1, n_other), 1)}


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


def train_rule_heads(cfg: Any, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`hyperlora train --method rule_heads`: fit both rule heads on the reader in `cfg.reader_init` and write
    ``<out>/final`` (the reader plus the heads). Returns the results dict (held-out head accuracies)."""
    if not cfg.reader_init:
        raise ValueError("--method rule_heads needs reader_init: the trained reader directory to add the heads to")
    t0 = time.time()
    model, tok = load_base_model(cfg.base_model)
    reader = PolicyReader.from_pretrained(cfg.reader_init, model)
    if "down_proj" not in reader.names:
        raise ValueError(f"the reader in {cfg.reader_init} does not adapt down_proj, which both rule heads write")
    features = PolicyFeatures(model, tok, reader.cfg)
    fams = list(dict.fromkeys([*cfg.families, "format"]))
    train = [t for fam in fams for t in generate_tasks(fam, "train", cfg.train_per_family, seed=cfg.suite_seed,
                                                         examples_per_task=cfg.train_examples_per_task, strict=False)]
    if cfg.rule_extra_threshold and "threshold" in fams:  # more (field, threshold, direction, words) combinations
        seen = {t.policy for t in train}
        more = generate_tasks("threshold", "train", cfg.train_per_family + cfg.rule_extra_threshold,
                              seed=cfg.suite_seed, examples_per_task=cfg.train_examples_per_task, strict=False)
        train += [t for t in more if t.policy not in seen]
    log(f"rule heads: reading {len(train)} training policies and their paraphrases")
    read_policies_cached(features, [x for t in train for x in (t.policy, *t.paraphrases)],
                         str(cfg.base_model or "default"))
    examples, templates = build_examples(train, features, tok)
    threshold_labels(train, examples)
    log(f"templates learned from the training replies: {templates}; "
        f"{sum(e['tcls'] for e in examples)} threshold-rule texts")
    prefix_head = fit_head(examples, templates, seed=cfg.seed, log=log)
    probe = threshold_probe(model, tok, reader.names["down_proj"], train, log=log)
    thr_head = fit_threshold_head(examples, probe, seed=cfg.seed, log=log)
    final = out / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(cfg.reader_init, final)
    held = {}
    for sp in SPLITS:
        if sp == "train":
            continue
        tasks = [t for fam in fams for t in generate_tasks(fam, sp, cfg.held_out_per_family, seed=cfg.suite_seed,
                                                             examples_per_task=8, strict=False)]
        held[sp] = {**prefix_accuracy(prefix_head, tasks, features, tok),
                    **threshold_accuracy(thr_head, tasks, features, tok)}
        log(f"{sp}: {held[sp]}")
    trained = {"reader_init": str(cfg.reader_init), "policies": len(train), "held_out": held}
    prefix_head.save(final, extra={"trained": trained})
    write_background_records(final)  # the compiler's records, shipped beside its head (serving never draws them)
    thr_head.save(final, extra={"trained": trained})
    return {"method": "rule_heads", "eval": held, "templates": templates, "train_seconds": round(time.time() - t0, 1)}
