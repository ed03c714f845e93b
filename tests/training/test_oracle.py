"""training/oracle.py: the one oracle-LoRA trainer, used by `hyperlora train --method oracle_lora` and
`hyperlora eval` alike."""
from __future__ import annotations

import json

import pytest
import torch

from tests.training.test_train import TINY_TASKS, _common, _run, tiny_model  # noqa: F401  (fixture)


def _session(tiny_model, **kw):
    from hyperlora.training.config import TrainConfig
    from hyperlora.training.session import build_session

    cfg = TrainConfig(tasks=str(TINY_TASKS), eval_tasks=str(TINY_TASKS), base_model=str(tiny_model), n_upper=2,
                      bf16=False, oracle_steps=3, **kw)
    return build_session(cfg, with_train=False, log=lambda m: None)


def test_evaluation_reexports_the_training_oracle():
    from hyperlora.evaluation import sources
    from hyperlora.training import oracle

    assert sources.train_policy_lora is oracle.train_policy_lora


def test_method_oracle_lora_trains_each_policy_with_train_policy_lora(tiny_model, tmp_path, monkeypatch):
    """--method oracle_lora's adapters are train_policy_lora's, on each policy's training share of its records,
    bit for bit (it used to train a second, joint estimator with other numbers)."""
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))
    from hyperlora.evaluation.sources import read_lora_file
    from hyperlora.modeling.prompts import prompt_text
    from hyperlora.training.data import spread_over_families
    from hyperlora.training.oracle import train_oracles, train_policy_lora

    out = tmp_path / "or"
    assert _run([*_common(tiny_model, tmp_path, out), "--method", "oracle_lora", "--set", "oracle_steps=3",
                 "--set", "oracle_tasks_per_split=2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert {"held_out_combo", "held_out_topic", "held_out_words"} <= set(res["eval"])

    s = _session(tiny_model)
    split = "held_out_topic"
    data = s.evals[split]
    tids = spread_over_families(data, 2)
    adapters, tr, te, _ = train_oracles(s, split, tids, log=lambda m: None)
    saved = read_lora_file(out / f"oracle_{split}.safetensors")
    assert float(saved.scale) == 1.0 and set(saved.modules) == set(adapters.modules) == set(s.target_names)
    for n, (a, b) in adapters.modules.items():
        assert torch.equal(saved.modules[n][0], a) and torch.equal(saved.modules[n][1], b), n
    for k, t in enumerate(tids):
        assert tr[t] and te[t] and not {id(i) for i in tr[t]} & {id(i) for i in te[t]}
        task = data.tasks[t]
        by_prompt = {prompt_text(s.tokenizer, ex.input): ex for ex in task.examples}
        exs = [by_prompt[data.records[it.record]] for it in tr[t]]
        ref = train_policy_lora(s.model, s.tokenizer, exs, rank=s.cfg.rank, alpha=s.cfg.lora_alpha,
                                module_names=s.target_names, steps=3, lr=s.cfg.oracle_lr, seed=s.cfg.seed + k,
                                bf16=False)
        for n, (a, b) in ref.modules.items():
            assert torch.equal(adapters.modules[n][0][k], a[0]) and torch.equal(adapters.modules[n][1][k], b[0]), n


def test_train_policy_lora_refuses_bad_input_before_training(tiny_model):
    from hyperlora.modeling.base_model import load_base_model
    from hyperlora.tasks.format import load_tasks
    from hyperlora.training.oracle import train_policy_lora

    model, tok = load_base_model(tiny_model)
    exs = load_tasks(TINY_TASKS)[0].examples
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="steps > 0"):
        train_policy_lora(model, tok, exs, steps=0)
    with pytest.raises(ValueError, match="not modules of the base model"):
        train_policy_lora(model, tok, exs, module_names=["model.layers.9.self_attn.q_proj"], steps=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
