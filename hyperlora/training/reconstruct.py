"""Reconstruction training (`hyperlora train --method reconstruct`): teach the T2L-style HyperNetwork to
reproduce a library of per-policy LoRAs from their policy texts, and build such a library.

Library layout (one subdirectory per policy; files and hidden entries in DIR are ignored)::

    DIR/<name>/adapter_config.json        PEFT LoRA config   } read and validated by hyperlora.adapters.peft_io.read_peft
    DIR/<name>/adapter_model.safetensors  lora_A / lora_B     }
    DIR/<name>/policy.txt                 the policy text (UTF-8; surrounding whitespace stripped)

Loss: a LoRA's factors are defined only up to an invertible r x r map (B M^-1, M A give the same layer), so
regressing A and B would penalize adapters that are equal as functions. What is unique is the update
delta_W = scale * B @ A. Per module the loss is the exact squared Frobenius error
||delta_W_gen - delta_W_tgt||_F^2, computed from r x r Gram matrices (never forming d_out x d_in), divided
by that module's mean target energy over the library (mean_j ||delta_W_tgt_j||_F^2), so every module counts
alike whatever its size and scale; averaged over modules and policies. A no-op adapter scores 1.0 on
average, a perfect one 0. Details and the reasons: docs/TRAINING.md.
"""
from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from hyperlora._io import atomic_dir
from hyperlora.adapters.peft_io import read_peft, write_peft
from hyperlora.hypernets.t2l.hypernet import HyperNetwork
from hyperlora.hypernets.t2l.text_encoders import PolicyTextEncoder
from hyperlora.training.checkpointing import init_from  # re-exported: its home moved to checkpointing.py
from hyperlora.training.oracle import train_policy_lora
from hyperlora.training.schedule import TimeBudget, warmup_cosine_lr
from hyperlora.training.session import build_session, load_train_tasks
from hyperlora.training.sft import build_hypernet, optimizer_and_state, save_training_state

__all__ = ["POLICY_FILE", "LibraryEntry", "load_library", "delta_sq_error", "LibraryTargets", "build_library",
           "train_reconstruct", "init_from", "run_reconstruct"]

POLICY_FILE = "policy.txt"
_LAYOUT = "DIR/<name>/{adapter_config.json, adapter_model.safetensors, policy.txt}"


# --------------------------------------------------------------------------------------------------
# Reading a library
# --------------------------------------------------------------------------------------------------

@dataclass
class LibraryEntry:
    """One library LoRA: `modules` full name -> (A [r, d_in], B [d_out, r] with its PEFT scale folded in),
    float32 on the CPU; `name` is the subdirectory's name, `policy` the text of its policy.txt."""

    name: str
    policy: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    key: str


def _describe_targets(targets: dict[str, tuple[int, int]]) -> str:
    types = sorted({n.rsplit(".", 1)[-1] for n in targets})
    layers = sorted({int(m.group(1)) for n in targets for m in [re.search(r"\.(\d+)\.", n)] if m})
    where = f" in layers {layers[0]}..{layers[-1]}" if layers else ""
    return f"{types}{where}"


def load_library(directory: str | Path, targets: dict[str, tuple[int, int]],
                 max_rank: int | None = None) -> list[LibraryEntry]:
    """Read every LoRA subdirectory of `directory` (layout in the module docstring), sorted by name.

    targets: the hypernetwork's modules {full name: (d_in, d_out)} (`HyperNetwork.targets()`). Each LoRA is
    validated by `read_peft`; its modules must be among `targets` with their shapes (a module it leaves out
    is a zero update there). Raises FileNotFoundError / ValueError naming the subdirectory and the fix.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"lora_library {str(root)!r} is not a directory; expected {_LAYOUT}")
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subs:
        raise ValueError(f"lora_library {str(root)!r} holds no LoRA subdirectories; expected {_LAYOUT} "
                         f"(build one with --set build_library=true)")
    entries: list[LibraryEntry] = []
    for sub in subs:
        where = f"lora_library entry {str(sub)!r}"
        pol = sub / POLICY_FILE
        if not pol.is_file():
            raise ValueError(f"{where}: {POLICY_FILE} is missing: every LoRA directory needs its policy text in "
                             f"{str(pol)!r}, beside adapter_config.json")
        text = pol.read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"{where}: {str(pol)!r} is empty; write the policy text the LoRA was trained for")
        try:
            ad = read_peft(sub, max_rank=max_rank)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{where}: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        extra = sorted(n for n in ad.modules if n not in targets)
        if extra:
            raise ValueError(f"{where}: modules {extra[:3]}{' ...' if len(extra) > 3 else ''} are not generated by "
                             f"the hypernetwork, which writes {_describe_targets(targets)}; set target_modules / "
                             f"n_upper to cover them, or rebuild the library for these modules")
        mods = {}
        for n, (a, b) in ad.modules.items():
            d_in, d_out = targets[n]
            if a.shape[1] != d_in or b.shape[0] != d_out:
                raise ValueError(f"{where}: module {n!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                                 f"but the hypernetwork's {n.rsplit('.', 1)[-1]} is d_in={d_in} -> d_out={d_out}: "
                                 f"the LoRA was made for another base model")
            mods[n] = (a.float(), b.float())
        entries.append(LibraryEntry(sub.name, text, mods, ad.key))
    return entries


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------

def delta_sq_error(a_g: torch.Tensor, b_g: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """||B_g A_g - B_t A_t||_F^2 over the last two dims, batched over leading dims, without forming B A.

    a_g [..., R, d_in], b_g [..., d_out, R], a_t [..., Rt, d_in], b_t [..., d_out, Rt] (scales folded into B;
    the ranks may differ). Uses ||X||^2 = tr((B^T B)(A A^T)) and <B_g A_g, B_t A_t> = sum((B_g^T B_t) * (A_g A_t^T)):
    O(R^2 (d_in + d_out)) per module. Invariant to (A, B) -> (M A, B M^-1) on either side. Returns [...]."""
    gg = (b_g.transpose(-1, -2) @ b_g) * (a_g @ a_g.transpose(-1, -2))
    tt = (b_t.transpose(-1, -2) @ b_t) * (a_t @ a_t.transpose(-1, -2))
    gt = (b_g.transpose(-1, -2) @ b_t) * (a_g @ a_t.transpose(-1, -2))
    err = gg.sum((-1, -2)) - 2.0 * gt.sum((-1, -2)) + tt.sum((-1, -2))
    return err.clamp_min(0.0)


def _energy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||B A||_F^2 over the last two dims (a [..., R, d_in], b [..., d_out, R]) -> [...]."""
    return ((b.transpose(-1, -2) @ b) * (a @ a.transpose(-1, -2))).sum((-1, -2))


class LibraryTargets:
    """The library stacked per hypernetwork module type, and the per-module normalizers.

    a[type] [N, L, Rt, d_in], b[type] [N, L, d_out, Rt] (scale folded into B; zero where an entry lacks a
    module or has a smaller rank: zeros change no product); norm[type] [L]: the mean over the library of
    ||delta_W||_F^2 of that module (a module no entry touches gets the mean of the others, so a generated
    update there is still penalized on the common scale)."""

    def __init__(self, entries: Sequence[LibraryEntry], hn: HyperNetwork, device: str | torch.device = "cpu"):
        if not entries:
            raise ValueError("the LoRA library is empty")
        self.n = len(entries)
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        energy: dict[str, torch.Tensor] = {}
        for t in hn.types:
            names = hn.module_names(t)
            d_in, d_out = (int(d) for d in hn.config.module_shapes[t])
            rt = max([e.modules[n][0].shape[0] for e in entries for n in names if n in e.modules] or [1])
            a = torch.zeros(self.n, len(names), rt, d_in)
            b = torch.zeros(self.n, len(names), d_out, rt)
            for j, e in enumerate(entries):
                for li, n in enumerate(names):
                    if n in e.modules:
                        ea, eb = e.modules[n]
                        a[j, li, : ea.shape[0]] = ea
                        b[j, li, :, : eb.shape[1]] = eb
            self.a[t], self.b[t] = a.to(device), b.to(device)
            energy[t] = _energy(a, b).mean(0)
        flat = torch.cat(list(energy.values()))
        pos = flat[flat > 0]
        if pos.numel() == 0:
            raise ValueError("every LoRA of the library is all zeros: there is nothing to reconstruct")
        floor = pos.mean()
        self.norm = {t: torch.where(e > 0, e, floor).to(device) for t, e in energy.items()}

    def loss(self, hn: HyperNetwork, emb: torch.Tensor, idx: Sequence[int] | torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean normalized error, per-policy [P] normalized error) of the adapters `hn` generates from `emb`
        [P, E] against library entries `idx` [P]."""
        idx_t = torch.as_tensor(idx, dtype=torch.long, device=next(iter(self.a.values())).device)
        gen = hn.generate(emb)
        scale = float(hn.config.scale)
        per, count = 0.0, 0
        for t, (a_g, b_g) in gen.items():
            a_t, b_t = self.a[t].index_select(0, idx_t), self.b[t].index_select(0, idx_t)
            err = delta_sq_error(a_g.float(), b_g.float() * scale, a_t, b_t)  # [P, L]
            per = per + (err / self.norm[t]).sum(-1)
            count += err.shape[-1]
        per = per / count
        return per.mean(), per.detach()

    def relative_error(self, hn: HyperNetwork, emb: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
        """Per entry: sum over modules of ||dW_gen - dW_tgt||^2 / sum of ||dW_tgt||^2 (0 = exact, 1 = no-op)."""
        idx_t = torch.as_tensor(idx, dtype=torch.long, device=next(iter(self.a.values())).device)
        with torch.no_grad():
            gen = hn.generate(emb)
            num, den = 0.0, 0.0
            for t, (a_g, b_g) in gen.items():
                a_t, b_t = self.a[t].index_select(0, idx_t), self.b[t].index_select(0, idx_t)
                num = num + delta_sq_error(a_g.float(), b_g.float() * hn.config.scale, a_t, b_t).sum(-1)
                den = den + _energy(a_t, b_t).sum(-1)
        return num / den.clamp_min(1e-30)


# --------------------------------------------------------------------------------------------------
# Building a library: one oracle LoRA per training task
# --------------------------------------------------------------------------------------------------

def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:n] or "task"


def build_library(model: nn.Module, tokenizer: Any, tasks: Sequence[Any], out_dir: str | Path, *,
                  module_names: Sequence[str], rank: int = 8, alpha: float = 16.0, steps: int = 60,
                  lr: float = 1e-3, seed: int = 0, bf16: bool = True, log: Callable[[str], None] = print
                  ) -> list[Path]:
    """Train one LoRA per task (`training.oracle.train_policy_lora`, no policy in the prompt) on `module_names`
    (the hypernetwork's modules) and write each as a PEFT directory + policy.txt under `out_dir`.

    tasks: `hyperlora.tasks.PolicyTask`s (their `policy` and labelled `examples`). Resumable: an entry that
    already holds the same policy text is kept, so an interrupted build continues where it stopped; entries
    are written to a hidden temporary directory and renamed, so a half-written one is never read.
    Tasks without any labelled example are skipped with a log line. Returns the entry directories."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    t0, trained = time.time(), 0
    bar = tqdm(total=len(tasks), desc="building LoRA library", unit="lora", mininterval=5)
    for i, task in enumerate(tasks):
        d = root / f"{i:04d}-{_slug(task.id or task.policy)}"
        if (d / POLICY_FILE).is_file() and (d / POLICY_FILE).read_text(encoding="utf-8").strip() == task.policy.strip():
            made.append(d)
            bar.update(1)
            continue
        if not any(e.answer for e in task.examples):
            log(f"build_library: task {i} ({task.id or task.policy[:40]!r}) has no labelled example; skipped")
            bar.update(1)
            continue
        ad = train_policy_lora(model, tokenizer, task.examples, rank=rank, alpha=alpha, module_names=list(module_names),
                               steps=steps, lr=lr, seed=seed + i, bf16=bf16)
        with atomic_dir(d) as tmp:  # hidden temporary directory beside d, swapped in whole
            # train_policy_lora folds the scale into B: written with lora_alpha = rank, PEFT's scale is 1
            write_peft(tmp, {n: (a[0], b[0]) for n, (a, b) in ad.modules.items()}, rank=rank, lora_alpha=float(rank),
                       base_model=model)
            (tmp / POLICY_FILE).write_text(task.policy.strip() + "\n", encoding="utf-8")
        made.append(d)
        trained += 1
        bar.set_postfix(trained=trained, refresh=False)
        bar.update(1)
    bar.close()
    log(f"build_library: {len(made)} LoRAs in {root} ({trained} trained now, {time.time() - t0:.0f} s)")
    return made


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def _split_library(n: int, holdout: int, seed: int) -> tuple[list[int], list[int]]:
    if not 0 <= holdout < n:
        raise ValueError(f"library_holdout must be in [0, {n - 1}] for a library of {n} LoRAs, got {holdout}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[holdout:]), sorted(order[:holdout])


def train_reconstruct(session: Any, library_dir: str | Path, log: Callable[[str], None] = print, resume: bool = True
                      ) -> tuple[HyperNetwork, Any, dict[str, Any], list]:
    """Reconstruction training of a fresh HyperNetwork (`sft.build_hypernet`: the session's target modules in
    the last n_upper layers) on the LoRA library at `library_dir`.

    A step samples `policies_per_step` training entries, encodes their policy texts with the configured
    `PolicyTextEncoder`, generates their adapters and takes `LibraryTargets.loss`. AdamW, warmup + cosine
    (as sft), gradient clipping, checkpoints in <out>/checkpoint every `save_every` steps (resumed), stops at
    `steps` or `time_budget_s`. Returns (hypernetwork, encoder, report, history); report holds the
    normalized loss and relative errors on the training entries and the `library_holdout` held-out ones."""
    cfg = session.cfg
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    enc = PolicyTextEncoder(cfg.encoder, session.model, session.tokenizer, layer=cfg.encoder_layer,
                            n_queries=cfg.encoder_queries)
    torch.manual_seed(cfg.seed)
    hn = build_hypernet(session, enc.dim).to(cfg.device)
    if enc.module is not None:
        enc.module.to(cfg.device)
    entries = load_library(library_dir, hn.targets())
    lib = LibraryTargets(entries, hn, device=cfg.device)
    train_idx, held_idx = _split_library(len(entries), int(cfg.library_holdout), cfg.seed)
    texts = [e.policy for e in entries]
    covered = sum(len(e.modules) for e in entries) / (len(entries) * len(hn.targets()))
    log(f"reconstruct: {len(entries)} LoRAs from {library_dir} ({len(train_idx)} trained, {len(held_idx)} held "
        f"out), {len(hn.targets())} modules, {100 * covered:.0f}% of (LoRA, module) pairs present")
    if cfg.encoder == "minilm":
        enc.encode(texts)  # cached: the frozen encoders run once per text
    else:
        enc.token_states(texts)

    def embed(ix: Sequence[int]) -> torch.Tensor:
        return enc.encode([texts[i] for i in ix]).to(cfg.device)

    opt, params, step, elapsed, history = optimizer_and_state(out, hn, enc, cfg, resume, log)

    def evaluate(ix: list[int]) -> dict[str, float]:
        if not ix:
            return {}
        with torch.no_grad():
            losses, rels = [], []
            for s in range(0, len(ix), 64):
                chunk = ix[s:s + 64]
                emb = embed(chunk)
                losses.append(lib.loss(hn, emb, chunk)[1])
                rels.append(lib.relative_error(hn, emb, chunk))
        loss, rel = torch.cat(losses), torch.cat(rels)
        return {"loss": round(float(loss.mean()), 5), "rel_error": round(float(rel.mean()), 5),
                "rel_error_max": round(float(rel.max()), 5), "n": len(ix)}

    bar = tqdm(total=cfg.steps, initial=step, desc="reconstruct", unit="step", mininterval=5)
    ema = None
    budget = TimeBudget(cfg.time_budget_s, elapsed)
    n_pick = min(cfg.policies_per_step, len(train_idx))
    while step < cfg.steps:
        if budget.exhausted():
            log(f"time budget {cfg.time_budget_s:.0f} s reached at step {step}")
            break
        rng = random.Random(cfg.seed * 1_000_003 + step)
        pick = rng.sample(train_idx, n_pick)
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(step, cfg.lr, cfg.steps, cfg.warmup)
        loss, _ = lib.loss(hn, embed(pick), pick)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        opt.step()
        step += 1
        lv = float(loss.item())
        if not math.isfinite(lv):
            raise FloatingPointError(f"reconstruction loss is {lv} at step {step}; lower lr (now {cfg.lr})")
        ema = lv if ema is None else 0.9 * ema + 0.1 * lv
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}", refresh=False)
        if step % 10 == 0 or step == 1:
            history.append({"step": step, "t": round(budget.elapsed(), 1), "loss": round(lv, 5),
                            "ema": round(ema, 5)})
        if cfg.eval_every and step % cfg.eval_every == 0:
            ev = {"train": evaluate(train_idx), "held_out": evaluate(held_idx)}
            history.append({"step": step, "t": round(budget.elapsed(), 1), "eval": ev})
            log(f"step {step} t={budget.elapsed():.0f}s reconstruction: " + json.dumps(ev))
        if cfg.save_every and step % cfg.save_every == 0:
            save_training_state(out, hn, enc, opt, params, step, budget.elapsed(), cfg, history)
    bar.close()
    save_training_state(out, hn, enc, opt, params, step, budget.elapsed(), cfg, history)
    report = {"library": str(library_dir), "entries": len(entries), "steps": step,
              "train": evaluate(train_idx), "held_out": evaluate(held_idx)}
    return hn, enc, report, history


def run_reconstruct(cfg: Any, log: Callable[[str], None] = print, resume: bool = True) -> dict[str, Any]:
    """`hyperlora train --method reconstruct`: optionally build the library (`build_library=true`: one oracle
    LoRA per training task, into `lora_library` or <out>/library), train, write <out>/final. Returns the
    results dict ({"method", "eval": {"library": report}, ...})."""
    out = Path(cfg.out)
    if not cfg.lora_library and not cfg.build_library:
        raise ValueError("method 'reconstruct' needs a LoRA library: --set lora_library='\"DIR\"' (layout "
                         f"{_LAYOUT}) or --set build_library=true to train one oracle LoRA per training task first")
    library = Path(cfg.lora_library) if cfg.lora_library else out / "library"
    session = build_session(cfg, with_train=False, with_eval=False, log=log)
    if cfg.build_library:
        tasks = load_train_tasks(cfg)
        if cfg.library_size is not None:
            by: dict[str, list[Any]] = {}
            for t in tasks:
                by.setdefault(t.family or "tasks", []).append(t)
            picked: list[Any] = []
            k = 0  # round-robin over families, so a cap never drops a whole family
            while len(picked) < cfg.library_size and any(k < len(v) for v in by.values()):
                picked += [v[k] for v in by.values() if k < len(v)][: cfg.library_size - len(picked)]
                k += 1
            tasks = picked
        log(f"building a library of {len(tasks)} oracle LoRAs ({cfg.oracle_steps} steps each) in {library}")
        build_library(session.model, session.tokenizer, tasks, library, module_names=session.target_names,
                      rank=cfg.rank, alpha=cfg.lora_alpha, steps=cfg.oracle_steps, lr=cfg.oracle_lr, seed=cfg.seed,
                      bf16=cfg.bf16, log=log)
    hn, enc, report, _ = train_reconstruct(session, library, log=log, resume=resume)
    final = out / "final"
    hn.save_pretrained(final)
    enc.save(final)
    log(f"final hypernetwork -> {final}")
    return {"method": "reconstruct", "eval": {"library": report}}
