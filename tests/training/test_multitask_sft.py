"""The fair multi-task baseline (training/multitask_sft.py): every layer, policy in the system turn, SFT on the answer."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.training.test_train import TINY_TASKS, _run, tiny_model  # noqa: F401  (fixture)


def _args(tiny_model, out, steps):
    return ["--method", "multitask_sft", "--tasks", str(TINY_TASKS), "--out", str(out), "--steps", str(steps),
            "--set", f"base_model=\"{tiny_model}\"", "--set", "n_upper=3", "--set", "rank=4",
            "--set", 'target_modules=["q_proj","v_proj","down_proj"]', "--set", "policies_per_step=2",
            "--set", "examples_per_policy=2", "--set", "save_every=2", "--set", "warmup=1", "--set", "lr=0.01",
            "--set", "bf16=false"]


def test_trains_every_layer_and_resumes_bitwise(tiny_model, tmp_path, monkeypatch):
    import pytest

    from hyperlora.training import multitask_sft

    assert _run(_args(tiny_model, tmp_path / "straight", 5)) == 0
    straight = load_file(str(tmp_path / "straight" / "multitask_lora.safetensors"))
    names = {k.rsplit(".lora_", 1)[0] for k in straight}
    assert len(names) == 3 * 3  # 3 module types in each of the 3 layers
    assert any(float(v.abs().sum()) > 0 for k, v in straight.items() if k.endswith("lora_B"))  # it learned
    # a run killed right after its step-2 checkpoint, then the same command again
    real = multitask_sft.save_checkpoint

    def crash_after_first(*a, **kw):
        real(*a, **kw)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(multitask_sft, "save_checkpoint", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        _run(_args(tiny_model, tmp_path / "resumed", 5))
    monkeypatch.setattr(multitask_sft, "save_checkpoint", real)
    assert not (tmp_path / "resumed" / "multitask_lora.safetensors").exists()
    assert _run(_args(tiny_model, tmp_path / "resumed", 5)) == 0
    assert "resumed at step 2" in (tmp_path / "resumed" / "log.txt").read_text()
    resumed = load_file(str(tmp_path / "resumed" / "multitask_lora.safetensors"))
    for k in straight:
        # the same batches (seeded by step), the same AdamW moments and step count; measured equal
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6)


def test_labels_cover_only_the_answer_and_end_of_turn(tiny_model):
    from hyperlora.modeling.base_model import load_base_model
    from hyperlora.modeling.prompts import end_of_turn
    from hyperlora.tasks.format import load_tasks
    from hyperlora.training.multitask_sft import _batch

    _, tok = load_base_model(tiny_model)
    tasks = load_tasks(TINY_TASKS)
    ex = tasks[0].examples[0]
    ids, mask, lab = _batch(tok, tasks, [(tasks[0].policy, 0, 0), ("A much longer wording of it, " * 3, 0, 1)])
    kept = lab[0][lab[0] != -100].tolist()
    assert tok.decode(kept) == ex.answer + end_of_turn(tok)
    assert (lab[mask == 0] == -100).all()
    n = int(mask[0].sum())
    assert ids[0, n - len(kept):n].tolist() == kept  # the labels are the sequence's own last tokens
