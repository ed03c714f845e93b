"""HyperNetwork: shapes read from real (tiny) transformers models, the head layout, T2L init, save/load, identity."""
from __future__ import annotations

import json

import pytest
import torch

from hyperlora.hypernets.t2l.hypernet import HyperNetwork, HyperNetworkConfig, find_targets
from hyperlora.adapters.pool import AdapterPool
from hyperlora.runtime.writing import generate_into_slots

E = 16


def tiny_llama(layers: int = 3, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def tiny_gpt2(layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def make_hn(model=None, **kw) -> HyperNetwork:
    model = model if model is not None else tiny_llama()
    kw.setdefault("rank", 4)
    kw.setdefault("latent_dim", 6)
    kw.setdefault("task_emb_dim", E)
    kw.setdefault("hidden_dim", 24)
    return HyperNetwork.for_model(model, **kw)


def randomize_b(hn: HyperNetwork) -> None:
    with torch.no_grad():
        for t in hn.types:
            hn.head(t)[1].normal_(0, 0.3)


@pytest.mark.parametrize("builder,targets,expected", [
    (tiny_llama, ("q_proj", "v_proj"), {"q_proj": [32, 32], "v_proj": [32, 16]}),
    (tiny_mistral, ("q_proj", "k_proj", "o_proj"), {"q_proj": [32, 32], "k_proj": [32, 16], "o_proj": [32, 32]}),
    (tiny_qwen2, ("v_proj", "down_proj"), {"v_proj": [32, 16], "down_proj": [48, 32]}),
    (tiny_gpt2, ("c_attn", "c_fc"), {"c_attn": [32, 96], "c_fc": [32, 128]}),  # Conv1D weight is [d_in, d_out]
])
def test_for_model_reads_shapes(builder, targets, expected):
    model = builder()
    hn = make_hn(model, target_modules=targets)
    assert hn.config.module_shapes == expected
    n_layers = model.config.num_hidden_layers
    for t in targets:
        names = hn.module_names(t)
        assert len(names) == n_layers
        for n in names:  # the names exist in the model and have the recorded shape
            mod = model.get_submodule(n)
            d_in, d_out = expected[t]
            w = mod.weight
            assert tuple(w.shape) in {(d_out, d_in), (d_in, d_out)}
        w_a, w_b = hn.head(t)
        K = hn.config.latent_dim + 1
        assert tuple(w_a.shape) == (4 * K, expected[t][0]) and tuple(w_b.shape) == (expected[t][1], 4 * K)


def test_gpt2_c_proj_is_split_by_shape_into_two_types(tmp_path):
    # GPT-2 has attn.c_proj (32->32) and mlp.c_proj (128->32) under one short name: two types, two heads.
    model = tiny_gpt2()
    hn = make_hn(model, target_modules=["c_proj"])
    assert hn.types == ["attn.c_proj", "mlp.c_proj"]
    assert hn.module_names("mlp.c_proj") == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    hn.save_pretrained(tmp_path)
    HyperNetwork.from_pretrained(tmp_path, model=model)  # and it still matches its own model
    pool = AdapterPool(hn.targets(), max_adapters=2, max_rank=4)
    assert pool.module_types() == ["attn.c_proj", "mlp.c_proj"]
    assert pool.shape("mlp.c_proj") == (128, 32)
    from hyperlora.hypernets.t2l.hypernet import type_of_names

    types = type_of_names(find_targets(model, ["c_attn", "c_proj"]))
    assert types["transformer.h.1.mlp.c_proj"] == "mlp.c_proj" and types["transformer.h.0.attn.c_attn"] == "c_attn"


def test_unknown_target_module_names_it_and_lists_available():
    with pytest.raises(ValueError, match=r"\['qq_proj'\].*q_proj"):
        make_hn(target_modules=("qq_proj",))


def test_fresh_hypernetwork_is_noop_adapter_but_a_varies():
    torch.manual_seed(0)
    hn = make_hn()
    gen = hn.generate(torch.randn(3, E))
    for t, (a, b) in gen.items():
        assert torch.count_nonzero(b) == 0
        assert a.abs().max() > 0
        assert not torch.allclose(a[0], a[1])  # A depends on the policy from the start


def test_latents_match_explicit_concatenation_in_float64():
    torch.manual_seed(1)
    hn = make_hn(trunk_layers=3).double()
    e = torch.randn(5, E, dtype=torch.float64)
    z = hn.latents(e)
    t = hn.task_proj(e)
    for mi, mtype in enumerate(hn.types):
        zt = z[mtype]
        L = len(hn.module_names(mtype))
        assert zt.shape == (5, L, hn.config.latent_dim + 1)
        assert torch.equal(zt[..., -1], torch.ones(5, L, dtype=torch.float64))
        for p in range(5):
            for li, layer in enumerate(hn.config.layer_indices[mtype]):
                x = torch.cat([t[p], hn.layer_emb.weight[layer], hn.module_emb.weight[mi]])
                ref = hn.trunk(hn.trunk_in(x))
                torch.testing.assert_close(zt[p, li, :-1], ref, rtol=1e-12, atol=1e-12)


def test_generate_follows_head_layout_contract():
    torch.manual_seed(2)
    hn = make_hn().double()
    randomize_b(hn)
    e = torch.randn(2, E, dtype=torch.float64)
    z = hn.latents(e)
    gen = hn.generate(e)
    R, K = hn.config.rank, hn.config.K
    for t in hn.types:
        w_a, w_b = hn.head(t)
        a, b = gen[t]
        p, l = 1, 2
        zz = z[t][p, l]
        ref_a = torch.stack([sum(zz[k] * w_a[r * K + k] for k in range(K)) for r in range(R)])
        ref_b = torch.stack([sum(zz[k] * w_b[:, r * K + k] for k in range(K)) for r in range(R)], dim=1)
        torch.testing.assert_close(a[p, l], ref_a)
        torch.testing.assert_close(b[p, l], ref_b)


def test_different_policies_give_different_adapters_and_gradients_flow():
    torch.manual_seed(3)
    hn = make_hn()
    randomize_b(hn)
    gen = hn.generate(torch.randn(2, E))
    a, b = gen["q_proj"]
    assert not torch.allclose(b[0], b[1]) and not torch.allclose(a[0], a[1])
    loss = sum((a ** 2).sum() + (b ** 2).sum() for a, b in gen.values())
    loss.backward()
    for name in ("trunk_in.weight", "layer_emb.weight", "module_emb.weight", "head_a.q_proj", "head_b.v_proj"):
        g = dict(hn.named_parameters())[name].grad
        assert g is not None and g.abs().max() > 0, name


def test_save_load_round_trip_bit_for_bit(tmp_path):
    torch.manual_seed(4)
    model = tiny_llama()
    hn = make_hn(model)
    randomize_b(hn)
    hn.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert HyperNetworkConfig.from_dict(cfg) == hn.config
    assert (tmp_path / "hypernet.safetensors").read_bytes()[8:9] == b"{"  # safetensors header, not a pickle
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    hn2 = HyperNetwork.from_pretrained(tmp_path, model=model)
    s1, s2 = hn.state_dict(), hn2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert s1[k].dtype == s2[k].dtype and torch.equal(s1[k], s2[k]), k
    assert hn.weights_id() == hn2.weights_id()
    e = torch.randn(2, E)
    for t in hn.types:
        assert torch.equal(hn.generate(e)[t][1], hn2.generate(e)[t][1])


def test_bfloat16_save_load_keeps_dtype(tmp_path):
    hn = make_hn().to(torch.bfloat16)
    hn.save_pretrained(tmp_path)
    hn2 = HyperNetwork.from_pretrained(tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in hn2.parameters())
    assert hn.weights_id() == hn2.weights_id()


def test_from_pretrained_refuses_mismatched_model(tmp_path):
    hn = make_hn(tiny_llama(layers=3, hidden=32))
    hn.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"q_proj shape .*\(32, 32\).*\(64, 64\)"):
        HyperNetwork.from_pretrained(tmp_path, model=tiny_llama(layers=3, hidden=64))
    with pytest.raises(ValueError, match=r"q_proj modules: hypernetwork has 3, 1 of them not in the model .*layers\.2"):
        HyperNetwork.from_pretrained(tmp_path, model=tiny_llama(layers=2, hidden=32))
    with pytest.raises(ValueError, match=r"model_type.*llama.*gpt2|match no module"):
        HyperNetwork.from_pretrained(tmp_path, model=tiny_gpt2())


def test_from_pretrained_refuses_pickles_and_bad_configs(tmp_path):
    hn = make_hn()
    hn.save_pretrained(tmp_path)
    (tmp_path / "hypernet.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled weights are refused"):
        HyperNetwork.from_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rank"] = 0
    with pytest.raises(ValueError, match="rank"):
        HyperNetworkConfig.from_dict(cfg)
    cfg["rank"] = 4
    cfg["surprise"] = 1
    with pytest.raises(ValueError, match="unknown fields"):
        HyperNetworkConfig.from_dict(cfg)


def test_weights_id_tracks_weights_and_config():
    torch.manual_seed(5)
    model = tiny_llama()
    hn = make_hn(model)
    wid = hn.weights_id()
    assert wid == hn.weights_id()
    twin = make_hn(model)
    twin.load_state_dict(hn.state_dict())
    assert twin.weights_id() == wid
    opt = torch.optim.SGD(hn.parameters(), lr=0.1)
    loss = sum(a.sum() + b.sum() for a, b in hn.generate(torch.randn(1, E)).values())
    loss.backward()
    opt.step()
    assert hn.weights_id() != wid
    other = make_hn(model, lora_alpha=3.0)
    other.load_state_dict(twin.state_dict())
    assert other.weights_id() != wid  # same weights, other config


def test_task_emb_validation():
    hn = make_hn()
    with pytest.raises(ValueError, match=r"task_emb must be \[P, 16\]"):
        hn.latents(torch.randn(2, E + 1))
    with pytest.raises(TypeError, match="task_emb"):
        hn.latents([[0.0] * E])


def _pool_for(hn: HyperNetwork, extra: dict | None = None, **kw) -> AdapterPool:
    targets = hn.targets()
    targets.update(extra or {})
    return AdapterPool(targets, **{"max_adapters": 5, "max_rank": 8, **kw})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_into_pool_matches_generate(dtype):
    torch.manual_seed(6)
    hn = make_hn()
    randomize_b(hn)
    extra = {f"model.layers.{i}.mlp.up_proj": (32, 48) for i in range(3)}
    pool = _pool_for(hn, extra, dtype=dtype)
    for t in pool.module_types():  # poison: previous tenants' weights everywhere
        for buf in pool.buffers(t):
            buf.normal_()
    before = {t: [b.clone() for b in pool.buffers(t)] for t in pool.module_types()}
    slots = [pool.allocate(f"k{i}", 4, s) for i, s in enumerate([0.5, 2.0])]
    e = torch.randn(2, E)
    generate_into_slots(hn, e, pool, slots)
    gen = hn.generate(e)
    # bf16 pool: one rounding of the float32 value (half a unit in the last place is 2^-9 relative)
    tol = dict(rtol=4e-3, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for t in hn.types:
        a_buf, b_buf = pool.buffers(t)
        for p, (s, sc) in enumerate(zip(slots, [0.5, 2.0])):
            torch.testing.assert_close(a_buf[:, s, :4].float(), gen[t][0][p].detach(), **tol)
            torch.testing.assert_close(b_buf[:, s, :, :4].float(), sc * gen[t][1][p].detach(), **tol)
            assert torch.count_nonzero(a_buf[:, s, 4:]) == 0 and torch.count_nonzero(b_buf[:, s, :, 4:]) == 0
        untouched = [i for i in range(5) if i not in slots]
        assert torch.equal(a_buf[:, untouched], before[t][0][:, untouched])
        assert torch.equal(b_buf[:, untouched], before[t][1][:, untouched])
    a_up, b_up = pool.buffers("up_proj")  # not covered by the hypernetwork: zero in these slots
    assert torch.count_nonzero(a_up[:, slots]) == 0 and torch.count_nonzero(b_up[:, slots]) == 0
    assert pool.stats()["generations"] == 2
    assert pool.get("k0") == slots[0]


def test_generate_into_pool_refuses_bad_slots():
    hn = make_hn()
    pool = _pool_for(hn)
    with pytest.raises(ValueError, match="not allocated"):
        generate_into_slots(hn, torch.randn(1, E), pool, [0])
    s = pool.allocate("k", 2, 1.0)
    with pytest.raises(ValueError, match="rank 2.*rank 4"):
        generate_into_slots(hn, torch.randn(1, E), pool, [s])
    s = pool.allocate("k4", 4, 1.0)
    generate_into_slots(hn, torch.randn(1, E), pool, [s])
    with pool.in_flight([s]):
        with pytest.raises(ValueError, match="in-flight"):
            generate_into_slots(hn, torch.randn(1, E), pool, [s])
    small = AdapterPool(hn.targets(), max_adapters=2, max_rank=2)
    with pytest.raises(ValueError, match="max_rank"):
        generate_into_slots(hn, torch.randn(1, E), small, [0])
    other = make_hn(tiny_llama(layers=4))
    with pytest.raises(ValueError, match=r"differ.*model\.layers\.3"):
        generate_into_slots(other, torch.randn(1, E), pool, [s])
    wider = make_hn(tiny_llama(layers=3, hidden=64))
    with pytest.raises(ValueError, match="pool shape"):
        generate_into_slots(wider, torch.randn(1, 16), pool, [s])


def test_policy_to_pool_flow_hits_cache_and_distinguishes_texts():
    """encoder -> content key -> pool: the same text hits (no second generation), another text differs."""
    from hyperlora.hypernets.t2l.minilm import PolicyEncoder

    torch.manual_seed(7)
    hn = make_hn()
    randomize_b(hn)
    calls: list[list[str]] = []

    def fn(texts):
        calls.append(texts)
        return torch.stack([torch.randn(E, generator=torch.Generator().manual_seed(len(t) * 31 + ord(t[0])))
                            for t in texts])

    enc = PolicyEncoder(fn)
    pool = _pool_for(hn)

    def serve(text: str) -> int:
        key = AdapterPool.content_key(hn.weights_id(), text, hn.config.rank, hn.config.scale)
        slot = pool.get(key)
        if slot is None:
            slot = pool.allocate(key, hn.config.rank, hn.config.scale)
            generate_into_slots(hn, enc.encode(text), pool, [slot])
        return slot

    s1 = serve("Refunds only within 30 days.")
    s2 = serve("Refunds only within 30 days.")
    assert s1 == s2 and pool.stats()["generations"] == 1 and pool.stats()["hits"] == 1 and len(calls) == 1
    s3 = serve("Never mention competitors.")
    assert s3 != s1 and pool.stats()["generations"] == 2
    a, b = pool.buffers("q_proj")
    assert not torch.allclose(b[:, s1], b[:, s3]) and not torch.allclose(a[:, s1], a[:, s3])
    with torch.no_grad():  # a retrained hypernetwork must not reuse the old adapter
        hn.head("q_proj")[1].add_(0.1)
    s4 = serve("Refunds only within 30 days.")
    assert s4 not in (s1, s3) and pool.stats()["generations"] == 3


def test_hypernetwork_on_a_subset_of_layers_zeroes_the_others(tmp_path):
    """Trained for the upper layers only (as training does): loads against the full model, writes zeros below."""
    torch.manual_seed(8)
    model = tiny_llama(layers=4)
    cfg = HyperNetwork.config_for_model(model, rank=2, latent_dim=3, task_emb_dim=E, hidden_dim=16)
    for t in cfg.target_modules:
        cfg.module_names[t] = cfg.module_names[t][2:]
        cfg.layer_indices[t] = cfg.layer_indices[t][2:]
    hn = HyperNetwork(cfg)
    randomize_b(hn)
    hn.save_pretrained(tmp_path)
    hn = HyperNetwork.from_pretrained(tmp_path, model=model)
    pool = AdapterPool(find_targets(model, ["q_proj", "v_proj"]), max_adapters=2, max_rank=2)
    for t in pool.module_types():
        for buf in pool.buffers(t):
            buf.normal_()
    slot = pool.allocate("k", 2, 1.5)
    e = torch.randn(1, E)
    generate_into_slots(hn, e, pool, [slot])
    gen = hn.generate(e)
    for t in hn.types:
        a, b = pool.buffers(t)
        assert torch.count_nonzero(a[:2, slot]) == 0 and torch.count_nonzero(b[:2, slot]) == 0
        torch.testing.assert_close(a[2:, slot], gen[t][0][0].detach())
        torch.testing.assert_close(b[2:, slot], 1.5 * gen[t][1][0].detach())
    with pytest.raises(ValueError, match="num_layers: hypernetwork built for 4 layers, model has 5"):
        HyperNetwork.from_pretrained(tmp_path, model=tiny_llama(layers=5))


@pytest.mark.slow
def test_for_model_on_the_embedded_smollm2_shapes():
    """The default base model's real config (built on the meta device: shapes only, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hyperlora.modeling.base_model import default_model_path

    cfg = AutoConfig.from_pretrained(str(default_model_path()), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    hn = HyperNetwork.for_model(model, rank=8, target_modules=("q_proj", "v_proj"), latent_dim=32)
    assert hn.config.module_shapes == {"q_proj": [576, 576], "v_proj": [576, 192]}
    assert hn.config.num_layers == 30 and len(hn.module_names("v_proj")) == 30
    assert hn.config.base_model_type == "llama"
