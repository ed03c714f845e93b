"""`hyperlora train`: train the hypernetwork (SFT through the frozen base model) or a baseline.

    hyperlora train --config hyperlora/training/configs/cpu.json [--method sft] [--out runs/x] [--set key=value]

Methods: sft (the T2L-style hypernetwork), reader (the policy reader, hyperlora/hypernets/reader/reader.py), rule_heads (the
reader's heads for reply-format rules (prefixes, sign-offs) and numeric thresholds, hyperlora/hypernets/reader/rules/reply_format.py and
hyperlora/hypernets/reader/rules/threshold.py; needs reader_init), multitask_lora (one LoRA, policy in the prompt), multitask_sft (the fair multi-task baseline: one LoRA on
every layer, the policy in the system turn, SFT on answer + end of turn; hyperlora/training/multitask_sft.py), oracle_lora (one LoRA per
held-out policy), reconstruct (regress a library of PEFT LoRAs, each with its policy.txt, onto the T2L-style
hypernetwork: --set lora_library='"DIR"', or --set build_library=true to train one oracle LoRA per training task
first; hyperlora/training/reconstruct.py). Every method uses the same tasks, target modules, rank and step
budget; sft, reader and the baselines the same loss. Checkpoints (safetensors + JSON) go to --out;
re-running the same command resumes from the last checkpoint. Progress bars via tqdm.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hyperlora.cli.errors import UsageError
from hyperlora.training.config import TrainConfig  # light (no torch): --list-fields reads its help texts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="JSON training config (fields of TrainConfig); flags below override it")
    parser.add_argument("--method", choices=["sft", "reader", "rule_heads", "reconstruct", "multitask_lora", "multitask_sft", "oracle_lora"],
                        help="reader: the policy reader (docs/READER.md); rule_heads: add the format-rule and threshold heads "
                             "to the reader in reader_init; sft: the T2L-style hypernetwork; "
                             "reconstruct: fit the T2L-style hypernetwork to a library of PEFT LoRAs; "
                             "multitask_lora / oracle_lora: baselines; multitask_sft: the fair multi-task baseline "
                             "(every layer, the policy in the system turn, trained to reply with the answer)")
    parser.add_argument("--tasks", help="training tasks JSONL (default: the generated suite's train split)")
    parser.add_argument("--eval-tasks", help="held-out tasks JSONL (default: the generated held-out splits)")
    parser.add_argument("--out", help="output directory (checkpoints, logs, results)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, help="torch threads (default from config: 2)")
    parser.add_argument("--time-budget", type=float, dest="time_budget_s", help="stop training after N seconds")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if --out has a checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field (JSON value), e.g. --set encoder='\"base_mean\"' --set n_upper=8 "
                             "(--list-fields lists them)")
    parser.add_argument("--list-fields", action="store_true",
                        help="print every training config field with its help text and default, then exit")


def _build_config(args: argparse.Namespace):
    from hyperlora.training.config import TrainConfig

    try:  # a bad config file or --set value is bad input: one line, exit 2 (cli/main.py)
        cfg = TrainConfig.load(args.config) if args.config else TrainConfig()
        d = cfg.to_dict()
        for key in ("method", "tasks", "eval_tasks", "out", "steps", "seed", "threads", "time_budget_s"):
            v = getattr(args, key, None)
            if v is not None:
                d[key] = v
        for kv in args.set:
            if "=" not in kv:
                raise UsageError(f"--set expects KEY=VALUE, got {kv!r}")
            k, v = kv.split("=", 1)
            try:
                d[k] = json.loads(v)
            except (json.JSONDecodeError, RecursionError):
                d[k] = v
        return TrainConfig.from_dict(d)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    if getattr(args, "list_fields", False):
        for name, text in TrainConfig.field_help().items():
            print(f"{name:28s} {text}")
        return 0
    cfg = _build_config(args)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(cfg.recipe(), indent=2) + "\n")  # run-only settings left out
    log_path = out / "log.txt"

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    log(f"hyperlora train --method {cfg.method} -> {out}")
    t0 = time.time()
    if cfg.method == "reconstruct":
        from hyperlora.training.reconstruct import run_reconstruct

        res = run_reconstruct(cfg, log=log, resume=not args.no_resume)
        res["train_seconds"] = round(time.time() - t0, 1)
        (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
        log(json.dumps(res["eval"]))
        return 0
    if cfg.method == "rule_heads":
        from hyperlora.training.rule_train import train_rule_heads

        res = train_rule_heads(cfg, out, log=log)
        (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
        return 0
    from hyperlora.training.session import build_session

    if cfg.method == "sft":
        from hyperlora.training.sft import quick_eval, train_sft

        s = build_session(cfg, log=log)
        hn, enc, hist = train_sft(s, log=log, resume=not args.no_resume)
        ev = quick_eval(s, hn, enc, cfg.eval_tasks_per_split)
        final = out / "final"
        hn.save_pretrained(final)
        enc.save(final)
        res = {"method": "sft", "eval": ev, "train_seconds": round(time.time() - t0, 1)}
    elif cfg.method == "reader":
        from hyperlora.training.reader_train import train_reader
        from hyperlora.training.sft import quick_eval_with

        s = build_session(cfg, log=log)
        reader, features, hist = train_reader(s, log=log, resume=not args.no_resume)
        ev = quick_eval_with(s, lambda txts: (reader(features(list(txts)))[0], 1.0), cfg.eval_tasks_per_split)
        reader.save_pretrained(out / "final")
        res = {"method": "reader", "eval": ev, "train_seconds": round(time.time() - t0, 1)}
    elif cfg.method == "multitask_sft":
        from hyperlora.modeling.base_model import load_base_model
        from hyperlora.training.multitask_sft import train_multitask_sft
        from hyperlora.training.session import load_train_tasks

        model, tok = load_base_model(cfg.base_model)
        model.to(cfg.device)
        lora, hist = train_multitask_sft(model, tok, load_train_tasks(cfg), cfg, out, log=log, resume=not args.no_resume)
        res = {"method": "multitask_sft", "eval": {}, "history": hist[-5:], "train_seconds": round(time.time() - t0, 1),
               "note": "score it with hyperlora eval --multitask-lora <out>/multitask_lora.safetensors"}
    elif cfg.method == "multitask_lora":
        from hyperlora.training.baselines import accuracy_with, train_multitask
        from hyperlora.training.data import spread_over_families

        s = build_session(cfg, policy_in_prompt=True, log=log)
        lora, hist = train_multitask(s, log=log)
        lora.save(out / "multitask_lora.safetensors", {"config": cfg.recipe()})
        res = {"method": "multitask_lora", "eval": {}, "train_seconds": round(time.time() - t0, 1)}
        for name, d in s.evals.items():
            rows = [(0, it) for t in spread_over_families(d, cfg.eval_tasks_per_split) for it in d.items[t]]
            fam = {t: d.tasks[t].family or "tasks" for t in d.usable_tasks}
            acc, fams, n = accuracy_with(s, s.eval_states[name], rows, lora.adapters(), lora.scale, families=fam)
            base, _, _ = accuracy_with(s, s.eval_states[name], rows, None, families=fam)
            res["eval"][name] = {"multitask_lora": round(acc, 1), "in_context": round(base, 1), "families": fams, "n": n}
            log(f"{name}: multitask_lora {acc:.1f}  in_context {base:.1f}  (n={n})")
    else:  # oracle_lora: train_policy_lora per held-out policy (training/oracle.py), as hyperlora eval's oracle
        from hyperlora.training.baselines import accuracy_with, save_lora_file, train_oracles
        from hyperlora.training.data import spread_over_families

        s = build_session(cfg, with_train=False, log=log)
        res = {"method": "oracle_lora", "eval": {}}
        for name, d in s.evals.items():
            tids = spread_over_families(d, cfg.oracle_tasks_per_split)
            loras, tr, te, secs = train_oracles(s, name, tids, log=log)
            save_lora_file(out / f"oracle_{name}.safetensors", dict(loras.modules), 1.0,
                           {"tasks": [d.tasks[t].id for t in tids]})
            rows = [(k, it) for k, t in enumerate(tids) for it in te[t]]
            fam = {t: d.tasks[t].family or "tasks" for t in tids}
            acc, fams, n = accuracy_with(s, s.eval_states[name], rows, dict(loras.modules), 1.0, families=fam)
            base, _, _ = accuracy_with(s, s.eval_states[name], rows, None, families=fam)
            res["eval"][name] = {"oracle_lora": round(acc, 1), "base": round(base, 1), "families": fams, "n": n,
                                 "seconds": round(secs, 1), "seconds_per_policy": round(secs / len(tids), 1)}
            log(f"{name}: oracle_lora {acc:.1f}  base {base:.1f}  (n={n}, {secs:.0f} s for {len(tids)} policies)")
        res["train_seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    log(json.dumps(res["eval"]))
    return 0
