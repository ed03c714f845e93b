"""Tests for hyperlora.ops._common: the one accumulation dtype, graph-capture test and backend choice that
add_lora, latent_lora, metadata and path_choice share (each had its own copy, and the copies disagreed)."""
from __future__ import annotations

import importlib

import pytest
import torch

from hyperlora.ops import _common, metadata, path_choice
from hyperlora.ops._common import acc_dtype, capturing, pick_backend

add_mod = importlib.import_module("hyperlora.ops.add_lora")  # the package exports the functions of these names
lat_mod = importlib.import_module("hyperlora.ops.latent_lora")


def test_one_copy_of_each_helper():
    assert add_mod._acc_dtype is lat_mod._acc_dtype is acc_dtype
    assert add_mod._capturing is lat_mod._capturing is metadata._capturing is capturing
    assert add_mod._pick_backend is lat_mod._pick_backend is pick_backend
    assert path_choice.capturing is capturing


@pytest.mark.parametrize("dtype, acc", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                        (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_acc_dtype_of_the_op_dtypes(dtype, acc):
    assert acc_dtype(dtype) == acc


def test_acc_dtype_never_accumulates_in_a_narrow_float():
    """latent_lora's old copy returned any dtype other than half/bfloat16 unchanged (float8 accumulated in
    float8, int in int); add_lora's accumulated everything but float64 in float32, as latent_lora_reference's
    docstring promises ("float32, float64 for float64 inputs"). The shared one is add_lora's."""
    assert acc_dtype(torch.float8_e4m3fn) == torch.float32
    assert acc_dtype(torch.int32) == torch.float32


def _simulate(monkeypatch, compiling=False, cuda_capturing=False):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_capturing)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: cuda_capturing)


def test_capturing_is_compiling_or_a_cuda_graph_capture(monkeypatch):
    assert capturing() is False
    _simulate(monkeypatch, compiling=True)
    assert capturing() is True
    _simulate(monkeypatch, cuda_capturing=True)
    assert capturing() is True


def test_no_slot_value_check_while_capturing(monkeypatch):
    """Reading slot values on the host during a CUDA graph capture fails: check_slots skips it then."""
    with pytest.raises(ValueError, match="slots"):
        metadata.check_slots(torch.tensor([5]), 2)
    _simulate(monkeypatch, cuda_capturing=True)
    metadata.check_slots(torch.tensor([5]), 2)  # not read: no error, no sync


def test_latent_lora_skips_the_value_check_while_a_cuda_graph_captures(monkeypatch):
    """The old latent_lora skipped its host-side slot check only under torch.compile, not under CUDA graph
    capture (add_lora and metadata skipped it under both): now all use `capturing`."""
    seen = []
    real = lat_mod._validate

    def spy(*a, check_values=True, **k):
        seen.append(check_values)
        return real(*a, check_values=check_values, **k)

    monkeypatch.setattr(lat_mod, "_validate", spy)
    T, d_in, d_out, R, K, S = 3, 4, 5, 2, 3, 2
    args = (torch.zeros(T, d_out), torch.randn(T, d_in), torch.randn(R * K, d_in), torch.randn(d_out, R * K),
            torch.randn(S, K), torch.tensor([0, -1, 1]))
    lat_mod.latent_lora(*args)
    _simulate(monkeypatch, cuda_capturing=True)
    lat_mod.latent_lora(*args)
    assert seen == [True, False]


def _status(triton: bool, cuda: bool) -> dict:
    return {"torch": {"available": True}, "triton": {"available": triton}, "cuda": {"available": cuda}}


@pytest.mark.parametrize("triton, cuda, supported, want", [
    (True, True, ("torch", "triton", "cuda"), "triton"),
    (False, True, ("torch", "triton", "cuda"), "cuda"),
    (True, False, ("torch", "triton", "cuda"), "triton"),
    (False, False, ("torch", "triton", "cuda"), "torch"),
    (True, True, ("torch", "cuda"), "cuda"),
])
def test_auto_backend_on_a_gpu_prefers_triton(monkeypatch, triton, cuda, supported, want):
    monkeypatch.delenv("HYPERLORA_BACKEND", raising=False)
    monkeypatch.setattr(_common, "available_backends", lambda: _status(triton, cuda))
    assert pick_backend(None, torch.device("cuda"), supported) == want


def test_backend_on_cpu_forced_and_bad(monkeypatch):
    monkeypatch.delenv("HYPERLORA_BACKEND", raising=False)
    assert pick_backend(None, torch.device("cpu")) == "torch"
    assert pick_backend("torch", torch.device("cpu")) == "torch"
    monkeypatch.setenv("HYPERLORA_BACKEND", "torch")
    monkeypatch.setattr(_common, "available_backends", lambda: _status(True, True))
    assert pick_backend(None, torch.device("cuda")) == "torch"  # the environment forces one for every op
    with pytest.raises(ValueError, match="'tpu' is not implemented for this op"):
        pick_backend("tpu", torch.device("cpu"))
