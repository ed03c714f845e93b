"""The policy reader (hyperlora/reader.py): feature reading, adapter structure, training, resume, eval loading."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.training.test_train import TINY_TASKS, _run, tiny_model  # noqa: F401  (fixture)


def _reader_args(tiny_model, out):
    return ["--method", "reader", "--tasks", str(TINY_TASKS), "--eval-tasks", str(TINY_TASKS), "--out", str(out),
            "--set", f"base_model=\"{tiny_model}\"", "--set", "n_upper=1", "--set", "reader_gate_layer=1",
            "--set", "eval_every=2", "--set", "save_every=2", "--set", "policies_per_step=2",
            "--set", "examples_per_policy=2", "--set", "bf16=false"]


def _reader(tiny_model):
    from hyperlora.modeling.base_model import load_base_model
    from hyperlora.hypernets.reader.reader import PolicyFeatures, PolicyReader, ReaderConfig, module_name

    model, tok = load_base_model(tiny_model)
    names = {t: module_name(model, 2, t) for t in ("o_proj", "down_proj")}
    mods = dict(model.named_modules())
    cfg = ReaderConfig(layer=2, hidden_size=32, features={t: mods[n].in_features for t, n in names.items()},
                       gate_layer=1, max_tokens=40)
    return model, tok, PolicyFeatures(model, tok, cfg), PolicyReader(cfg, model.get_input_embeddings().weight, names)


def test_features_of_a_text_do_not_depend_on_its_batch(tiny_model):
    model, tok, feats, _ = _reader(tiny_model)
    texts = ["Answer 'flag' if the message asks for a refund; otherwise answer 'pass'.", "Say 'x'."]
    both = feats(texts)
    from hyperlora.hypernets.reader.reader import PolicyFeatures

    alone = PolicyFeatures(model, tok, feats.cfg)([texts[1]])[0]
    for k in ("ids", "h", "o_proj", "down_proj"):
        # bf16 autocast: another batch may change matmul blocking, so allow one bf16 rounding (2^-8 relative) and
        # 1e-3 absolute near zero (states are O(1-100)); measured: exactly equal on this CPU
        torch.testing.assert_close(both[1][k], alone[k], rtol=4e-3, atol=1e-3)
    assert both[0]["ids"].numel() > both[1]["ids"].numel()
    own = tok(texts[1], add_special_tokens=False)["input_ids"]  # the policy's tokens, then the template's tail
    assert both[1]["ids"][: len(own)].tolist() == own
    with pytest.raises(ValueError, match="empty"):
        feats(["   "])


def test_fresh_reader_is_a_no_op_and_pads_with_zeros(tiny_model):
    torch.manual_seed(0)
    model, tok, feats, reader = _reader(tiny_model)
    texts = ["Answer 'flag' if the message asks for a refund; otherwise answer 'pass'.", "Say 'x'."]
    f = feats(texts)
    adapters, gates = reader(f)
    assert torch.count_nonzero(gates) == 0
    for a, b in adapters.values():
        assert torch.count_nonzero(b) == 0  # zero gates: B == 0, so the base model is untouched
    with torch.no_grad():
        reader.gate.weight.normal_()
    adapters, gates = reader(f)
    n1 = f[1]["ids"].numel()
    for a, b in adapters.values():
        assert a.shape[1] == f[0]["ids"].numel() and b.shape[2] == a.shape[1]
        assert torch.count_nonzero(a[1, n1:]) == 0 and torch.count_nonzero(b[1, :, n1:]) == 0
        assert torch.count_nonzero(b[0]) > 0
    assert torch.count_nonzero(gates[1, n1:]) == 0


def test_record_stats_give_a_constant_direction():
    from hyperlora.hypernets.reader.reader import PolicyReader, ReaderConfig

    torch.manual_seed(0)
    cfg = ReaderConfig(layer=0, hidden_size=8, features={"o_proj": 16})
    r = PolicyReader(cfg, torch.randn(50, 8), {"o_proj": "x"})
    x = torch.randn(300, 16) + 5.0 * torch.randn(16)  # a large shared component, as real activations have
    r.set_record_stats({"o_proj": x})
    cx = x @ r.c_o_proj
    # a ridge least-squares fit with 16 free directions over 300 records: measured mean 0.997, std 0.057
    assert abs(cx.mean().item() - 1) < 0.01 and cx.std().item() < 0.1
    torch.testing.assert_close(r.mu_o_proj, x.mean(0))


def test_reader_trains_checkpoints_resumes_and_loads_for_eval(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "reader"
    assert _run([*_reader_args(tiny_model, out), "--steps", "2"]) == 0
    state = json.loads((out / "checkpoint" / "training_state.json").read_text())
    assert state["step"] == 2
    assert _run([*_reader_args(tiny_model, out), "--steps", "4"]) == 0
    assert json.loads((out / "checkpoint" / "training_state.json").read_text())["step"] == 4
    assert "resumed from" in (out / "log.txt").read_text()
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "reader" and res["eval"]
    from hyperlora.modeling.base_model import load_base_model
    from hyperlora.hypernets.reader.reader import ReaderSource
    from hyperlora.evaluation.sources import HypernetSource, find_hypernet_dir

    model, tok = load_base_model(tiny_model)
    d = find_hypernet_dir(out)
    assert d == out / "final"
    src = HypernetSource.from_dir(d, model, tok)
    assert isinstance(src, ReaderSource)
    ad = src(["Answer 'flag' if the message asks for a refund; otherwise answer 'pass'."])
    assert ad.count == 1 and all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in ad.modules.values())
    assert any(torch.count_nonzero(b) > 0 for _, b in ad.modules.values())  # gates moved off zero in 4 steps


def test_bf16_checkpoint_round_trip(tiny_model, tmp_path):
    from hyperlora.hypernets.reader.reader import PolicyReader

    torch.manual_seed(1)
    model, tok, feats, reader = _reader(tiny_model)
    with torch.no_grad():
        for p in reader.parameters():
            p.add_(1e-3 * torch.randn_like(p))
        reader.gate.weight.normal_()
    reader.set_record_stats({"o_proj": torch.randn(64, reader.cfg.features["o_proj"]) + 3,
                             "down_proj": torch.randn(64, reader.cfg.features["down_proj"]) + 3})
    reader.save_pretrained(tmp_path / "r16", dtype=torch.bfloat16)
    back = PolicyReader.from_pretrained(tmp_path / "r16", model)
    for (k, v), (k2, v2) in zip(reader.state_dict().items(), back.state_dict().items()):
        assert k == k2
        if k.split("_", 1)[0] in ("mu", "sd", "c"):
            assert torch.equal(v, v2), k  # statistics stay float32
        elif k.startswith("U."):
            # stored as U - I in bf16: one rounding, <= half of bf16's 2^-7 spacing (measured 3.8e-3); rtol = one spacing
            torch.testing.assert_close(v2 - torch.eye(v.shape[0]), v - torch.eye(v.shape[0]), rtol=8e-3, atol=1e-6)
        else:
            torch.testing.assert_close(v2, v, rtol=8e-3, atol=1e-6)  # one bf16 rounding, as above


def _trained_like(tiny_model, seed=2):
    """A reader with random (non-zero) gates and keys, as after training."""
    torch.manual_seed(seed)
    model, tok, feats, reader = _reader(tiny_model)
    with torch.no_grad():
        reader.gate.weight.normal_(std=0.3)
        for u in reader.U.values():
            u.add_(0.1 * torch.randn_like(u))
    reader.set_record_stats({t: torch.randn(64, n) + 2 for t, n in reader.cfg.features.items()})
    return model, tok, feats, reader


def test_served_reader_matches_its_adapters_and_leaves_base_rows_alone(tiny_model):
    import hyperlora
    from hyperlora.hypernets.reader.reader import ReaderHypernet
    from hyperlora.modeling.prompts import prompt_text

    model, tok, feats, reader = _trained_like(tiny_model)
    hn = ReaderHypernet(reader, feats, max_rank=6, min_gate=0.0)
    pols = ["Answer 'flag' if the message asks for a refund; otherwise answer 'pass'.",
            "Route refunds to 'billing' and everything else to 'support'."]
    per = hn.adapters_for_texts(pols)
    for mods in per:
        assert all(a.shape[0] == 6 and b.shape[1] == 6 for a, b in mods.values())
    # pruning keeps the largest |gate| tokens: the dropped ones change the delta by their own (small) share
    full, gates = reader(feats(pols))
    top = torch.argsort(gates[0].abs(), descending=True)[:6].sort().values
    for n, (a, b) in per[0].items():
        torch.testing.assert_close(a, full[n][0][0, top])
        torch.testing.assert_close(b, full[n][1][0][:, top])
    recs = ["Email from a VIP customer: Please refund the blender I returned.", "Ticket #12: the app crashes."]
    enc = [tok(prompt_text(tok, r), add_special_tokens=False)["input_ids"] for r in recs]
    T = max(map(len, enc))
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, q in enumerate([enc[0], enc[1], enc[0]]):
        ids[i, T - len(q):] = torch.tensor(q)
        mask[i, T - len(q):] = 1
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    rt = hyperlora.attach(model, hn, max_adapters=4, max_rank=8)
    try:
        assert set(rt.target_names) == set(hn.targets())
        with torch.no_grad(), rt.policies([pols[0], pols[1], None]):
            got = rt.model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(got[2], base[2])  # no policy: bitwise the base model
        assert not torch.allclose(got[0], base[0])
        # reference: the same adapters through the training-time hooks, one row at a time
        from hyperlora.adapters.functional import apply_lora

        for i in (0, 1):
            ad = {n: (a[None], b[None]) for n, (a, b) in per[i].items()}
            with torch.no_grad(), rt.policies([None]), apply_lora(model, ad, rows=torch.tensor([0])):
                ref = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits
            # float32, add_lora's torch backend vs the training hooks' bmm (another summation order); measured equal
            torch.testing.assert_close(got[i], ref[0], rtol=1e-5, atol=1e-5)
    finally:
        rt.detach()


def test_served_reader_refuses_empty_policy_and_exports_peft(tiny_model, tmp_path):
    import hyperlora
    from hyperlora.adapters.peft_io import read_peft
    from hyperlora.hypernets.reader.reader import ReaderHypernet

    model, tok, feats, reader = _trained_like(tiny_model, seed=3)
    hn = ReaderHypernet(reader, feats, max_rank=4)
    rt = hyperlora.attach(model, hn, max_adapters=2, max_rank=4)
    try:
        before = rt.stats()
        with pytest.raises(ValueError, match="empty"):
            with rt.policies(["  "]):
                pass
        assert rt.stats() == before  # the refusal touched nothing
        pol = "Answer 'flag' if the message asks for a refund; otherwise answer 'pass'."
        d = rt.export_peft(pol, tmp_path / "peft")
        ad = read_peft(d)
        mine = hn.adapters_for_texts([pol])[0]
        for n, (a, b) in mine.items():
            pa, pb = ad.modules[n]
            # float32 through a PEFT round trip (zero-padded ranks); measured equal
            torch.testing.assert_close(pb.float() @ pa.float(), b @ a, rtol=1e-5, atol=1e-6)
    finally:
        rt.detach()


def test_demo_cli_serves_a_reader_checkpoint(tiny_model, tmp_path, capsys):
    import argparse

    from hyperlora.cli.demo import add_arguments, run

    model, tok, feats, reader = _trained_like(tiny_model, seed=4)
    reader.save_pretrained(tmp_path / "reader", dtype=torch.bfloat16)
    p = argparse.ArgumentParser()
    add_arguments(p)
    pol = "Answer 'flag' if the message asks for a refund; otherwise answer 'pass'."
    rc = run(p.parse_args(["--model", str(tiny_model), "--hypernet", str(tmp_path / "reader"), "--policy", pol,
                           "--max-new-tokens", "3", "--json"]))
    assert rc == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "[row 1] policy : (none: base model)" in out and "choice among ['flag', 'pass']" in out


def test_eval_cli_scores_a_reader_checkpoint(tiny_model, tmp_path):
    import argparse

    from hyperlora.cli.eval import add_arguments, run

    model, tok, feats, reader = _trained_like(tiny_model, seed=5)
    reader.save_pretrained(tmp_path / "reader")
    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "res"
    args = p.parse_args(["--tasks", str(TINY_TASKS), "--model", str(tiny_model), "--hypernet", str(tmp_path / "reader"),
                         "--conditions", "generated", "generated_shuffled", "oracle_lora", "--oracle-steps", "2",
                         "--max-policies", "1", "--examples-per-policy", "4", "--max-new-tokens", "2",
                         "--out", str(out), "--no-progress", "--fp32"])
    assert run(args) == 0
    rep = json.loads((out / "quality.json").read_text())
    assert {"generated", "generated_shuffled", "oracle_lora"} <= set(rep["held_out"])
    # the oracle adapts every projection of the reader's layer at rank 8
    assert rep["config"]["oracle"]["rank"] == 8 and rep["config"]["oracle"]["n_modules"] == 7


# reader_harm's behaviour (the penalty, and that it changes the trained reader): tests/training/test_train.py


def test_reader_trains_with_the_tail_loss(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "reader_tail"
    assert _run([*_reader_args(tiny_model, out), "--steps", "2", "--set", "reader_tail=1.0"]) == 0
    assert "continuations:" in (out / "log.txt").read_text()


def _session_and_random_adapters(tiny_model, n_policies: int):
    from hyperlora.training.config import TrainConfig
    from hyperlora.training.session import build_session

    cfg = TrainConfig(tasks=str(TINY_TASKS), eval_tasks=str(TINY_TASKS), base_model=str(tiny_model), n_upper=1,
                      bf16=False, target_modules=["o_proj"])
    s = build_session(cfg, with_eval=False, log=lambda m: None)
    torch.manual_seed(0)
    mods = dict(s.model.named_modules())
    adapters = {}
    for n in ("model.layers.2.self_attn.o_proj", "model.layers.2.mlp.down_proj"):
        m = mods[n]
        adapters[n] = (torch.randn(n_policies, 3, m.in_features), torch.randn(n_policies, m.out_features, 3))
    return s, adapters


def _full_forward_ce(model, adapters, rows, seqs, first_scored):
    """CE of token q+1 at every position q >= first_scored[i] of each sequence, in a plain full forward."""
    from hyperlora.adapters.functional import apply_lora

    ces = []
    for j, (seq, p) in enumerate(zip(seqs, first_scored)):
        ids = torch.tensor([seq])
        with torch.no_grad(), apply_lora(model, adapters, rows=rows[j:j + 1]):
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        for q in range(p, ids.shape[1] - 1):
            ces.append(-logp[q, ids[0, q + 1]])
    return torch.stack(ces).mean()


def test_tail_loss_equals_a_full_forward(tiny_model, tmp_path, monkeypatch):
    """Continuations.loss (last layer only, from cached states) == CE of the answer's later tokens and the end of
    turn in a plain full forward with the same per-row adapters."""
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    from hyperlora.training.reader_train import Continuations

    s, adapters = _session_and_random_adapters(tiny_model, 2)
    conts = Continuations(s, s.train, log=lambda m: None)
    items = [it for t in s.train.usable_tasks[:2] for it in s.train.items[t][:3]]
    rows = torch.tensor([0, 0, 0, 1, 1, 1])
    got = conts.loss(s, items, adapters, rows)
    cs = [conts.index[(it.task, it.record)][0] for it in items]
    want = _full_forward_ce(s.model, adapters, rows, [conts.ids[c] for c in cs], [conts.prompt_len[c] for c in cs])
    # float32: last layer from cached states vs a full forward, log-softmax over the 49k vocabulary (another
    # summation order); measured 9.5e-4 absolute on a loss of ~11 (8.7e-5 relative)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    every = Continuations(s, s.train, log=lambda m: None, all_options=True)  # every option's continuation
    seqs, seq_rows = [], []
    for j, it in enumerate(items):
        cs = every.index[(it.task, it.record)]
        assert len(cs) == len(it.option_ids) and every.ids[cs[0]] == conts.ids[conts.index[(it.task, it.record)][0]]
        seqs += cs
        seq_rows += [int(rows[j])] * len(cs)
    want = _full_forward_ce(s.model, adapters, torch.tensor(seq_rows), [every.ids[c] for c in seqs],
                            [every.prompt_len[c] for c in seqs])
    # the same float32 summation-order difference as above: measured 9.7e-4 absolute on ~11 (8.9e-5 relative)
    torch.testing.assert_close(every.loss(s, items, adapters, rows), want, rtol=1e-4, atol=1e-4)


def test_free_text_loss_equals_a_full_forward(tiny_model, tmp_path, monkeypatch):
    """FreeTextReplies.ce(first=True) == CE of every reply token (the first included) and the end of turn of the
    format tasks' reference replies, in a plain full forward; its batches name format tasks only."""
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    import random

    from hyperlora.training.reader_train import FreeTextReplies

    s, adapters = _session_and_random_adapters(tiny_model, 3)
    replies = FreeTextReplies(s, s.train, per_task=2, log=lambda m: None)
    assert replies.by_task and all(s.train.tasks[t].is_free_text for t in replies.by_task)
    texts, seqs, rows = replies.batch(s.train, random.Random(0), policies=3, per_policy=2)
    assert len(texts) == 3 and len(seqs) == len(rows) == 6 and set(rows.tolist()) == {0, 1, 2}
    got = replies.ce(s, seqs, adapters, rows, first=True)
    want = _full_forward_ce(s.model, adapters, rows, [replies.ids[c] for c in seqs],
                            [replies.prompt_len[c] - 1 for c in seqs])
    # as the tail loss above, another summation order: measured 3e-6 absolute on ~10.8 (3e-7 relative)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # edge beyond every reply's length scores the same positions in the same order: bitwise equal
    torch.testing.assert_close(replies.ce(s, seqs, adapters, rows, first=True, edge=1000), got, rtol=0, atol=0)
    ends = [replies.ids[c][replies.prompt_len[c] - 1:] for c in seqs]  # edge=1: the first and the last token only
    from hyperlora.adapters.functional import apply_lora

    logp_rows = []
    for j, c in enumerate(seqs):
        ids = torch.tensor([replies.ids[c]])
        with torch.no_grad(), apply_lora(s.model, adapters, rows=rows[j:j + 1]):
            logp = torch.log_softmax(s.model(ids).logits[0].float(), -1)
        p, n = replies.prompt_len[c] - 1, ids.shape[1] - 1
        logp_rows += [-logp[p, ids[0, p + 1]], -logp[n - 1, ids[0, n]]]
    assert all(len(e) >= 3 for e in ends)
    # a mean of only 12 CEs: measured 2.3e-4 absolute on ~10.8 (2.1e-5 relative), float32 summation order
    torch.testing.assert_close(replies.ce(s, seqs, adapters, rows, first=True, edge=1), torch.stack(logp_rows).mean(),
                               rtol=1e-4, atol=1e-4)
    later = replies.ce(s, seqs, adapters, rows, first=False)  # without the first token: another, finite value
    assert torch.isfinite(later) and not torch.isclose(later, got)


def test_reader_trains_with_format_replies(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "reader_free"
    assert _run([*_reader_args(tiny_model, out), "--steps", "2", "--set", "reader_free_text=1.0"]) == 0
    assert "free text:" in (out / "log.txt").read_text()


def test_gate_targets_cover_every_piece_of_an_answer_word():
    from hyperlora.training.reader_train import _runs_of

    assert _runs_of([5, 7, 8, 9, 7, 8], [7, 8]) == [1, 4]
    assert _runs_of([5, 7, 9], [7, 8]) == [] and _runs_of([7], [7, 8]) == []


def test_reader_without_newer_weights_loads_and_unknown_weights_are_refused(tiny_model, tmp_path):
    """Checkpoints written before `prev_w` and `bias_v` existed load with them at 0 (the same adapters); a stray
    weight is an error."""
    from safetensors.torch import load_file, save_file

    from hyperlora.hypernets.reader.reader import WEIGHTS_FILE, PolicyReader

    model, tok, feats, reader = _reader(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        reader.gate.weight.normal_()
    reader.save_pretrained(tmp_path / "r")
    state = load_file(str(tmp_path / "r" / WEIGHTS_FILE))
    for k in [k for k in state if k == "prev_w" or k.startswith("bias_v.")]:  # what the first reader lacked
        del state[k]
    save_file(state, str(tmp_path / "r" / WEIGHTS_FILE))
    loaded = PolicyReader.from_pretrained(tmp_path / "r", model)
    assert loaded.prev_w.item() == 0.0 and all(v.abs().sum() == 0 for v in loaded.bias_v.values())
    f = feats(["Answer 'flag' if the ticket asks for a refund; otherwise answer 'pass'."])
    for (a1, b1), (a2, b2) in zip(reader(f)[0].values(), loaded(f)[0].values()):  # float32 file, same ops: exact
        torch.testing.assert_close(a1, a2, rtol=0, atol=0)
        torch.testing.assert_close(b1, b2, rtol=0, atol=0)
    state["stray"] = torch.zeros(1)
    save_file(state, str(tmp_path / "r" / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="stray"):
        PolicyReader.from_pretrained(tmp_path / "r", model)


def test_reader_fine_tunes_from_a_trained_reader(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "first"
    assert _run([*_reader_args(tiny_model, first), "--steps", "2"]) == 0
    out = tmp_path / "ft"
    assert _run([*_reader_args(tiny_model, out), "--steps", "2", "--set", f"reader_init=\"{first / 'final'}\"",
                 "--set", "reader_tail=0.5"]) == 0
    assert "initialised from the reader" in (out / "log.txt").read_text()


_FILLER = ("This policy covers every message the operations desk receives, from any channel, in any language. " * 12)


def test_long_policy_is_read_whole_past_the_training_window(tiny_model):
    # the reader once read only the first cfg.max_tokens (here 40) tokens: a rule after them changed nothing
    model, tok, feats, _ = _reader(tiny_model)
    a = _FILLER + "Answer 'flag' if the message asks for a refund; otherwise answer 'pass'."
    b = _FILLER + "Answer 'hold' if the message mentions a lawyer; otherwise answer 'open'."
    n_filler = len(tok(_FILLER, add_special_tokens=False)["input_ids"])
    assert n_filler > 200 > feats.cfg.max_tokens
    fa, fb = feats([a, b])
    own = tok(a, add_special_tokens=False)["input_ids"]
    assert fa["ids"][: len(own)].tolist() == own  # every policy token, then the template's tail
    assert not torch.equal(fa["ids"], fb["ids"])
    # the rules after token 200 reach the adapted modules' inputs at their own positions
    m = min(len(fa["o_proj"]), len(fb["o_proj"]))
    assert not torch.allclose(fa["o_proj"][n_filler:m], fb["o_proj"][n_filler:m])


def test_policy_over_the_limit_is_refused_by_name(tiny_model):
    from hyperlora.hypernets.limits import MAX_POLICY_TOKENS, PolicyTooLongError
    from hyperlora.hypernets.reader.reader import PolicyFeatures

    model, tok, feats, _ = _reader(tiny_model)
    assert feats.max_policy_tokens == MAX_POLICY_TOKENS >= 1024
    text = "Answer 'flag' for refunds. " * 200
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    assert n > MAX_POLICY_TOKENS
    with pytest.raises(PolicyTooLongError, match=rf"{n} tokens, more than the {MAX_POLICY_TOKENS}"):
        feats([text])
    assert issubclass(PolicyTooLongError, ValueError)
    small = PolicyFeatures(model, tok, feats.cfg, max_policy_tokens=10)
    with pytest.raises(PolicyTooLongError, match="more than the 10"):
        small(["Answer 'flag' if the message asks for a refund; otherwise answer 'pass'."])
    assert small(["Say 'x' now."])[0]["ids"].numel() > 0  # within the limit: read


def test_runtime_refuses_a_too_long_policy_and_leaks_no_slot(tiny_model):
    import hyperlora
    from hyperlora.hypernets.limits import PolicyTooLongError
    from hyperlora.hypernets.reader.reader import ReaderHypernet

    model, tok, feats, reader = _trained_like(tiny_model, seed=5)
    feats.max_policy_tokens = 60
    hn = ReaderHypernet(reader, feats, max_rank=4)
    rt = hyperlora.attach(model, hn, max_adapters=2, max_rank=4)
    try:
        before = rt.stats()
        with pytest.raises(PolicyTooLongError):
            with rt.policies(["Say 'x' now.", _FILLER]):
                pass
        assert rt.stats() == before  # no slot stays reserved, nothing registered
        with rt.policies(["Say 'x' now.", "Say 'y' now."]):  # both slots still usable
            pass
    finally:
        rt.detach()
