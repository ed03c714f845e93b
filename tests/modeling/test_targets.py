"""Tests for hyperlora.modeling.targets: the one copy of the target-module helpers, and that the runtime and the
hypernetwork pick the same target set (they had two copies of target finding that disagreed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from hyperlora.modeling.targets import (find_targets, group_by_type, layer_index, linear_shape, matches_type,
                                        module_type_of, natural_key, type_of_names)

import transformers  # a test dependency (pyproject [test]): missing, the suite must fail, not skip

from runtime_helpers import default_types, tiny_model  # noqa: E402

from hyperlora import HyperNetwork, attach  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _hypernet(model, types):
    return HyperNetwork.for_model(model, rank=2, target_modules=types, latent_dim=3, task_emb_dim=8,
                                  task_proj_dim=4, layer_emb_dim=4, module_emb_dim=4, hidden_dim=8)


# ---- the name helpers ------------------------------------------------------------------------------

def test_natural_key_orders_layers_numerically():
    names = ["model.layers.10.q", "model.layers.9.q", "model.layers.1.q", "model.layers.2.k"]
    assert sorted(names, key=natural_key) == ["model.layers.1.q", "model.layers.2.k", "model.layers.9.q",
                                             "model.layers.10.q"]


def test_module_name_matching_is_by_whole_trailing_components():
    assert module_type_of("model.layers.3.self_attn.q_proj") == "q_proj"
    assert matches_type("transformer.h.0.attn.c_proj", "c_proj")
    assert matches_type("transformer.h.0.attn.c_proj", "attn.c_proj")
    assert not matches_type("transformer.h.0.mlp.c_proj", "attn.c_proj")
    assert not matches_type("model.layers.0.self_attn.xq_proj", "q_proj")  # a suffix of a component is no match
    assert matches_type("q_proj", "q_proj")


def test_layer_index_is_the_first_integer_component():
    assert layer_index("model.layers.29.mlp.down_proj") == 29
    assert layer_index("transformer.h.3.attn.c_proj") == 3
    assert layer_index("lm_head") is None
    assert layer_index("lm_head", 7) == 7
    assert layer_index("block2.proj", 5) == 5  # digits inside a component are not a layer number


def test_linear_shape_of_linear_conv1d_and_others():
    from transformers.pytorch_utils import Conv1D

    assert linear_shape(nn.Linear(3, 5)) == (3, 5)
    assert linear_shape(Conv1D(7, 4)) == (4, 7)  # Conv1D(nf=d_out, nx=d_in), weight [d_in, d_out]
    assert linear_shape(nn.Embedding(4, 3)) is None
    assert linear_shape(nn.LayerNorm(3)) is None


def test_group_by_type_splits_one_short_name_with_two_shapes():
    model = tiny_model("gpt2")
    targets = find_targets(model, ["c_attn", "c_proj"])
    groups = group_by_type(targets)
    assert sorted(groups) == ["attn.c_proj", "c_attn", "mlp.c_proj"]
    assert groups["mlp.c_proj"] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    assert type_of_names(targets)["transformer.h.1.attn.c_proj"] == "attn.c_proj"


def test_find_targets_is_in_layer_order_with_shapes():
    model = tiny_model("llama")
    targets = find_targets(model, ["v_proj", "q_proj"])
    assert list(targets) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                             "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert targets["model.layers.0.self_attn.v_proj"] == (48, 24)  # 2 kv heads of 12


def test_find_targets_bad_input_is_a_clear_error():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="target_modules is empty"):
        find_targets(model, [])
    with pytest.raises(ValueError, match=r"\['w_proj'\] match no module.*'q_proj'"):
        find_targets(model, ["q_proj", "w_proj"])
    with pytest.raises(ValueError, match="'model.layers.0.mlp' is a LlamaMLP, not an nn.Linear"):
        find_targets(model, ["mlp"])


# ---- one target set for the runtime and the hypernetwork --------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("which", ["all", "first"])
def test_runtime_serves_exactly_the_hypernetwork_targets(arch, which):
    types = default_types(arch) if which == "all" else default_types(arch)[:1]
    model = tiny_model(arch)
    hn = _hypernet(model, types)
    rt = attach(model, target_modules=types, max_adapters=2, max_rank=2, encoder=lambda t: torch.zeros(len(t), 8))
    try:
        assert rt.pool.targets() == hn.targets() == find_targets(model, types)
    finally:
        rt.detach()


class _PackedConv1D(transformers.pytorch_utils.Conv1D):
    """A transformers Conv1D subclass under another class name, with the stock forward (servable as is)."""


def test_conv1d_subclass_is_a_target_for_both():
    """The old hypernetwork copy recognised Conv1D by its class *name* and refused this model ('not a
    Linear/Conv1D'), while the old runtime copy (isinstance) served it: two target sets for one model."""
    model = tiny_model("gpt2")
    for block in model.transformer.h:
        block.attn.c_attn.__class__ = _PackedConv1D
    hn = _hypernet(model, ["c_attn"])
    assert list(hn.targets()) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    rt = attach(model, hn, max_adapters=2, max_rank=2, encoder=lambda t: torch.zeros(len(t), 8))
    try:
        assert rt.pool.targets() == hn.targets() == {n: (48, 144) for n in hn.targets()}
    finally:
        rt.detach()


def test_output_embedding_is_a_target_for_neither():
    """The old hypernetwork copy built adapters for lm_head, which the old runtime copy refused to serve."""
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="'lm_head' is the model's output embedding"):
        _hypernet(model, ["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="'lm_head' is the model's output embedding"):
        attach(model, target_modules=["q_proj", "lm_head"], max_adapters=2, max_rank=2)
    assert not any(type(m).__name__.startswith("Lora") for m in model.modules())  # nothing was replaced
    with pytest.raises(ValueError, match=r"match no module.*'q_proj'") as err:
        find_targets(model, ["nothing"])
    assert "lm_head" not in str(err.value)  # not offered as a linear module type either


class _ScaledLinear(nn.Linear):
    """An nn.Linear subclass with its own forward: a target (hook-based LoRA can adapt it), not servable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


def test_linear_with_own_forward_is_found_but_not_served():
    model = tiny_model("llama")
    model.model.layers[1].self_attn.q_proj.__class__ = _ScaledLinear
    assert "model.layers.1.self_attn.q_proj" in _hypernet(model, ["q_proj"]).targets()
    with pytest.raises(ValueError, match="'model.layers.1.self_attn.q_proj' is a _ScaledLinear with its own forward"):
        attach(model, target_modules=["q_proj"], max_adapters=2, max_rank=2)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # nothing was replaced


@pytest.mark.slow
def test_smollm2_targets_match_the_shipped_hypernetwork():
    """On SmolLM2's architecture (meta device: no weights) the shipped hypernetwork's modules are found with
    its shapes and layer numbers."""
    from hyperlora.modeling.base_model import default_model_path

    SMOLLM2_CONFIG = default_model_path() / "config.json"  # under HYPERLORA_CACHE, materialized on first use
    from hyperlora.hypernets.t2l.hypernet import check_config_matches_model

    cfg_json = json.loads((ROOT / "hyperlora/checkpoints/smollm2-policy-minilm-l29/config.json").read_text())
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(SMOLLM2_CONFIG.parent))
    targets = find_targets(model, cfg_json["target_modules"])
    assert len(targets) == 7 * 30
    assert list(targets)[0] == "model.layers.0.mlp.down_proj" and list(targets)[-1] == "model.layers.29.self_attn.v_proj"
    for t, names in cfg_json["module_names"].items():
        assert [targets[n] for n in names] == [tuple(cfg_json["module_shapes"][t])] * len(names)
        assert [layer_index(n) for n in names] == cfg_json["layer_indices"][t]
    check_config_matches_model(HyperNetwork.config_for_model(model, target_modules=cfg_json["target_modules"]), model)


def test_gpt2_export_from_an_attached_runtime_sets_fan_in_fan_out(tmp_path):
    """peft_io told Conv1D apart by its class name, so an attached GPT-2 (LoraConv1D modules) exported
    fan_in_fan_out=False; it now uses the same Conv1D test as linear_shape."""
    from runtime_helpers import hash_encoder, tiny_hypernet

    model = tiny_model("gpt2")
    rt = attach(model, tiny_hypernet(model, default_types("gpt2")), max_adapters=2, max_rank=8, encoder=hash_encoder)
    try:
        out = rt.export_peft("be brief", tmp_path / "peft")
    finally:
        rt.detach()
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
