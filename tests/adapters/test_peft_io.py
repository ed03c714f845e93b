"""PEFT interchange: export loads in peft.PeftModel and reproduces the adapter; read_peft validates and agrees
with what PEFT itself computes, including rank_pattern / alpha_pattern and rsLoRA."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from hyperlora.hypernets.t2l.hypernet import find_targets
from hyperlora.adapters.peft_io import VLLM_RANKS, export_peft, export_policy, read_peft, vllm_problems, write_peft

import peft  # a test dependency (pyproject [test]): missing, the suite must fail, not skip


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def random_adapters(targets: dict, rank: int, seed: int = 1, ranks: dict | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, (d_in, d_out) in targets.items():
        r = (ranks or {}).get(n, rank)
        out[n] = (torch.randn(r, d_in, generator=g) * 0.3, torch.randn(d_out, r, generator=g) * 0.3)
    return out


def merged_logits(model, adapters: dict, scale: float | dict, ids: torch.Tensor) -> torch.Tensor:
    """Oracle: the base model with W += scale * B @ A merged by hand (float64), independent of PEFT."""
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, (a, b) in adapters.items():
            mod = m.get_submodule(name)
            s = scale[name] if isinstance(scale, dict) else scale
            delta = s * (b.double() @ a.double())  # [d_out, d_in]
            if type(mod).__name__ == "Conv1D":
                mod.weight += delta.T
            else:
                mod.weight += delta
        return m(ids).logits.float()


@pytest.mark.parametrize("builder,types", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])])
@pytest.mark.parametrize("rank", [8, 5])  # 5 is not a vLLM rank: padded to 8, alpha scaled
def test_export_loads_in_peft_and_reproduces_logits(tmp_path, builder, types, rank):
    model = builder()
    targets = find_targets(model, types)
    adapters = random_adapters(targets, rank)
    alpha = 12.0
    export_peft(adapters, tmp_path, rank=rank, alpha=alpha, base_model=model)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] in VLLM_RANKS and cfg["bias"] == "none" and cfg["use_dora"] is False
    assert cfg["lora_alpha"] / cfg["r"] == pytest.approx(alpha / rank)
    assert cfg["fan_in_fan_out"] == (builder is tiny_gpt2)
    assert vllm_problems(tmp_path) == []
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    expected = merged_logits(model, adapters, alpha / rank, ids)
    base = model(ids).logits
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    with torch.no_grad():
        got = pm(ids).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and read_peft gives back exactly what was exported
    ad = read_peft(tmp_path, targets=targets, max_rank=64)
    assert ad.rank == cfg["r"] and set(ad.modules) == set(adapters)
    for n, (a, b) in adapters.items():
        a2, b2, s = ad.raw[n]
        assert torch.equal(a2[:rank], a) and torch.count_nonzero(a2[rank:]) == 0
        assert torch.equal(b2[:, :rank], b)
        assert s == pytest.approx(alpha / rank)
        torch.testing.assert_close(ad.modules[n][1], b2 * s)


def test_read_peft_matches_peft_trained_adapter_with_patterns(tmp_path):
    model = tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          rank_pattern={"layers.1.self_attn.v_proj": 2}, alpha_pattern={"q_proj": 3})
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(str(tmp_path))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = pm.eval()(ids).logits
    targets = find_targets(model, ["q_proj", "v_proj", "k_proj"])
    ad = read_peft(tmp_path, targets=targets, max_rank=8)
    assert ad.raw["model.layers.1.self_attn.v_proj"][0].shape[0] == 2
    assert ad.raw["model.layers.0.self_attn.q_proj"][2] == pytest.approx(3 / 4)
    assert ad.raw["model.layers.1.self_attn.v_proj"][2] == pytest.approx(8 / 2)
    got = merged_logits(model, {n: (a, b) for n, (a, b) in ad.modules.items()}, 1.0, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert ad.key == read_peft(tmp_path, targets=targets, max_rank=8).key


def test_rslora_scale(tmp_path):
    model = tiny_llama()
    targets = find_targets(model, ["q_proj"])
    export_peft(random_adapters(targets, 8), tmp_path, rank=8, alpha=4)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    ad = read_peft(tmp_path, targets=targets, max_rank=8)
    assert next(iter(ad.raw.values()))[2] == pytest.approx(4 / 8 ** 0.5)


def _exported(tmp_path, model=None, rank=8, types=("q_proj", "v_proj")):
    model = model or tiny_llama()
    targets = find_targets(model, list(types))
    export_peft(random_adapters(targets, rank), tmp_path, rank=rank, alpha=16)
    return targets


def _edit_config(tmp_path, **changes):
    p = tmp_path / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,match", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias='all'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"r": 0}, "r must be a positive int"),
    ({"r": 16}, "exceeds the pool's max_rank=8"),
    ({"rank_pattern": {"q_proj": 32}}, r"rank_pattern\['q_proj'\]=32 exceeds"),
    ({"lora_alpha": "big"}, "lora_alpha must be a number"),
    ({"target_modules": ["gate_proj"]}, r"target_modules \['gate_proj'\] are not among"),
    ({"peft_type": "IA3"}, "not LORA"),
    # finite alpha and B whose product overflows float32 (the PEFT fuzz run's one crash: it loaded as Inf)
    ({"lora_alpha": 1e300}, "overflows"),
])
def test_read_peft_refuses_bad_configs(tmp_path, changes, match):
    targets = _exported(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        read_peft(tmp_path, targets=targets, max_rank=8)


def test_read_peft_refuses_pickles_and_missing_config(tmp_path):
    targets = _exported(tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickled weights are refused because loading a pickle can run arbitrary code"):
        read_peft(tmp_path, targets=targets, max_rank=8)
    (tmp_path / "adapter_model.bin").rename(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        read_peft(tmp_path, targets=targets, max_rank=8)


def _rewrite_tensors(tmp_path, fn):
    from safetensors.torch import load_file, save_file

    p = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(p))
    fn(tensors)
    save_file(tensors, str(p))


@pytest.mark.parametrize("edit,match", [
    (lambda t: t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].__setitem__((0, 0), float("nan")),
     "NaN or Inf"),
    (lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"), "needs lora_A and lora_B"),
    (lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", torch.ones(8, 31)),
     r"needs lora_A \[8, 32\]"),
    (lambda t: t.__setitem__("base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight", torch.ones(8, 32)),
     "not served for this model"),  # wrapped by target_modules (q_proj) but the model has no layer 5
    (lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", torch.ones(32)),
     "DoRA magnitude"),
])
def test_read_peft_refuses_bad_tensors(tmp_path, edit, match):
    targets = _exported(tmp_path)
    _rewrite_tensors(tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        read_peft(tmp_path, targets=targets, max_rank=8)


def test_model_without_the_adapters_modules_is_refused(tmp_path):
    _exported(tmp_path, types=("q_proj", "v_proj"))
    only_q = find_targets(tiny_llama(), ["q_proj"])
    with pytest.raises(ValueError, match=r"target_modules \['v_proj'\]"):
        read_peft(tmp_path, targets=only_q, max_rank=8)


def test_export_policy_and_write_peft(tmp_path):
    from hyperlora.hypernets.t2l.hypernet import HyperNetwork

    model = tiny_llama()
    hn = HyperNetwork.for_model(model, rank=4, target_modules=("q_proj", "v_proj"), latent_dim=4, task_emb_dim=8,
                                lora_alpha=6.0)
    with torch.no_grad():
        for t in hn.types:
            hn.head(t)[1].normal_(0, 0.3)
    emb = torch.randn(1, 8)
    export_policy(hn, emb, tmp_path / "p", base_model=model)
    ids = torch.randint(0, 64, (1, 5))
    adapters = {n: (a, b) for n, (a, b) in hn.adapters(emb)[0].items()}
    want = merged_logits(model, {n: (a.detach(), b.detach()) for n, (a, b) in adapters.items()}, 6.0 / 4, ids)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "p")).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, want, rtol=1e-4, atol=1e-4)
    write_peft(tmp_path / "w", {n: (a.detach(), b.detach()) for n, (a, b) in adapters.items()}, rank=4, lora_alpha=4,
               base_model=model)
    assert json.loads((tmp_path / "w" / "adapter_config.json").read_text())["lora_alpha"] == 8  # padded to r=8


def test_read_peft_without_targets_checks_only_the_adapter(tmp_path):
    targets = _exported(tmp_path)
    ad = read_peft(tmp_path)
    assert set(ad.modules) == set(targets) and ad.rank == 8
    _rewrite_tensors(tmp_path, lambda t: t.__setitem__(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", torch.ones(32, 7)))
    with pytest.raises(ValueError, match=r"needs lora_A \[8, 32\] and lora_B \[32, 8\]"):
        read_peft(tmp_path)


def test_export_of_an_upper_layers_hypernetwork_targets_only_its_modules(tmp_path):
    from hyperlora.hypernets.t2l.hypernet import HyperNetwork

    model = tiny_llama()
    cfg = HyperNetwork.config_for_model(model, rank=2, latent_dim=3, task_emb_dim=8, hidden_dim=8, lora_alpha=2.0)
    for t in cfg.target_modules:
        cfg.module_names[t], cfg.layer_indices[t] = cfg.module_names[t][1:], cfg.layer_indices[t][1:]
    hn = HyperNetwork(cfg)
    with torch.no_grad():
        for t in hn.types:
            hn.head(t)[1].normal_(0, 0.3)
    emb = torch.randn(1, 8)
    export_policy(hn, emb, tmp_path, base_model=model)
    tm = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert sorted(tm) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]  # not every q/v
    ids = torch.randint(0, 64, (1, 5))
    adapters = {n: (a.detach(), b.detach()) for n, (a, b) in hn.adapters(emb)[0].items()}
    want = merged_logits(model, adapters, 1.0, ids)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_vllm_problems_flags_what_vllm_refuses(tmp_path):
    model = tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True, bias="all")
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    pm.save_pretrained(str(tmp_path))
    found = " | ".join(vllm_problems(tmp_path))
    for expected in ("r=4 is not one of", "bias='all'", "use_dora", "lora_magnitude_vector"):
        assert expected in found, (expected, found)
