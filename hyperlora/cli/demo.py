"""`hyperlora demo`: enterprise policies -> adapters -> one mixed batch on SmolLM2, beside the base model.

    hyperlora demo                                  # built-in policies, the shipped hypernetwork
    hyperlora demo --policy "Answer 'flag' if the message asks for a refund; otherwise answer 'pass'."
    hyperlora demo --policies-file my_tasks.jsonl   # a task file (policy + first record) or one policy a line

Loads the base model (``hyperlora.modeling.base_model``), the shipped hypernetwork (``hyperlora/checkpoints/``: by
default the policy reader, which reads each policy with the base model itself; a T2L-style checkpoint comes
with the policy encoder it was trained with), attaches the runtime (``hyperlora.attach``), generates every policy's
adapter in one call (timed), and decodes ONE batch in which each row has its own policy and one row none.
No policy text is in any prompt: the record alone is the user turn. Each row's answer is printed beside
the base model's answer to the same prompt, with adapter-generation latency and tokens/s. For policies
that name their answer words in quotes, the demo also prints which of them each model picks, scored the
way ``hyperlora eval`` scores multiple-choice policies (log-likelihood of each option).

Without a trained hypernetwork the demo stops with exit code 2 and says how to get one; ``--untrained``
runs the plumbing with a freshly initialised hypernetwork instead (its adapters are exactly zero, so every
answer equals the base model's), with a loud warning.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from hyperlora.cli.errors import UsageError
from hyperlora.modeling.decoding import pad_id
from hyperlora.modeling.padding import left_pad, pad_ids
from hyperlora.modeling.prompts import prompt_text, target_text
from hyperlora.tasks.format import TaskFormatError, load_tasks

# (policy or None, record): every row of the demo batch. One row has no policy (the base model's own answer).
BUILTIN_ROWS: tuple[tuple[str | None, str], ...] = (
    ("Answer 'escalate' if the ticket reports a security vulnerability; otherwise answer 'close'.",
     "Ticket #4821 (urgent, VIP, via email): I can see another customer's orders by changing the URL."),
    ("Route messages about refunds to 'billing', about password resets to 'accounts', and everything else to "
     "'support'.", "Email from a standard customer: Please refund the blender I returned."),
    ("Answer 'review' if the expense amount is over $500; otherwise answer 'approve'.",
     "Expense line: conference ticket, $1,240."),
    ("Answer 'hold' only if the message threatens legal action and arrived by phone; otherwise answer 'proceed'.",
     "Phone note from a standard customer: I am going to sue your company."),
    ("Start every reply with 'Noted:'.", "Chat message from a VIP customer: My package is a week late."),
    (None, "Chat message from a standard customer: How do I change my password?"),
)


def check_policy_text(text: str, where: str) -> str:
    """A policy given on the command line, checked: non-empty and valid Unicode (bytes that are not UTF-8
    reach ``sys.argv`` as lone surrogates). Raises ``UsageError`` naming ``where``; returns the text."""
    if not text.strip():
        raise UsageError(f"{where}: the policy text is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{where}: the policy text is not valid UTF-8 (character {e.start + 1})") from None
    return text


def read_policies_file(path: str | Path) -> list[tuple[str, str | None]]:
    """(policy, record or None) pairs: a JSONL task file gives each task's policy and first record; any other
    file gives one policy per non-empty line (records then come from the built-in rows)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--policies-file {str(p)!r} does not exist")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise TaskFormatError(f"{p}:{line}: not valid UTF-8 (byte {e.start + 1} of the file)") from None
    first = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")), "")
    if first.startswith("{"):
        return [(t.policy, t.examples[0].input) for t in load_tasks(p)]
    pols = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not pols:
        raise UsageError(f"--policies-file {str(p)!r} holds no policies")
    return [(x, None) for x in pols]


def build_rows(policies: Sequence[tuple[str, str | None]] | None) -> list[tuple[str | None, str]]:
    """The batch: given policies (records filled in from the built-in ones) plus one policy-free row."""
    if not policies:
        return list(BUILTIN_ROWS)
    records = [r for _, r in BUILTIN_ROWS]
    rows: list[tuple[str | None, str]] = [(pol, rec if rec is not None else records[i % (len(records) - 1)])
                                          for i, (pol, rec) in enumerate(policies)]
    rows.append((None, records[-1]))
    return rows


def _left_pad(tokenizer: Any, prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], pad_id(tokenizer),
                        device)


def _decode_rows(tokenizer: Any, new: torch.Tensor, eos: int | None) -> tuple[list[str], int]:
    """Decoded continuations and the number of real new tokens (up to and including EOS)."""
    texts, n = [], 0
    for row in new.tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        n += len(row)
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts, n


_QUOTED = re.compile(r"'([^'\n]{1,40})'")


def policy_options(policy: str | None) -> list[str]:
    """The answer words a policy names in single quotes, in order, deduplicated ([] if fewer than two)."""
    words = list(dict.fromkeys(_QUOTED.findall(policy or "")))
    return words if len(words) >= 2 else []


@torch.no_grad()
def choose_options(rt: Any, tokenizer: Any, rows: Sequence[tuple[str | None, str]],
                   served: Sequence[str | None]) -> list[str | None]:
    """Per row, the option (of its policy's quoted answer words) with the highest summed log-likelihood of
    ``answer + end-of-turn`` after the record-only prompt, with row i served by ``served[i]`` (a policy, or
    None for the base model). This is how ``hyperlora eval`` scores multiple-choice policies. One batch:
    every (row, option) pair is a right-padded sequence under its row's adapter."""
    seqs, owners, spans = [], [], []
    for i, (pol, rec) in enumerate(rows):
        prompt = tokenizer(prompt_text(tokenizer, rec), add_special_tokens=False)["input_ids"]
        for opt in policy_options(pol):
            tgt = tokenizer(target_text(tokenizer, opt), add_special_tokens=False)["input_ids"]
            seqs.append(prompt + tgt)
            owners.append(i)
            spans.append((len(prompt), len(prompt) + len(tgt)))
    choices: list[str | None] = [None] * len(rows)
    if not seqs:
        return choices
    device = next(rt.model.parameters()).device
    ids, mask = pad_ids(seqs, 0)
    with rt.policies([served[i] for i in owners]):
        logits = rt.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
    best: dict[int, tuple[float, str]] = {}
    k = 0
    for i, (pol, _) in enumerate(rows):
        for opt in policy_options(pol):
            a, b = spans[k]
            score = float(logp[k, a - 1:b - 1].sum())
            if i not in best or score > best[i][0]:
                best[i] = (score, opt)
            k += 1
    for i, (_, opt) in best.items():
        choices[i] = opt
    return choices


def run_demo(model: Any, tokenizer: Any, hypernet: Any, encode: Callable[[list[str]], torch.Tensor],
             rows: Sequence[tuple[str | None, str]], *, max_new_tokens: int = 24,
             out: Callable[[str], None] = print) -> dict[str, Any]:
    """Generate the rows' adapters, decode one mixed batch and the same batch on the base model; print both.

    hypernet: a ``HyperNetwork`` for ``model``; encode: policy texts -> [P, E] (the encoder it was trained
    with). The model is detached again before returning. Returns the rows' answers and the timings.
    """
    import hyperlora

    if not rows:
        raise ValueError("rows must hold at least one (policy, record) pair")
    policies = [p for p, _ in rows]
    distinct = [p for p in dict.fromkeys(policies) if p is not None]
    device = next(model.parameters()).device
    ids, mask = _left_pad(tokenizer, [prompt_text(tokenizer, rec) for _, rec in rows], device)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rt = hyperlora.attach(model, hypernet, encoder=encode, max_adapters=max(8, len(distinct)))
    try:
        t0 = time.perf_counter()
        rt.prepare(distinct)  # encoder + hypernetwork + write into the pool, all policies in one call
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        seq = rt.generate(ids, mask, policies=policies, max_new_tokens=max_new_tokens, eos_token_id=eos,
                          pad_token_id=pad)
        mixed_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        base_seq = rt.generate(ids, mask, policies=[None] * len(rows), max_new_tokens=max_new_tokens,
                               eos_token_id=eos, pad_token_id=pad)
        base_s = time.perf_counter() - t0
        picked = choose_options(rt, tokenizer, rows, policies)
        base_picked = choose_options(rt, tokenizer, rows, [None] * len(rows))
        stats = rt.stats()
    finally:
        rt.detach()
    answers, n_mixed = _decode_rows(tokenizer, seq[:, ids.shape[1]:], eos)
    base_answers, n_base = _decode_rows(tokenizer, base_seq[:, ids.shape[1]:], eos)
    w = 44
    out("")
    for i, ((pol, rec), a, b) in enumerate(zip(rows, answers, base_answers)):
        out(f"[row {i}] policy : " + ("(none: base model)" if pol is None else textwrap.shorten(pol, 110)))
        out(f"        record : {textwrap.shorten(rec, 110)}")
        out(f"        hyperlora -> {textwrap.shorten(a or '(empty)', w + 40)}")
        out(f"        base      -> {textwrap.shorten(b or '(empty)', w + 40)}")
        if picked[i] is not None:
            out(f"        choice among {policy_options(pol)}: hyperlora picks {picked[i]!r}, base picks {base_picked[i]!r}")
    out("")
    out(f"adapter generation: {len(distinct)} policies in {gen_s * 1000:.1f} ms "
        f"({gen_s * 1000 / max(1, len(distinct)):.1f} ms per policy, encoder included)")
    out(f"mixed batch ({len(rows)} rows, {len(distinct)} adapters + 1 base row): {n_mixed} new tokens in "
        f"{mixed_s:.2f} s = {n_mixed / max(mixed_s, 1e-9):.1f} tokens/s")
    out(f"base model, same batch: {n_base} new tokens in {base_s:.2f} s = {n_base / max(base_s, 1e-9):.1f} tokens/s")
    return {"rows": [{"policy": p, "record": r, "answer": a, "base": b, "choice": c, "base_choice": bc}
                     for (p, r), a, b, c, bc in zip(rows, answers, base_answers, picked, base_picked)],
            "adapter_generation_s": gen_s, "mixed_tokens": n_mixed, "mixed_s": mixed_s, "base_tokens": n_base,
            "base_s": base_s, "pool": stats}


# ---------------------------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", action="append", default=[], metavar="TEXT",
                   help="a policy to serve (repeatable; replaces the built-in ones)")
    p.add_argument("--policies-file", help="JSONL task file (policy + first record per task) or one policy a line")
    p.add_argument("--model", help="base model directory or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--hypernet", help="hypernetwork directory (default: the shipped hyperlora/checkpoints/)")
    p.add_argument("--untrained", action="store_true",
                   help="no trained hypernetwork: run the plumbing with a fresh one (adapters are zero)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from hyperlora.modeling.base_model import load_base_model
    from hyperlora.evaluation.sources import HypernetSource, find_hypernet_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    given: list[tuple[str, str | None]] = [(check_policy_text(p, f"--policy {i + 1}"), None)
                                           for i, p in enumerate(args.policy)]
    if args.policies_file:
        given += read_policies_file(args.policies_file)
    rows = build_rows(given)
    hn_dir = find_hypernet_dir(args.hypernet)  # a missing --hypernet DIR: one line, exit 2 (cli/main.py)
    if hn_dir is None and not args.untrained:
        print("hyperlora demo: no trained hypernetwork found in hyperlora/checkpoints/.\n"
              "  Train one:   hyperlora train --config hyperlora/training/configs/reader_cpu.json\n"
              "               hyperlora train --config hyperlora/training/configs/reader_cpu_tail.json\n"
              "  then run:    hyperlora demo --hypernet runs/reader_tail/final\n"
              "  or see the plumbing with zero adapters:  hyperlora demo --untrained", file=sys.stderr)
        return 2
    model, tok = load_base_model(args.model)
    if hn_dir is not None:
        src = HypernetSource.from_dir(hn_dir, model, tok)
        print(f"hypernetwork: {hn_dir}")
    else:
        from hyperlora.hypernets.t2l.minilm import PolicyEncoder
        from hyperlora.hypernets.t2l.hypernet import HyperNetwork

        bar = "!" * 78
        print(f"{bar}\n!! WARNING: --untrained: a freshly initialised hypernetwork writes ZERO adapters.\n"
              f"!! Every 'hyperlora' answer below equals the base model's. This shows the plumbing only.\n{bar}",
              file=sys.stderr)
        enc = PolicyEncoder()
        src = HypernetSource(HyperNetwork.for_model(model, task_emb_dim=int(enc.dim)), enc.encode)
    res = run_demo(model, tok, src.hypernet, src.encode, rows, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "pool"}, indent=2, default=str))
    return 0
