"""`hyperlora eval`: task selection, shuffled partners, all conditions end to end on a tiny random Llama,
report files, the CLI on a hand-written task file, and the adapter loaders."""
from __future__ import annotations

import argparse
import json
import os
import sys

import pytest
import torch

from eval_helpers import hash_encoder, tiny_hypernet, tiny_llama, tiny_tokenizer  # noqa: E402

from hyperlora.tasks import tiny_suite  # noqa: E402
from hyperlora.tasks.format import Example, PolicyTask  # noqa: E402
from hyperlora.evaluation.sources import (HypernetSource, find_hypernet_dir, load_lora,  # noqa: E402
                                              stack_adapter_sets, train_policy_lora)
from hyperlora.evaluation.evaluate import (CONDITIONS, evaluate, markdown_table, select_tasks,  # noqa: E402
                                           shuffled_partners, summarize, write_report)
from hyperlora.cli.eval import add_arguments, run  # noqa: E402
from hyperlora.evaluation.scoring import AdapterSet, ScoreRequest, option_logprobs, predict_options  # noqa: E402


@pytest.fixture(scope="module")
def tm():
    tok = tiny_tokenizer()
    return tiny_llama(tok, seed=0), tok


def _held_out():
    return [t for t in tiny_suite() if t.split != "train"]


def test_select_tasks_limits_and_oracle_examples_are_disjoint():
    tasks = _held_out()
    et = select_tasks(tasks, max_policies=1, examples_per_policy=5, oracle_per_family=2)
    assert len(et) == len(tasks)  # one per (split, family) in the tiny set
    assert all(len(e.examples) == 5 for e in et if not e.oracle_train)
    fams = {}
    for e in et:
        if e.oracle_train:
            fams.setdefault(e.family, []).append(e)
            scored = {id(x) for x in e.examples}
            assert not scored & {id(x) for x in e.oracle_train}
    assert set(fams) == {"topic", "routing", "conjunction", "threshold", "format"}
    for lst in fams.values():  # round-robin: the two oracle tasks come from different splits
        assert len(lst) == 2 and lst[0].split != lst[1].split
    # too few extra examples: the task is halved instead
    small = [PolicyTask("p", [Example(f"r{i}", ["a", "b"], "ab"[i % 2]) for i in range(6)])]
    e = select_tasks(small, examples_per_policy=6, oracle_per_family=1)[0]
    assert len(e.oracle_train) == 3 and len(e.examples) == 3 and e.family == "all" and e.split == "user"
    with pytest.raises(ValueError, match="max_policies"):
        select_tasks(tasks, max_policies=0)


def test_shuffled_partners_never_self_prefer_same_family():
    et = select_tasks(_held_out(), max_policies=1, examples_per_policy=2, oracle_per_family=0)
    part = shuffled_partners(et, seed=3)
    for i, j in enumerate(part):
        assert j != i
        assert et[j].task.policy != et[i].task.policy
        assert et[j].family == et[i].family


def test_train_policy_lora_learns_its_examples(tm):
    """The oracle trainer must be able to fit one policy's examples (here: memorise 4 records)."""
    model, tok = tm
    from hyperlora.modeling.prompts import prompt_text

    exs = [Example(f"Ticket {w}", ["flag", "pass"], a) for w, a in
           [("refund now", "flag"), ("hello there", "pass"), ("money back", "flag"), ("thanks", "pass")]]
    reqs = [ScoreRequest(prompt_text(tok, e.input), e.options) for e in exs]
    ad = train_policy_lora(model, tok, exs, rank=4, steps=40, batch_size=4, lr=2e-2, seed=0, bf16=False)
    assert ad.count == 1 and all(a.shape[1] == 4 for a, _ in ad.modules.values())
    reqs1 = [ScoreRequest(r.prompt, r.options, 0) for r in reqs]
    preds = predict_options(reqs1, option_logprobs(model, tok, reqs1, adapters=ad, bf16=False))
    assert preds == [e.answer for e in exs]
    # the model itself was not modified
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="answer"):
        train_policy_lora(model, tok, [Example("x", check={"regex": "a"})], steps=1)


def test_train_policy_lora_cached_lower_layers_equal_full_forward():
    """Training through cached lower-layer states must give the adapters full forwards give."""
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=1, layers=3)
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj")) and ".layers.0." not in n]
    exs = [Example(f"Ticket {w}", ["flag", "pass"], a) for w, a in
           [("refund now", "flag"), ("hello there, a longer one", "pass"), ("money back", "flag")]]
    kw = dict(rank=2, module_names=names, steps=4, batch_size=3, lr=1e-2, seed=0, bf16=False)
    fast = train_policy_lora(model, tok, exs, cache_lower=True, **kw)
    full = train_policy_lora(model, tok, exs, cache_lower=False, **kw)
    assert set(fast.modules) == set(names)
    for n in names:
        assert torch.allclose(fast.modules[n][0], full.modules[n][0], atol=1e-4)
        assert torch.allclose(fast.modules[n][1], full.modules[n][1], atol=1e-4)
        assert fast.modules[n][1].abs().max() > 1e-3  # it trained
    # default targets: q/v of the last n_upper layers only
    d = train_policy_lora(model, tok, exs, rank=2, n_upper=1, steps=1, batch_size=2, bf16=False)
    assert sorted(d.modules) == ["model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]


def test_stack_adapter_sets_folds_scales_and_pads_ranks(tm):
    model, _ = tm
    names = [n for n, _ in model.named_modules() if n.endswith("q_proj")]
    g = torch.Generator().manual_seed(0)

    def mk(r, sc):
        return AdapterSet({n: (torch.randn(1, r, 32, generator=g), torch.randn(1, 32, r, generator=g))
                           for n in names}, sc)

    a, b = mk(2, 2.0), mk(3, 0.5)
    st = stack_adapter_sets([a, b])
    n = names[0]
    A, B = st.modules[n]
    assert A.shape == (2, 3, 32) and B.shape == (2, 32, 3) and st.scale == 1.0
    x = torch.randn(5, 32, generator=g)
    for k, s in enumerate([a, b]):
        ref = s.scale * (x @ s.modules[n][0][0].T) @ s.modules[n][1][0].T
        assert torch.allclose((x @ A[k].T) @ B[k].T, ref, atol=1e-5)


def _random_multitask(model, seed=4) -> AdapterSet:
    g = torch.Generator().manual_seed(seed)
    return AdapterSet({n: (torch.randn(1, 2, m.in_features, generator=g) * 0.3,
                           torch.randn(1, m.out_features, 2, generator=g) * 0.3)
                       for n, m in model.named_modules() if n.endswith("v_proj")}, 2.0)


def test_evaluate_all_conditions_end_to_end(tm, tmp_path):
    model, tok = tm
    et = select_tasks(_held_out(), max_policies=1, examples_per_policy=4, oracle_per_family=1)
    hn = HypernetSource(tiny_hypernet(model), hash_encoder)
    calls = []

    def oracle(m, t, exs):
        calls.append(len(exs))
        return train_policy_lora(m, t, exs, rank=2, steps=2, batch_size=2, seed=0)

    results, info = evaluate(model, tok, et, hypernet=hn, multitask=_random_multitask(model), oracle_trainer=oracle,
                             max_new_tokens=4, progress=False)
    assert set(results) == set(CONDITIONS) and not info["skipped"]
    assert len(calls) == 5  # one oracle per family
    n_all = sum(len(e.examples) for e in et)
    for cond, preds in results.items():
        n = sum(len(p.golds) for p in preds.values())
        assert n == (n_all if cond != "oracle_lora" else sum(len(e.examples) for e in et if e.oracle_train))
        for i, p in preds.items():
            gold = [e.answer if e.options is not None else "pass" for e in et[i].examples]
            assert p.golds == gold
            assert all(pr in (et[i].examples[0].options or ["pass", "fail"]) for pr in p.preds)
    # with a random hypernetwork the generated and shuffled adapters give different scores
    gen_scores = [o for p in results["generated"].values() for o in p.outputs]
    shuf_scores = [o for p in results["generated_shuffled"].values() for o in p.outputs]
    assert gen_scores != shuf_scores
    rep = summarize(et, results, info, {"date": "today", "command": "test"})
    assert set(rep["held_out"]) == set(CONDITIONS)
    assert set(rep["families"]) == {"topic", "routing", "conjunction", "threshold", "format"}
    assert set(rep["splits"]) == {"held_out_combo", "held_out_topic", "held_out_words"}
    assert rep["held_out_n"]["base"] == {"examples": n_all, "policies": len(et)}
    assert rep["oracle_subset"]["base"]["policies"] == 5
    for v in rep["held_out"].values():
        assert 0.0 <= v <= 100.0
    paths = write_report(rep, et, results, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert set(data) >= {"held_out", "families", "splits", "config"}
    assert paths["png"].stat().st_size > 1000 and paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "| **all held-out** |" in paths["md"].read_text()
    lines = paths["predictions"].read_text().splitlines()
    assert len(lines) == sum(sum(len(p.golds) for p in r.values()) for r in results.values())


def test_missing_ingredients_are_skipped_loudly(tm):
    model, tok = tm
    et = select_tasks(_held_out()[:2], max_policies=1, examples_per_policy=2, oracle_per_family=0)
    results, info = evaluate(model, tok, et, conditions=["base", "generated", "multitask_lora", "oracle_lora"],
                             progress=False)
    assert set(results) == {"base"}
    assert set(info["skipped"]) == {"generated", "multitask_lora", "oracle_lora"}
    assert "skipped `generated`" in markdown_table(summarize(et, results, info, {}))
    with pytest.raises(ValueError, match="unknown condition"):
        evaluate(model, tok, et, conditions=["nope"])


def test_cli_on_hand_written_task_file(tm, tmp_path, capsys):
    """A task file written without the generator (no family/split, 3 options, one free-text task)."""
    model, tok = tm
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    f = tmp_path / "mine.jsonl"
    rows = [
        {"policy": "Reply 'red', 'green' or 'blue' by the colour named.",
         "examples": [{"input": f"The car is {c}.", "options": ["blue", "green", "red"], "answer": c}
                      for c in ["red", "green", "blue"] * 3]},
        {"policy": "Start every reply with OK.", "examples": [{"input": f"hi {i}", "check": {"regex": "^OK"},
                                                               "answer": "OK, hello."} for i in range(8)]},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # a multi-task LoRA file in the format `hyperlora train --method multitask_lora` writes
    from safetensors.torch import save_file

    mt = _random_multitask(model)
    save_file({**{f"{n}.lora_A": a.contiguous() for n, (a, _) in mt.modules.items()},
               **{f"{n}.lora_B": b.contiguous() for n, (_, b) in mt.modules.items()}},
              str(tmp_path / "multitask_lora.safetensors"), metadata={"scale": "2.0", "meta": "{}"})
    loaded = load_lora(tmp_path, model)
    assert loaded.scale == 2.0 and set(loaded.modules) == set(mt.modules)
    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "res"
    args = p.parse_args(["--tasks", str(f), "--model", str(mdir), "--conditions", "base", "in_context",
                         "multitask_lora", "oracle_lora", "--multitask-lora", str(tmp_path), "--oracle-steps", "2",
                         "--examples-per-policy", "4", "--max-new-tokens", "3", "--out", str(out), "--no-progress",
                         "--fp32"])
    assert run(args) == 0
    rep = json.loads((out / "quality.json").read_text())
    assert set(rep["held_out"]) == {"base", "in_context", "multitask_lora", "oracle_lora"}
    assert set(rep["families"]) == {"all"} and set(rep["splits"]) == {"user"}
    assert rep["held_out_n"]["base"] == {"examples": 8, "policies": 2}  # oracle tasks' extra examples unscored
    assert rep["config"]["n_policies"] == 2 and rep["config"]["multitask_lora"] == str(tmp_path)
    assert (out / "quality.png").is_file() and (out / "quality.md").is_file()
    assert "all held-out" in capsys.readouterr().out


def test_find_hypernet_dir(tm, tmp_path):
    model, _ = tm
    with pytest.raises(FileNotFoundError):
        find_hypernet_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no hypernetwork"):
        find_hypernet_dir(tmp_path)
    hn = tiny_hypernet(model)
    hn.save_pretrained(tmp_path / "ckpt" / "v1")
    assert find_hypernet_dir(tmp_path) == tmp_path / "ckpt" / "v1"
    assert find_hypernet_dir(tmp_path / "ckpt" / "v1") == tmp_path / "ckpt" / "v1"
    hn.save_pretrained(tmp_path / "ckpt" / "final")
    hn.save_pretrained(tmp_path / "ckpt" / "step_9")  # newer, but an intermediate checkpoint
    assert find_hypernet_dir(tmp_path) == tmp_path / "ckpt" / "final"
    # generated adapters from a loaded directory equal the in-memory hypernetwork's
    src = HypernetSource(hn, hash_encoder)
    from hyperlora.hypernets.t2l.hypernet import HyperNetwork

    src2 = HypernetSource(HyperNetwork.from_pretrained(tmp_path / "ckpt" / "v1", model=model), hash_encoder)
    a, b = src(["policy one", "policy two"]), src2(["policy one", "policy two"])
    for n in a.modules:
        assert torch.equal(a.modules[n][0], b.modules[n][0]) and torch.equal(a.modules[n][1], b.modules[n][1])
    assert a.count == 2 and a.scale == hn.config.scale


# ------------------------------------------------------------------ issue 19 row 19: oracle without answers


def _answerless_free_text(n=8, family="format"):
    return PolicyTask("Start every reply with OK.", [Example(f"hi {i}", check={"regex": "^OK"}) for i in range(n)],
                      family=family, id="ft-no-ref")


def _option_task(n=8, family="topic"):
    return PolicyTask("Answer 'a' or 'b'.", [Example(f"r{i}", ["a", "b"], "ab"[i % 2]) for i in range(n)],
                      family=family, id="mc")


def test_select_tasks_skips_an_oracle_it_cannot_train_up_front():
    et = select_tasks([_answerless_free_text(), _option_task()], examples_per_policy=8, oracle_per_family=1)
    ft, mc = et
    assert ft.oracle_train is None and "answer" in ft.oracle_skipped
    assert len(ft.examples) == 8  # not halved: every example is still scored
    assert mc.oracle_train is not None and mc.oracle_skipped is None and len(mc.examples) == 4


def test_eval_skips_the_oracle_of_a_free_text_task_without_reference_replies(tm, tmp_path):
    # issue 19 row 19: the whole eval died in train_policy_lora ("needs examples with an 'answer'")
    model, tok = tm
    et = select_tasks([_answerless_free_text(), _option_task()], examples_per_policy=8, oracle_per_family=1)
    trained = []

    def oracle(m, t, exs):
        trained.append([e.input for e in exs])
        return train_policy_lora(m, t, exs, rank=2, steps=1, batch_size=2, seed=0)

    results, info = evaluate(model, tok, et, conditions=["base", "oracle_lora"], oracle_trainer=oracle,
                             max_new_tokens=2, progress=False)
    assert len(trained) == 1 and trained[0][0].startswith("r")  # only the option task's oracle was trained
    assert set(results["oracle_lora"]) == {1}
    assert set(info["oracle_skipped"]) == {"ft-no-ref"} and "answer" in info["oracle_skipped"]["ft-no-ref"]
    rep = summarize(et, results, info, {"date": "d", "command": "c"})
    assert rep["oracle_skipped"] == info["oracle_skipped"]
    assert rep["oracle_subset"]["base"]["policies"] == 1
    md = markdown_table(rep)
    assert "no `oracle_lora` for task ft-no-ref" in md and "answer" in md
    # EvalTasks built by hand with answer-less oracle examples are caught too, before any training
    hand = [type(et[0])(et[0].task, et[0].examples[4:], oracle_train=et[0].examples[:4])]
    trained.clear()
    results, info = evaluate(model, tok, hand, conditions=["oracle_lora"], oracle_trainer=oracle, progress=False)
    assert not trained and results == {} and "oracle_skipped" in info["skipped"]["oracle_lora"]


def test_cli_eval_with_answerless_free_text_task_finishes_and_reports_the_skip(tm, tmp_path):
    model, tok = tm
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    f = tmp_path / "tasks.jsonl"
    f.write_text(json.dumps({"policy": "Start every reply with OK.", "id": "no-ref",
                             "examples": [{"input": f"hi {i}", "check": {"regex": "^OK"}} for i in range(8)]}) + "\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "res"
    args = p.parse_args(["--tasks", str(f), "--model", str(mdir), "--conditions", "base", "oracle_lora",
                         "--oracle-policies", "1", "--oracle-steps", "1", "--examples-per-policy", "8",
                         "--max-new-tokens", "2", "--out", str(out), "--no-progress", "--fp32"])
    assert run(args) == 0
    rep = json.loads((out / "quality.json").read_text())
    assert "no-ref" in rep["oracle_skipped"] and "oracle_lora" in rep["skipped"]
    assert "no `oracle_lora` for task no-ref" in (out / "quality.md").read_text()


# ------------------------------------------------------------------ atomic report writes


def test_write_report_is_all_or_nothing(tmp_path):
    et = select_tasks([_option_task(4)], oracle_per_family=0)
    results = {"base": {0: type("P", (), {})()}}
    p = results["base"][0]
    p.golds, p.preds, p.outputs = ["a", "b", "a", "b"], ["a", "a", "a", "b"], ["{}", "{}", "{}", object()]
    rep = summarize(et, {"base": {}}, {}, {"date": "d", "command": "c"})
    names = ["quality.json", "quality.md", "quality_predictions.jsonl"]
    for n in names:
        (tmp_path / n).write_text(f"old {n}\n")
    with pytest.raises(TypeError):  # the 4th prediction row cannot be serialised
        write_report(rep, et, results, tmp_path)
    for n in names:  # old code: json and md overwritten, predictions truncated to 3 rows
        assert (tmp_path / n).read_text() == f"old {n}\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(names)  # no temp files left
    p.outputs[3] = "{}"
    paths = write_report(rep, et, results, tmp_path)
    assert len(paths["predictions"].read_text().splitlines()) == 4
    assert json.loads(paths["json"].read_text())["config"]["command"] == "c"
    assert not [x for x in tmp_path.iterdir() if x.name.endswith(".tmp")]


# ------------------------------------------------------------------ issue 20: replies, several files, fair prompts


def _labelled(tid, n=6, opts=("P1", "P10", "TIER-2"), family="routing"):
    return PolicyTask(f"Policy {tid}: answer P1, P10 or TIER-2.",
                      [Example(f"{tid} record {i}", list(opts), opts[i % len(opts)]) for i in range(n)],
                      family=family, id=tid)


def test_fewshot_shots_never_the_scored_record_and_two_answers():
    from hyperlora.evaluation.evaluate import EvalTask, fewshot_shots

    t = _labelled("a", n=6)
    t.examples.append(Example(t.examples[0].input, list(t.examples[0].options), "P10"))  # same text as record 0
    et = EvalTask(t, t.examples[:4])
    for k, ex in enumerate(et.examples):
        shots = fewshot_shots(et, ex, f"0:0:{k}")
        assert len(shots) == 2
        assert all(rec != ex.input for rec, _ in shots)
        assert len({a for _, a in shots}) == 2  # the policy has several answers: the two shots differ
        assert shots == fewshot_shots(et, ex, f"0:0:{k}")  # deterministic
    assert len({tuple(fewshot_shots(et, et.examples[0], f"s:{k}")) for k in range(20)}) > 1  # the key matters
    one = EvalTask(PolicyTask("p", [Example("x", ["a", "b"], "a"), Example("y", ["a", "b"], "a")]), [])
    assert fewshot_shots(one, one.task.examples[0], "k") == [("y", "a")]  # fewer records: fewer shots


def test_in_context_variants_prompts(tm):
    """in_context_user puts the policy in the user turn; in_context_fewshot adds two labelled chat turns."""
    model, tok = tm
    from hyperlora.evaluation import evaluate as ev

    et = select_tasks([_labelled("a", n=4)], oracle_per_family=0)
    seen: dict[str, list[str]] = {}
    orig = ev.option_logprobs

    def spy(model_, tok_, reqs, **kw):
        seen.setdefault(cur[0], []).extend(r.prompt for r in reqs)
        return orig(model_, tok_, reqs, **kw)

    cur = [""]
    try:
        ev.option_logprobs = spy
        for c in ("in_context", "in_context_user", "in_context_fewshot"):
            cur[0] = c
            evaluate(model, tok, et, conditions=[c], progress=False, replies=False, bf16=False)
    finally:
        ev.option_logprobs = orig
    pol = et[0].task.policy
    assert all(p.startswith(f"<|im_start|>system\n{pol}<|im_end|>") for p in seen["in_context"])
    assert all(f"<|im_start|>user\nPolicy: {pol}\n\nRecord: " in p and "system" not in p
               for p in seen["in_context_user"])
    for p, ex in zip(seen["in_context_fewshot"], et[0].examples):
        assert p.startswith(f"<|im_start|>system\n{pol}<|im_end|>")
        assert p.count("<|im_start|>user\n") == 3 and p.count("<|im_start|>assistant\n") == 3
        assert p.endswith(f"<|im_start|>user\n{ex.input}<|im_end|>\n<|im_start|>assistant\n")
        assert p.count(ex.input) == 1  # the scored record is never a shot


def test_greedy_decode_ids_stops_at_the_given_end_tokens(tm):
    model, tok = tm
    from hyperlora.modeling.decoding import greedy_decode_ids, greedy_decode_texts
    from hyperlora.modeling.prompts import prompt_text

    prompts = [prompt_text(tok, "hello there"), prompt_text(tok, "a much longer record, to pad the other")]
    free = greedy_decode_ids(model, tok, prompts, max_new_tokens=12, eos_token_id=[], batch_size=2)
    assert all(len(f) == 12 for f in free)
    stop = free[0][3]
    cut = greedy_decode_ids(model, tok, prompts, max_new_tokens=12, eos_token_id=[stop], batch_size=2)
    assert cut[0] == free[0][:free[0].index(stop)]
    assert cut[1] == (free[1][:free[1].index(stop)] if stop in free[1] else free[1])
    texts = greedy_decode_texts(model, tok, prompts, max_new_tokens=12, batch_size=2)
    ids = greedy_decode_ids(model, tok, prompts, max_new_tokens=12, batch_size=2)
    assert texts == [tok.decode(t, skip_special_tokens=True) for t in ids]


def test_evaluate_replies_are_the_greedy_replies_under_each_adapter(tm):
    """Every label record of every condition gets a reply; under `generated` it is the greedy reply of the
    bare prompt with that policy's adapter (the same one a user gets), at most reply_tokens long."""
    model, tok = tm
    from hyperlora.evaluation.scoring import greedy_generate_ids
    from hyperlora.modeling.prompts import prompt_text

    et = select_tasks([_labelled("a", n=4), _labelled("b", n=4, family="topic"), _answerless_free_text(3)],
                      oracle_per_family=0)
    hn = HypernetSource(tiny_hypernet(model), hash_encoder)
    results, _ = evaluate(model, tok, et, conditions=["base", "generated"], hypernet=hn, progress=False,
                          reply_tokens=5, max_new_tokens=6, bf16=False)
    for cond, preds in results.items():
        for i, p in preds.items():
            assert len(p.replies) == len(p.golds) == len(p.loops)
            assert all(r is not None for r in p.replies) and all(isinstance(x, bool) for x in p.loops)
    ad = hn([et[1].task.policy])
    ids = greedy_generate_ids(model, tok, [prompt_text(tok, e.input) for e in et[1].examples], [0] * 4, adapters=ad,
                              max_new_tokens=5, bf16=False)
    assert results["generated"][1].replies == [tok.decode(t, skip_special_tokens=True) for t in ids]
    assert all(len(t) <= 5 for t in ids)
    assert results["generated"][2].replies == results["generated"][2].outputs  # free text: the generation
    rep = summarize(et, results, {}, {"date": "d", "command": "c"})
    r = rep["replies"]["generated"]
    assert r["label_policies"] == 2 and r["label_replies"] == 8 and r["replies"] == 11
    # without replies: no extra generations, collapse still reported
    res2, _ = evaluate(model, tok, et, conditions=["base"], progress=False, replies=False, bf16=False, max_new_tokens=2)
    assert res2["base"][0].replies == [None] * 4
    r2 = summarize(et, res2, {}, {})["replies"]["base"]
    assert r2["reply_acc"] is None and r2["collapse_policies"] == 2 and r2["replies"] == 3
    with pytest.raises(ValueError, match="reply_tokens"):
        evaluate(model, tok, et, conditions=["base"], progress=False, reply_tokens=0)


def test_select_tasks_per_file_limits_and_sources():
    a = [_labelled(f"a{i}") for i in range(3)]
    b = [_labelled(f"b{i}") for i in range(3)]
    et = select_tasks(a + b, max_policies=2, oracle_per_family=0, sources=["one.jsonl"] * 3 + ["two.jsonl"] * 3)
    assert [e.task.id for e in et] == ["a0", "a1", "b0", "b1"]  # --max-policies counts per file
    assert [e.file for e in et] == ["one.jsonl"] * 2 + ["two.jsonl"] * 2
    assert select_tasks(a, oracle_per_family=0)[0].file == "tasks"
    with pytest.raises(ValueError, match="sources"):
        select_tasks(a, sources=["x"])


def test_cli_several_task_files_report_per_file(tm, tmp_path):
    model, tok = tm
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    d1, d2 = tmp_path / "x", tmp_path / "y"
    d1.mkdir()
    d2.mkdir()
    from hyperlora.tasks.format import save_tasks

    save_tasks([_labelled("r1"), _labelled("r2", family="topic")], d1 / "dev.jsonl")
    save_tasks([_labelled("r1", opts=("yes", "no")), _answerless_free_text(4)], d2 / "test.jsonl")  # same id r1
    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "res"
    args = p.parse_args(["--tasks", str(d1 / "dev.jsonl"), str(d2 / "test.jsonl"), "--model", str(mdir),
                         "--conditions", "base", "in_context", "in_context_user", "in_context_fewshot",
                         "--oracle-policies", "0", "--examples-per-policy", "4", "--max-new-tokens", "3", "--reply-tokens", "4",
                         "--out", str(out), "--no-progress", "--fp32"])
    assert run(args) == 0
    rep = json.loads((out / "quality.json").read_text())
    assert set(rep["files"]) == {"dev.jsonl", "test.jsonl"}
    assert rep["files"]["dev.jsonl"]["base"]["policies"] == 2 and rep["files"]["test.jsonl"]["base"]["examples"] == 8
    assert rep["files"]["dev.jsonl"]["base"]["label_replies"] == 8
    assert rep["files"]["test.jsonl"]["base"]["replies"] == 8  # 4 label replies + 4 free-text generations
    assert rep["config"]["tasks"] == [str(d1 / "dev.jsonl"), str(d2 / "test.jsonl")]
    assert rep["config"]["reply_tokens"] == 4 and rep["config"]["replies"] is True
    assert rep["best_in_context"]["condition"] in ("in_context", "in_context_user", "in_context_fewshot")
    for c in ("base", "in_context", "in_context_user", "in_context_fewshot"):
        r = rep["replies"][c]
        assert r["label_replies"] == 12 and r["replies"] == 16 and r["collapse_policies"] == 3
        for k in ("reply_acc", "clean", "loop", "collapse"):
            assert r[k] is None or 0.0 <= r[k] <= 100.0
    md = (out / "quality.md").read_text()
    assert "file: dev.jsonl" in md and "file: test.jsonl" in md and "## Replies" in md
    rows = [json.loads(x) for x in (out / "quality_predictions.jsonl").read_text().splitlines()]
    assert {r["file"] for r in rows} == {"dev.jsonl", "test.jsonl"}
    lab = [r for r in rows if r["gold"] != "pass"]
    assert lab and all("reply" in r and "clean" in r and "reply_option" in r and "loop" in r for r in lab)
    # the same file name in two folders: the report names the paths
    (d2 / "dev.jsonl").write_text((d2 / "test.jsonl").read_text())
    args = p.parse_args(["--tasks", str(d1 / "dev.jsonl"), str(d2 / "dev.jsonl"), "--model", str(mdir),
                         "--conditions", "base", "--examples-per-policy", "2", "--max-new-tokens", "2",
                         "--no-replies", "--out", str(out), "--name", "q2", "--no-progress", "--fp32"])
    assert run(args) == 0
    rep = json.loads((out / "q2.json").read_text())
    assert set(rep["files"]) == {str(d1 / "dev.jsonl"), str(d2 / "dev.jsonl")}
    assert rep["replies"]["base"]["label_replies"] == 0 and rep["config"]["replies"] is False
