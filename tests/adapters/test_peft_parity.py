"""Issue 19 row 10: hand-edited PEFT folders are read exactly as PEFT reads them, or refused.

Each case edits a saved adapter's config (target_modules, layers_to_transform, layers_pattern, exclude_modules)
or its keys (prefix, adapter name), loads the folder in `peft.PeftModel.from_pretrained` and in the runtime
(`load_peft`), and compares the logits. Before the fix hyperlora applied every tensor in the file, PEFT only
those of the modules its config wraps (logits differed by 1.1-5.9). A property test also compares the
module-selection rule itself with PEFT's `check_target_module_exists` on random configs.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from runtime_helpers import forward_logits, make_peft_dir, padded_batch, tiny_model

import hyperlora
from hyperlora.adapters.peft_io import PeftFormatError, read_peft

import peft  # a test dependency (pyproject [test]): missing, the suite must fail, not skip

LLAMA_TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _edit_config(d, **changes):
    p = d / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def _edit_tensors(d, fn):
    from safetensors.torch import load_file, save_file

    p = d / "adapter_model.safetensors"
    t = load_file(str(p))
    fn(t)
    save_file(t, str(p))


def _peft_logits(model, d, ids, mask):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the keys it ignores
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(d)).eval()
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def _ours(model, d, ids, mask, types):
    rt = hyperlora.attach(model, target_modules=types, max_adapters=2, max_rank=8)
    try:
        name = rt.load_peft(d)
        with rt.policies([name] * ids.shape[0]):
            return forward_logits(model, ids, mask)
    finally:
        rt.detach()


def _all_applied(model, d, ids, mask):
    """What the old reader computed: every lora_A/lora_B pair in the file merged in, whatever the config says."""
    from safetensors.torch import load_file

    cfg = json.loads((d / "adapter_config.json").read_text())
    m = copy.deepcopy(model)
    with torch.no_grad():
        for k, a in load_file(str(d / "adapter_model.safetensors")).items():
            if ".lora_A." not in k:
                continue
            b = load_file(str(d / "adapter_model.safetensors"))[k.replace("lora_A", "lora_B")]
            mod = m.get_submodule(k[len("base_model.model."):].split(".lora_A")[0])
            delta = (cfg["lora_alpha"] / cfg["r"]) * (b @ a)
            if type(mod).__name__ == "Conv1D":
                mod.weight += delta.T
            else:
                mod.weight += delta
    return forward_logits(m, ids, mask)


# (arch, types served and saved, config edits, what PEFT then wraps - for the reader's `ignored` list)
CASES = {
    "target_modules list drops v_proj": ("llama", ("q_proj", "v_proj"), {"target_modules": ["q_proj"]}),
    "target_modules regex, layer 1 only": (
        "llama", ("q_proj", "v_proj"), {"target_modules": r".*\.layers\.1\.self_attn\.(q_proj|v_proj)"}),
    "layers_to_transform [0]": ("llama", ("q_proj", "v_proj"), {"layers_to_transform": [0]}),
    "layers_to_transform int 1": ("llama", ("q_proj", "down_proj"), {"layers_to_transform": 1}),
    "layers_pattern layers": ("llama", ("q_proj", "v_proj"), {"layers_to_transform": [1], "layers_pattern": "layers"}),
    "layers_pattern list": ("llama", ("v_proj", "up_proj"),
                            {"layers_to_transform": [0], "layers_pattern": ["blocks", "layers"]}),
    "layers_pattern on gpt2 (h)": ("gpt2", ("c_attn", "c_fc"), {"layers_to_transform": [0], "layers_pattern": "h"}),
    "exclude_modules list": ("llama", ("q_proj", "v_proj", "up_proj"), {"exclude_modules": ["v_proj"]}),
    "exclude_modules suffix": ("llama", ("q_proj", "v_proj"), {"exclude_modules": ["layers.0.self_attn.q_proj"]}),
    "exclude_modules regex": ("llama", ("q_proj", "v_proj"), {"exclude_modules": r".*layers\.0\..*"}),
    "all-linear with exclude": ("llama", tuple(LLAMA_TYPES), {"target_modules": "all-linear",
                                                              "exclude_modules": ["down_proj", "gate_proj"]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hand_edited_config_is_read_as_peft_reads_it(case, tmp_path):
    arch, saved, edits = CASES[case]
    model = tiny_model(arch)
    d = make_peft_dir(model, tmp_path / "a", r=4, alpha=8, targets=saved, seed=11)
    _edit_config(d, **edits)
    ids, mask, _ = padded_batch([6, 5])
    want = _peft_logits(model, d, ids, mask)
    everything = _all_applied(model, d, ids, mask)
    assert (everything - want).abs().max() > 1e-2, "the edit must matter, or the case tests nothing"
    got = _ours(model, d, ids, mask, list(saved))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # float32 logits, PEFT's op order vs ours: ~1e-6 apart; the bugs these guard were 1.9-5.0
    assert read_peft(d).ignored, "some tensors in the file are not applied by PEFT, and are listed"


def test_tensors_of_unwrapped_modules_are_ignored_like_peft(tmp_path):
    """Tensors of modules PEFT does not wrap are ignored, whether the model has the module (layer 0's up_proj,
    not served here) or not (layer 7's)."""
    model = tiny_model("llama")
    d = make_peft_dir(model, tmp_path / "a", targets=("q_proj",), seed=2)

    def add(t):
        for layer in (0, 7):
            k = f"base_model.model.model.layers.{layer}.mlp.up_proj"
            t[f"{k}.lora_A.weight"], t[f"{k}.lora_B.weight"] = torch.ones(4, 48), torch.ones(80, 4)
    _edit_tensors(d, add)
    ids, mask, _ = padded_batch([5])
    want = _peft_logits(model, d, ids, mask)
    torch.testing.assert_close(_ours(model, d, ids, mask, ["q_proj"]), want, rtol=1e-4, atol=1e-4)  # as above
    assert len(read_peft(d).ignored) == 4


def test_keys_with_and_without_the_prefix_are_refused(tmp_path):
    """PeftModel ignores keys lacking `base_model.model.` (transformers' load_adapter applies them): ambiguous."""
    model = tiny_model("llama")
    d = make_peft_dir(model, tmp_path / "a", targets=("q_proj", "v_proj"), seed=4)

    def add_unprefixed(t):
        for k in [k for k in t if ".v_proj." in k]:
            t[k[len("base_model.model."):]] = t[k] * 3
    _edit_tensors(d, add_unprefixed)
    ids, mask, _ = padded_batch([5])
    prefixed_only = tmp_path / "b"
    make_peft_dir(model, prefixed_only, targets=("q_proj", "v_proj"), seed=4)
    torch.testing.assert_close(_peft_logits(model, d, ids, mask), _peft_logits(model, prefixed_only, ids, mask))
    with pytest.raises(PeftFormatError, match=r"lacks the 'base_model\.model\.' prefix: PeftModel\.from_pretrained "
                                              r"ignores such keys"):
        _ours(model, d, ids, mask, ["q_proj", "v_proj"])


def test_keys_with_an_adapter_name_are_refused(tmp_path):
    model = tiny_model("llama")
    d = make_peft_dir(model, tmp_path / "a", targets=("q_proj",), seed=4)
    _edit_tensors(d, lambda t: t.update({k.replace(".weight", ".default.weight"): t.pop(k) for k in list(t)}))
    with pytest.raises(PeftFormatError, match=r"carries an adapter name \('default'\)"):
        _ours(model, d, *padded_batch([5])[:2], ["q_proj"])


def test_wrapped_module_without_tensors(tmp_path):
    """PEFT initialises a wrapped module the file has no tensors for: B = 0 (a no-op) with init_lora_weights=true,
    random A and B with false, which cannot be reproduced: read with true, refused with false."""
    model = tiny_model("llama")
    d = make_peft_dir(model, tmp_path / "a", targets=("q_proj", "v_proj"), seed=6)  # init_lora_weights=False
    _edit_tensors(d, lambda t: [t.pop(k) for k in list(t) if "layers.1.self_attn.v_proj" in k])
    ids, mask, _ = padded_batch([5])
    with pytest.raises(PeftFormatError, match=r"no tensors, and init_lora_weights=False makes PEFT initialise them "
                                              r"randomly"):
        _ours(model, d, ids, mask, ["q_proj", "v_proj"])
    _edit_config(d, init_lora_weights=True)
    torch.testing.assert_close(_ours(model, d, ids, mask, ["q_proj", "v_proj"]), _peft_logits(model, d, ids, mask),
                               rtol=1e-4, atol=1e-4)  # as above


@pytest.mark.parametrize("edits,match", [
    ({"target_modules": "q_proj", "layers_pattern": "layers"}, "layers_pattern cannot be used when target_modules "
                                                               "is a str"),
    ({"layers_pattern": "layers"}, "layers_pattern is set but layers_to_transform is not"),
    ({"layers_to_transform": [7]}, "select none of the modules served"),
    ({"exclude_modules": ["q_proj", "v_proj"]}, "select none of the modules served"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' initialises from the base weight"),
    ({"target_modules": "all-linear", "layers_to_transform": [0]}, "layers_to_transform cannot be used when "
                                                                   "target_modules is a str"),
    ({"target_modules": r".*q_proj", "layers_to_transform": 0}, "layers_to_transform cannot be used"),
])
def test_configs_peft_refuses_or_reads_model_dependently_are_refused(edits, match, tmp_path):
    model = tiny_model("llama")
    d = make_peft_dir(model, tmp_path / "a", targets=("q_proj", "v_proj"), seed=1)
    _edit_config(d, **edits)
    rt = hyperlora.attach(model, target_modules=["q_proj", "v_proj"], max_adapters=2, max_rank=8)
    try:
        with pytest.raises(PeftFormatError, match=match):
            rt.load_peft(d)
    finally:
        rt.detach()


# ---- the selection rule itself against PEFT's check_target_module_exists on random configs ----

import hypothesis  # a test dependency (pyproject [test]): missing, the suite must fail, not skip
st = hypothesis.strategies

_NAMES = sorted({n for arch in ("llama", "gpt2") for n, _ in tiny_model(arch).named_modules() if n})
_WORDS = ["q_proj", "v_proj", "up_proj", "down_proj", "self_attn.q_proj", "mlp.up_proj", "layers.0.self_attn.q_proj",
          "model.layers.1.mlp.down_proj", "proj", "c_attn", "attn.c_attn", "h.1.mlp.c_fc", "lm_head", "mlp"]
_REGEXES = [r".*\.(q|v)_proj", r".*layers\.1\..*", r"model\.layers\.\d+\.mlp\..*", r".*c_(attn|fc)", r"q_proj",
            r".*\.h\.0\..*", r".*"]
_target_modules = st.one_of(st.lists(st.sampled_from(_WORDS), min_size=1, max_size=4), st.sampled_from(_REGEXES))
_exclude = st.one_of(st.none(), st.lists(st.sampled_from(_WORDS), max_size=2), st.sampled_from(_REGEXES))
_layers = st.one_of(st.none(), st.integers(-1, 2), st.lists(st.integers(0, 2), max_size=3))
_pattern = st.one_of(st.none(), st.just(""), st.sampled_from(["layers", "h", "blocks", "model.layers", "lay.rs"]),
                     st.lists(st.sampled_from(["layers", "h", "blocks"]), max_size=2))


@hypothesis.settings(max_examples=150, deadline=None, database=None)
@hypothesis.given(tm=_target_modules, ex=_exclude, lt=_layers, lp=_pattern)
def test_module_selection_matches_peft(tm, ex, lt, lp, tmp_path_factory):
    from peft.tuners.tuners_utils import check_target_module_exists

    from hyperlora.adapters.peft_io import _Patterns, _TargetRule

    cfg = {"target_modules": tm, "exclude_modules": ex, "layers_to_transform": lt, "layers_pattern": lp}
    try:
        ref = peft.LoraConfig(r=4, **cfg)
    except ValueError:
        ref = None  # PEFT refuses the config: so must we
    path = tmp_path_factory.getbasetemp() / "adapter_config.json"
    if ref is None:
        with pytest.raises(PeftFormatError):
            _TargetRule(cfg, path, _Patterns(path))
        return
    if isinstance(tm, str) and tm.lower() == "all-linear":  # pragma: no cover - not generated
        return
    rule = _TargetRule(cfg, path, _Patterns(path))
    for name in _NAMES:
        assert rule(name) == bool(check_target_module_exists(ref, name)), (name, cfg)
