"""`hyperlora train --method reader`: train the policy reader (hyperlora/hypernets/reader/reader.py) through the frozen base model.

Same data, batches, option loss and fast path as the SFT of the T2L-style hypernetwork (`sft.py`), plus an
auxiliary loss on the reader's signed gates where a training policy's rule is known (topic and routing
policies: +1 on the tokens of each conditional answer word in the policy text, -1 on the default answer's,
0 elsewhere). Resumable: `<out>/checkpoint/` holds the reader, the optimizer moments and the step.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from hyperlora._io import atomic_path
from hyperlora.adapters.functional import apply_lora
from hyperlora.hypernets.reader.clause_keys import clause_texts, with_clause_keys
from hyperlora.hypernets.reader.reader import PolicyFeatures, PolicyReader, ReaderConfig, module_name
from hyperlora.modeling.base_model import cache_dir
from hyperlora.modeling.capture import InputCapture
from hyperlora.modeling.layer_split import stack_cached
from hyperlora.modeling.prompts import prompt_text, target_text
from hyperlora.training.checkpointing import load_checkpoint, save_checkpoint
from hyperlora.training.data import TaskData
from hyperlora.training.relabel import _sentence_topics, infer_rule
from hyperlora.training.schedule import TimeBudget, warmup_cosine_lr
from hyperlora.training.session import Session, cached_states
from hyperlora.training.sft import policy_batch, quick_eval_with, relabel_training_data

READ_MODULES = ("o_proj", "down_proj")


@torch.no_grad()
def record_features(session: Session, names: dict[str, str], every: int = 3) -> dict[str, torch.Tensor]:
    """Inputs of the named modules at the answer position for every `every`-th cached training record."""
    capture = InputCapture(session.model, names)
    store = capture.inputs
    out: dict[str, list[torch.Tensor]] = {t: [] for t in names}
    idx = list(range(0, len(session.train.records), every))  # type: ignore[union-attr]
    try:
        for s in range(0, len(idx), 64):
            chunk = idx[s:s + 64]
            h, last = stack_cached(session.train_states, chunk, torch.float32, session.cfg.device)
            with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=session.cfg.bf16):
                session.split.upper(h, last)
            for t in names:
                x = store[t]
                out[t].append(x.reshape(len(chunk), -1, x.shape[-1])[:, -1].float().cpu())
    finally:
        capture.remove()
    return {t: torch.cat(v) for t, v in out.items()}


def _runs_of(seq: list[int], pieces: list[int]) -> list[int]:
    """Start indices where `pieces` occurs in `seq` as a consecutive run."""
    n = len(pieces)
    return [i for i in range(len(seq) - n + 1) if seq[i: i + n] == pieces]


def gate_targets(data: TaskData, features: PolicyFeatures, tokenizer: Any) -> dict[str, torch.Tensor]:
    """policy text -> [T] target gates, for topic/routing training policies whose rule is inferable."""
    table = _sentence_topics()
    out: dict[str, torch.Tensor] = {}
    for ti in data.usable_tasks:
        task = data.tasks[ti]
        if task.family not in ("topic", "routing"):
            continue
        rule = infer_rule(task.family, [(ex.input, str(ex.answer)) for ex in task.examples], table)
        if rule is None:
            continue
        default = rule("__none__")
        sign = {o: (-1.0 if o == default else 1.0) for o in task.examples[0].options}
        for text in task.texts():
            ids = features([text])[0]["ids"]
            tgt = torch.zeros(ids.numel())
            for word, sg in sign.items():
                pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
                tgt[ids == pieces[0]] = sg
                for j in _runs_of(ids.tolist(), pieces):  # a multi-token word's later pieces answer too
                    tgt[j: j + len(pieces)] = sg
            out[text] = tgt
    return out


class _TeacherForced:
    """Cached states entering the last layer for token sequences (a record prompt + a reply + end of turn), and
    the cross-entropy of the reply's tokens with adapters on, computed one position at a time from the cache.

    The reader adapts only the last layer, so these states do not depend on the adapter: computed once."""

    def __init__(self, session: Session, texts: list[str], ids: list[list[int]], prompt_len: list[int],
                 log: Callable[[str], None]):
        self.ids, self.prompt_len = ids, prompt_len
        fake = SimpleNamespace(records=texts, record_ids=ids)
        self.states = cached_states(session.split, fake, session.tokenizer, cache_dir(),
                                    str(session.cfg.base_model or "default"), log)  # type: ignore[arg-type]

    def ce(self, session: Session, seqs: Sequence[int], adapters: dict, rows: torch.Tensor, first: bool,
           edge: int | None = None, middle: Sequence[int] = ()) -> torch.Tensor:
        """Mean cross-entropy over the reply tokens of sequences `seqs` (row i uses adapter rows[i]); with
        `first`, the reply's first token is scored too (free text), else only the tokens after it. `edge`: score
        only a reply's first and last `edge` tokens (where format rules live; each position costs a vocabulary
        projection), plus the offsets in `middle` (a sample of the rest, so the reply stays fluent)."""
        if not seqs:
            return torch.zeros((), device=session.cfg.device)
        split = session.split
        h, last = stack_cached(self.states, list(seqs), torch.float32, session.cfg.device)
        plen = torch.tensor([self.prompt_len[c] for c in seqs], device=h.device) - (1 if first else 0)
        n_scored = last - plen  # positions plen .. last-1 each predict the next token
        _, pe = split._pos(h)
        w = split.lm_head.weight
        total, count = h.new_zeros(()), 0
        with apply_lora(session.model, adapters, scale=1.0, rows=rows):
            for k in range(int(n_scored.max())):
                pos = torch.minimum(plen + k, last - 1)
                valid = (plen + k) <= (last - 1)
                if edge is not None:
                    valid &= (k < edge) | (k >= n_scored - edge) | (k in middle)
                    if not bool(valid.any()):
                        continue
                tgt = torch.tensor([self.ids[c][min(int(plen[i]) + k, len(self.ids[c]) - 1) + 1]
                                    if bool(valid[i]) else 0 for i, c in enumerate(seqs)], device=h.device)
                with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=session.cfg.bf16):
                    r = split.norm(split._last_layer_at(h, pos, pe))
                    logits = (r @ w.T.to(r.dtype)).float()
                ce = nn.functional.cross_entropy(logits, tgt, reduction="none")
                total = total + (ce * valid).sum()
                count += int(valid.sum())
        return total / max(count, 1)


class Continuations(_TeacherForced):
    """(record prompt + gold answer + end of turn) of the training tasks' own examples, so a step can score the
    answer's remaining tokens as `hyperlora eval` does (the tail loss). With `all_options`, every option's
    continuation is scored too: the adapter learns to finish whichever answer word was started (neutral between
    options), which takes the base model's per-word continuation preferences out of the summed score."""

    def __init__(self, session: Session, data: TaskData, per_task: int = 8, log: Callable[[str], None] = print,
                 all_options: bool = False):
        tok = session.tokenizer
        self.index: dict[tuple[int, int], list[int]] = {}  # (task, record) -> sequences, the gold answer's first
        prompt_len: list[int] = []
        texts, ids = [], []
        for t in data.usable_tasks:
            task = data.tasks[t]
            options = task.examples[0].options or []
            for it in data.items[t][:per_task]:  # a task's own examples come before its relabelled ones
                answer = [o for o in options if tok(o, add_special_tokens=False)["input_ids"][0]
                          == it.option_ids[it.answer]]
                if len(answer) != 1 or (t, it.record) in self.index:
                    continue
                words = answer + ([o for o in options if o != answer[0]] if all_options else [])
                self.index[(t, it.record)] = []
                for word in words:
                    tail = tok(target_text(tok, word), add_special_tokens=False)["input_ids"]
                    self.index[(t, it.record)].append(len(texts))
                    prompt_len.append(len(data.record_ids[it.record]))
                    texts.append(data.records[it.record] + target_text(tok, word))
                    ids.append(list(data.record_ids[it.record]) + tail)
        super().__init__(session, texts, ids, prompt_len, log)
        log(f"continuations: {len(texts)} (prompt + {'option' if all_options else 'answer'} + end of turn) "
            f"sequences for the tail loss")

    def loss(self, session: Session, items: Sequence[Any], adapters: dict, rows: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of every answer token after the first, and of the end of turn, with the adapters on."""
        sel = [(j, c) for j, it in enumerate(items) for c in self.index.get((it.task, it.record), [])]
        if not sel:
            return torch.zeros((), device=session.cfg.device)
        sub_rows = rows[torch.tensor([j for j, _ in sel])]
        return self.ce(session, [c for _, c in sel], adapters, sub_rows, first=False)


class FreeTextReplies(_TeacherForced):
    """(record prompt + reference reply + end of turn) of the free-text (format) training tasks: the reader
    learns format rules ("start every reply with 'Noted:'") from the CE of the whole reference reply."""

    def __init__(self, session: Session, data: TaskData, per_task: int = 6, log: Callable[[str], None] = print):
        tok = session.tokenizer
        self.by_task: dict[int, list[int]] = {}
        prompt_len: list[int] = []
        texts, ids = [], []
        for t, task in enumerate(data.tasks):
            exs = [ex for ex in task.examples if ex.options is None and isinstance(ex.answer, str) and ex.answer]
            for ex in exs[:per_task]:
                prompt = tok(prompt_text(tok, ex.input), add_special_tokens=False)["input_ids"]
                reply = tok(target_text(tok, str(ex.answer)), add_special_tokens=False)["input_ids"]
                self.by_task.setdefault(t, []).append(len(texts))
                prompt_len.append(len(prompt))
                texts.append(prompt_text(tok, ex.input) + target_text(tok, str(ex.answer)))
                ids.append(list(prompt) + list(reply))
        super().__init__(session, texts, ids, prompt_len, log)
        log(f"free text: {len(texts)} (prompt + reference reply) sequences of {len(self.by_task)} format policies")

    def batch(self, data: TaskData, rng: random.Random, policies: int, per_policy: int
              ) -> tuple[list[str], list[int], torch.Tensor]:
        """`policies` free-text tasks x `per_policy` replies: (one paraphrase per task, sequence indices, row ->
        index into the returned texts)."""
        tasks = rng.sample(sorted(self.by_task), min(policies, len(self.by_task)))
        texts, seqs, rows = [], [], []
        for j, t in enumerate(tasks):
            texts.append(rng.choice(data.tasks[t].texts()))
            pick = rng.sample(self.by_task[t], min(per_policy, len(self.by_task[t])))
            seqs += pick
            rows += [j] * len(pick)
        return texts, seqs, torch.tensor(rows, dtype=torch.long)


def off_answer_change(session: Session, items: Sequence[Any], adapters: dict, rows: torch.Tensor,
                      rng: random.Random) -> torch.Tensor:
    """Mean relative change of the final normed hidden state at one random prompt position per row that is not
    the answer position, adapters on vs off: the adapter should act where the answer is chosen, and leave
    the rest (the record's tokens, and by extension the tokens of a free-text reply) alone."""
    split = session.split
    h, last = stack_cached(session.train_states, [it.record for it in items], torch.float32, session.cfg.device)
    if split.start != len(split.layers) - 1:
        raise ValueError("reader_harm needs n_upper=1 (the reader adapts the last layer only)")
    pos = torch.tensor([rng.randrange(1, max(2, int(t))) for t in last.tolist()], device=h.device)
    _, pe = split._pos(h)
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=session.cfg.bf16):
        with torch.no_grad():
            base = split.norm(split._last_layer_at(h, pos, pe)).float()
        with apply_lora(session.model, adapters, scale=1.0, rows=rows):
            got = split.norm(split._last_layer_at(h, pos, pe)).float()
    return ((got - base).pow(2).sum(-1) / base.pow(2).sum(-1).clamp_min(1e-6)).mean()


def read_policies_cached(features: PolicyFeatures, texts: Sequence[str], model_id: str) -> None:
    """features(texts), with the result kept on disk under $HYPERLORA_CACHE/reader/ (reading ~2k policy texts
    costs minutes on a CPU; every run on the same data reuses it)."""
    uniq = sorted(set(texts))
    h = hashlib.sha256(f"{model_id}|{features.cfg.layer}|{features.cfg.gate_layer}|{features.cfg.max_tokens}|"
                       f"{sorted(features.names.items())}|bf16={features.bf16}".encode())
    for t in uniq:
        h.update(t.encode() + b"\x00")
    path = cache_dir() / "reader" / f"{h.hexdigest()[:24]}.safetensors"
    if path.is_file():
        per: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in load_file(str(path)).items():
            i, name = k.split("/", 1)
            per.setdefault(int(i), {})[name] = v
        for i, t in enumerate(uniq):
            features._cache[t] = per[i]
        return
    features(uniq, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a run stopped mid-write leaves no half-written cache file
        save_file({f"{i}/{k}": v.contiguous() for i, t in enumerate(uniq) for k, v in features._cache[t].items()},
                  str(tmp))


def _save(out: Path, reader: PolicyReader, opt: torch.optim.Optimizer, step: int, elapsed: float, cfg: Any,
          history: list) -> None:
    """Checkpoint the reader (`checkpointing.save_checkpoint`, atomic; moments under its parameter names)."""
    save_checkpoint(out, reader.save_pretrained, opt, dict(reader.named_parameters()), step, elapsed, cfg.recipe(),
                    history)


def _resume(out: Path, reader: PolicyReader, opt: torch.optim.Optimizer, model: nn.Module) -> tuple[int, float, list]:
    """(step, seconds trained, history) from ``<out>/checkpoint`` with the reader and moments restored."""
    def load(d: Path) -> None:
        reader.load_state_dict(PolicyReader.from_pretrained(d, model).state_dict())

    return load_checkpoint(out, load, opt, dict(reader.named_parameters()))


def train_reader(session: Session, log: Callable[[str], None] = print, resume: bool = True
                 ) -> tuple[PolicyReader, PolicyFeatures, list]:
    """Train a PolicyReader on the session's training policies; returns it, its feature reader and the history."""
    cfg = session.cfg
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = relabel_training_data(session, log)
    model, tok = session.model, session.tokenizer
    layer = session.split.start if cfg.n_upper == 1 else len(session.split.layers) - 1
    mods = dict(model.named_modules())
    names = {t: module_name(model, layer, t) for t in READ_MODULES}
    rcfg = ReaderConfig(layer=layer, hidden_size=int(model.config.hidden_size),
                        features={t: int(mods[n].in_features) for t, n in names.items()},
                        gate_layer=cfg.reader_gate_layer, clause_keys=bool(cfg.reader_clause_keys))
    features = PolicyFeatures(model, tok, rcfg)
    texts = [x for task in data.tasks for x in task.texts()]  # free-text tasks too (format rules)
    texts += [d.tasks[t].policy for d in session.evals.values() for t in d.usable_tasks]
    t0 = time.time()
    read_policies_cached(features, texts, str(cfg.base_model or "default"))
    log(f"read {len(set(texts))} policy texts with the base model in {time.time() - t0:.0f} s")
    if rcfg.clause_keys:  # routing policies' clauses are read alone too (hyperlora/hypernets/reader/clause_keys.py); own cache file
        t0 = time.time()
        ctexts = clause_texts(features, texts)
        read_policies_cached(features, ctexts, str(cfg.base_model or "default"))
        log(f"read {len(ctexts)} answer-word clauses with the base model in {time.time() - t0:.0f} s")
    torch.manual_seed(cfg.seed)
    reader = PolicyReader(rcfg, model.get_input_embeddings().weight, names).to(cfg.device)
    reader.set_record_stats(record_features(session, names))
    if cfg.reader_init:  # fine-tune a trained reader (its statistics are recomputed on this data above)
        init = PolicyReader.from_pretrained(cfg.reader_init, model)
        if init.cfg.features != rcfg.features or init.names != names:
            raise ValueError(f"reader_init {cfg.reader_init!r} adapts {init.names}, this run {names}")
        reader.load_state_dict({k: v for k, v in init.state_dict().items() if not k.split("_", 1)[0] in ("mu", "sd", "c")},
                               strict=False)
        log(f"initialised from the reader in {cfg.reader_init}")
    targets = gate_targets(data, features, tok)
    conts = (Continuations(session, data, log=log, all_options=cfg.reader_tail_all_options) if cfg.reader_tail > 0
             else None)
    replies = FreeTextReplies(session, data, log=log) if cfg.reader_free_text > 0 else None
    if replies is not None and not replies.by_task:
        raise ValueError("reader_free_text > 0 needs free-text (format) training tasks: add 'format' to families")
    log(f"gate targets for {len(targets)} policy texts; reader {sum(p.numel() for p in reader.parameters()) / 1e6:.2f}M "
        f"parameters on {list(names.values())}")
    u_params = list(reader.U.parameters())
    other = [p for n, p in reader.named_parameters() if not n.startswith("U.")]
    opt = torch.optim.AdamW([{"params": other, "lr": cfg.lr, "base": cfg.lr},
                             {"params": u_params, "lr": cfg.reader_lr_u, "base": cfg.reader_lr_u}], weight_decay=0.0)
    step, elapsed, history = _resume(out, reader, opt, model) if resume else (0, 0.0, [])
    if step:
        log(f"resumed from {out / 'checkpoint'} at step {step} ({elapsed:.0f} s trained)")
    eye = {t: torch.eye(u.shape[0], device=u.device) for t, u in reader.U.items()}

    def read(txts: Sequence[str]):
        adapters, gates = reader(features(list(txts)))
        if rcfg.clause_keys:
            adapters = with_clause_keys(reader, features, list(txts), adapters, gates.detach())
        return adapters, gates

    def generate(txts: Sequence[str]):
        return read(txts)[0], 1.0

    bar = tqdm(total=cfg.steps, initial=step, desc="reader", unit="step", mininterval=5)
    ema: tuple[float, float] | None = None
    budget = TimeBudget(cfg.time_budget_s, elapsed)
    while step < cfg.steps:
        if budget.exhausted():
            log(f"time budget {cfg.time_budget_s:.0f} s reached at step {step}")
            break
        items, txts, rows = policy_batch(data, cfg, step)
        rng = random.Random(cfg.seed * 2_000_003 + step)  # only the off-answer penalty's positions
        if replies is not None:  # format policies ride in the same reader call, after the option policies
            frng = random.Random(cfg.seed * 3_000_017 + step)
            ftxts, fseqs, frows = replies.batch(data, frng, cfg.reader_free_text_policies, cfg.examples_per_policy)
            edge = cfg.reader_free_text_edge
            fmiddle = frng.sample(range(edge, edge + 12), 3) if edge else []  # 3 offsets past the head (fluency)
            frows = frows + len(txts)
            txts = txts + ftxts
        for g in opt.param_groups:  # each group's own base rate, warmup overlapping the cosine
            g["lr"] = warmup_cosine_lr(step, g["base"], cfg.steps, cfg.warmup, overlap=True)
        adapters, gates = read(txts)
        with apply_lora(model, adapters, scale=1.0, rows=rows):
            logits, ans = session.forward_options(session.train_states, items)
        loss = nn.functional.cross_entropy(logits, ans)
        harm = (off_answer_change(session, items, adapters, rows, rng) if cfg.reader_harm > 0
                else torch.zeros((), device=loss.device))
        tail = conts.loss(session, items, adapters, rows) if conts is not None else torch.zeros((), device=loss.device)
        free = (replies.ce(session, fseqs, adapters, frows, first=True, edge=cfg.reader_free_text_edge,
                           middle=fmiddle) if replies is not None
                else torch.zeros((), device=loss.device))
        known = [(p, targets[t]) for p, t in enumerate(txts) if t in targets]
        aux = (sum(((gates[p, : tg.numel()] - tg.to(gates.device)) ** 2).mean() for p, tg in known) / len(known)
               if known else torch.zeros((), device=loss.device))
        reg = sum((u - eye[t]).pow(2).sum() for t, u in reader.U.items())
        total = (loss + cfg.reader_aux * aux + cfg.reader_u_reg * reg + cfg.reader_harm * harm + cfg.reader_tail * tail
                 + cfg.reader_free_text * free)
        opt.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(reader.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        acc = (logits.argmax(-1) == ans).float().mean().item()
        ema = (loss.item(), acc) if ema is None else (0.95 * ema[0] + 0.05 * loss.item(), 0.95 * ema[1] + 0.05 * acc)
        bar.update(1)
        bar.set_postfix(loss=f"{ema[0]:.3f}", acc=f"{ema[1]:.2f}", aux=f"{float(aux.detach()):.3f}",
                        harm=f"{float(harm.detach()):.4f}", tail=f"{float(tail.detach()):.3f}",
                        free=f"{float(free.detach()):.3f}", refresh=False)
        if step % 10 == 0:
            history.append({"step": step, "t": round(budget.elapsed(), 1), "loss": round(ema[0], 4),
                            "acc": round(ema[1], 3)})
        if cfg.eval_every and step % cfg.eval_every == 0 and session.evals:
            ev = quick_eval_with(session, generate, cfg.eval_tasks_per_split)
            history.append({"step": step, "t": round(budget.elapsed(), 1), "eval": ev})
            log(f"step {step} t={budget.elapsed():.0f}s eval: " + json.dumps(
                {k: (v["generated"], v["generated_shuffled"]) for k, v in ev.items()}))
        if cfg.save_every and step % cfg.save_every == 0:
            _save(out, reader, opt, step, budget.elapsed(), cfg, history)
    bar.close()
    _save(out, reader, opt, step, budget.elapsed(), cfg, history)
    return reader, features, history
