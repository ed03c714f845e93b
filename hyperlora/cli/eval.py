"""`hyperlora eval`: the command line of `hyperlora.evaluation.evaluate` (conditions, metric and outputs are
described there)."""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from hyperlora.cli.errors import UsageError
from hyperlora.tasks.format import Example
from hyperlora.evaluation.evaluate import (CONDITIONS, HELD_OUT_SPLITS, AdapterSet, evaluate, markdown_table,
                                           select_tasks, summarize, write_report)

log = logging.getLogger("hyperlora.evaluation.evaluate")

REPLY_METRICS_HELP = (
    "Reply-level metrics, for every condition, overall and per family, split and task file, next to the scored "
    "balanced accuracy: reply acc = balanced accuracy with the greedy reply's first option as the prediction "
    "(options tried longest first, case-insensitive, ending at a label boundary: P10 is not P1, TIER-3 is not "
    "TIER); clean = the stripped reply (one final '.' or '!' allowed) is exactly one option; loop = some token "
    "3-gram occurs 3 times within 32 reply tokens (label and free-text replies); collapse = share of policies "
    "with >= 2 gold answers whose scored predictions are one answer for all records. docs/POLICY_TASKS.md.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = REPLY_METRICS_HELP
    p.add_argument("--tasks", nargs="+", metavar="FILE",
                   help="JSONL task file(s) (default: the generated held-out splits); with several, every record "
                        "carries its file and the report breaks down per file (--max-policies applies per file)")
    p.add_argument("--seed", type=int, default=0, help="generator seed for the default tasks, and shuffling")
    p.add_argument("--splits", nargs="+", default=list(HELD_OUT_SPLITS),
                   help="generated splits to evaluate (add 'train' to score training policies)")
    p.add_argument("--model", help="base model directory or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--hypernet", help="hypernetwork directory (default: the shipped hyperlora/checkpoints/)")
    p.add_argument("--multitask-lora", help="multi-task LoRA: multitask_lora.safetensors from `hyperlora train "
                                            "--method multitask_lora`, its --out directory, or a PEFT directory "
                                            "(default: hyperlora/checkpoints/multitask_lora[.safetensors] if present)")
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS,
                   help="in_context: policy in the --where turn; in_context_user: in the user turn; "
                        "in_context_fewshot: policy in the system turn plus two labelled records of the same "
                        "policy (never the scored one) as earlier chat turns (default: all)")
    p.add_argument("--max-policies", type=int, default=2, help="policies per (split, family) (default 2)")
    p.add_argument("--examples-per-policy", type=int, default=10, help="examples scored per policy (default 10)")
    p.add_argument("--oracle-policies", type=int, default=3,
                   help="policies per family that get an oracle LoRA, taken round-robin over the splits (default 3: "
                        "one per held-out split; with 1, every oracle is an unseen-combination policy)")
    p.add_argument("--oracle-steps", type=int, default=60, help="training steps per oracle LoRA (batch 8)")
    p.add_argument("--oracle-lr", type=float, default=2e-3, help="oracle LoRA learning rate")
    p.add_argument("--oracle-n-upper", type=int, default=12,
                   help="without a hypernetwork: the oracle adapts q/v of the last N layers (with one: its modules)")
    p.add_argument("--full", action="store_true",
                   help="the full eval: 8 policies per (split, family), 16 examples each, 2 oracles per family")
    p.add_argument("--where", choices=("system", "user"), default="system",
                   help="where in_context / multitask_lora put the policy (in_context_user always puts it in the "
                        "user turn, in_context_fewshot in the system turn)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens for free-text tasks")
    p.add_argument("--reply-tokens", type=int, default=16,
                   help="greedy tokens of the reply each label record also gets for the reply-level metrics "
                        "(stops at the end of turn; default 16: room for multi-word labels)")
    p.add_argument("--no-replies", action="store_true",
                   help="skip the label records' greedy replies (reply acc / clean rate; loop rate then covers "
                        "free-text generations only; collapse rate needs no replies)")
    p.add_argument("--fp32", action="store_true",
                   help="no bfloat16 autocast (default: bf16 where the device runs it natively, else float32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="benchmarks/results", help="output directory")
    p.add_argument("--name", default="quality", help="output file stem")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--escalate", type=float, metavar="BUDGET",
                   help="add the 'escalation' section (calibrated confidence, the in-context verifier, escalating "
                        "the least-trusted BUDGET share, e.g. 0.1; conformal thresholds), <name>_escalation.md, "
                        "the risk-coverage and reliability PNGs and <name>_calibration.json (docs/DECISIONS.md)")
    p.add_argument("--alpha", type=float, default=0.1, help="--escalate: auto-approved error the conformal rule "
                                                              "controls (default 0.1)")
    p.add_argument("--delta", type=float, default=0.1, help="--escalate: the conformal rule may fail with "
                                                              "probability delta (default 0.1)")


def _find_multitask(arg: str | None) -> Path | None:
    from hyperlora.evaluation.sources import SHIPPED_DIR

    if arg:
        p = Path(arg)
        if not p.exists():
            raise FileNotFoundError(f"--multitask-lora {arg!r} does not exist (train one with "
                                    "`hyperlora train --method multitask_lora`)")
        return p
    for p in (SHIPPED_DIR / "multitask_lora.safetensors", SHIPPED_DIR / "multitask_lora"):
        if p.exists():
            return p
    return None


def run(args: argparse.Namespace) -> int:
    from hyperlora.modeling.base_model import load_base_model
    from hyperlora.tasks import generate_suite, load_tasks
    from hyperlora.evaluation.sources import HypernetSource, find_hypernet_dir, load_lora, train_policy_lora

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.full:
        args.max_policies, args.examples_per_policy = max(args.max_policies, 8), max(args.examples_per_policy, 16)
        args.oracle_policies = max(args.oracle_policies, 3)
    t_start = time.perf_counter()
    if args.escalate is not None and not (0.0 < args.escalate < 1.0 and 0.0 < args.alpha < 1.0 and 0.0 < args.delta < 1.0):
        raise UsageError(f"--escalate, --alpha and --delta must be in (0, 1), got {args.escalate}, {args.alpha}, "
                         f"{args.delta}")
    if args.reply_tokens < 1:
        raise UsageError(f"--reply-tokens must be >= 1, got {args.reply_tokens}")
    sources: list[str] | None = None
    if args.tasks:
        files = list(dict.fromkeys(str(f) for f in args.tasks))
        names = [Path(f).name for f in files]
        if len(set(names)) < len(names):  # same file name in two folders: report the paths
            names = files
        tasks, sources = [], []
        for f, n in zip(files, names):
            ts = load_tasks(f)
            tasks += ts
            sources += [n] * len(ts)
        source = files[0] if len(files) == 1 else files
    else:
        bad = [s for s in args.splits if s not in ("train",) + HELD_OUT_SPLITS]
        if bad:
            raise UsageError(f"--splits: unknown {bad}; choose from {['train', *HELD_OUT_SPLITS]}")
        n_ex = args.examples_per_policy + 24  # extra examples train the oracle, never scored
        suite = generate_suite(args.seed, train_per_family=max(args.max_policies, 1) if "train" in args.splits else 1,
                               held_out_per_family=args.max_policies, held_out_examples_per_task=n_ex,
                               examples_per_task=n_ex)
        tasks = [t for s in args.splits for t in suite[s]]
        source = f"generate_suite(seed={args.seed}) splits {args.splits}"
        sources = ["generated"] * len(tasks)
    try:
        etasks = select_tasks(tasks, max_policies=args.max_policies, examples_per_policy=args.examples_per_policy,
                              oracle_per_family=args.oracle_policies, sources=sources)
    except ValueError as exc:  # --max-policies / --examples-per-policy below 1
        raise UsageError(str(exc)) from exc
    # oracles that cannot be trained (free text without reference replies) were named by select_tasks, up front
    model, tok = load_base_model(args.model)
    conds = list(dict.fromkeys(args.conditions))
    hn = None
    if any(c.startswith("generated") for c in conds):
        d = find_hypernet_dir(args.hypernet)
        if d is None:
            log.warning("no hypernetwork found in hyperlora/checkpoints/ (pass --hypernet DIR): skipping generated*")
        else:
            hn = HypernetSource.from_dir(d, model, tok)
            log.info("hypernetwork: %s", d)
    mt_path = _find_multitask(args.multitask_lora) if "multitask_lora" in conds else None
    multitask = load_lora(mt_path, model) if mt_path is not None else None
    if "multitask_lora" in conds and multitask is None:
        log.warning("no multi-task LoRA found (pass --multitask-lora): skipping multitask_lora")
    from hyperlora.ops.precision import use_bf16

    bf16 = use_bf16(False if args.fp32 else None, next(model.parameters()).device)
    if hn is not None and getattr(hn, "features", None) is not None and not bf16:
        hn.features.bf16 = False  # --fp32 (or no native bf16): the policy reader reads in float32 too
    # The oracle adapts the same modules at the same rank as the hypernetwork (q/v rank 8 without one).
    oracle_kw: dict[str, Any] = {}
    if hn is not None and not hn.hypernet.needs_encoder:  # a policy reader (AdapterSource reading texts)
        # A policy reader adapts o_proj/down_proj of one layer; its oracle gets every projection of that layer
        # at rank 8 (what the T2L-style checkpoint's oracle had), so oracle numbers stay comparable.
        layer = int(hn.reader.cfg.layer)
        oracle_kw = {"rank": 8, "alpha": 16.0,
                     "module_names": [n for n, m in model.named_modules() if n.startswith(f"model.layers.{layer}.")
                                      and isinstance(m, torch.nn.Linear)]}
    elif hn is not None:
        cfg = hn.hypernet.config
        oracle_kw = {"rank": int(cfg.rank), "alpha": float(cfg.lora_alpha),
                     "module_names": [n for t in hn.hypernet.types for n in hn.hypernet.module_names(t)]}

    def oracle(m: Any, t: Any, exs: Sequence[Example]) -> AdapterSet:
        return train_policy_lora(m, t, exs, steps=args.oracle_steps, lr=args.oracle_lr, n_upper=args.oracle_n_upper,
                                 seed=args.seed, bf16=bf16, **oracle_kw)

    results, info = evaluate(model, tok, etasks, conditions=conds, hypernet=hn, multitask=multitask,
                             oracle_trainer=oracle, where=args.where, batch_size=args.batch_size, bf16=bf16,
                             max_new_tokens=args.max_new_tokens, seed=args.seed, progress=not args.no_progress,
                             replies=not args.no_replies, reply_tokens=args.reply_tokens)
    config = {
        "tasks": source, "n_policies": len(etasks), "n_examples": sum(len(e.examples) for e in etasks),
        "max_policies": args.max_policies, "examples_per_policy": args.examples_per_policy,
        "oracle_policies_per_family": args.oracle_policies, "oracle_steps": args.oracle_steps, "oracle_lr": args.oracle_lr,
        "where": args.where, "replies": not args.no_replies, "reply_tokens": args.reply_tokens,
        "max_new_tokens": args.max_new_tokens, "bf16": bf16, "hypernet": str(find_hypernet_dir(args.hypernet) or "") if hn else None,
        "multitask_lora": str(mt_path) if mt_path else None, "oracle": {"trainer": "train_policy_lora (CE on answer+eot, plus option choice)",
                                                                       **{k: v for k, v in oracle_kw.items() if k != "module_names"},
                                                                       "n_modules": len(oracle_kw.get("module_names", []))
                                                                       or "q_proj+v_proj, all layers"},
        "model": args.model or "SmolLM2-135M-Instruct (embedded)", "seed": args.seed,
        "machine": f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}".strip(),
        "torch": torch.__version__, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "hyperlora eval " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["eval"] else sys.argv[1:]),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    rep = summarize(etasks, results, info, config)
    esc_paths: dict[str, Any] = {}
    if args.escalate is not None:
        from hyperlora.evaluation.escalation import add_escalation

        esc_paths = add_escalation(rep, model, tok, etasks, results, budget=args.escalate, alpha=args.alpha,
                                   delta=args.delta, where=args.where, batch_size=args.batch_size, bf16=bf16,
                                   seed=args.seed, out_dir=args.out, name=args.name)
        rep["config"]["total_seconds"] = round(time.perf_counter() - t_start, 1)
    paths = {**write_report(rep, etasks, results, args.out, args.name), **esc_paths}
    print(markdown_table(rep))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
