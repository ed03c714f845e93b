"""`hyperlora info` and backend selection."""
import json
import os
import shutil
import subprocess
import sys
import pytest
import torch

from hyperlora.ops import backends
from hyperlora.ops.backends import BackendUnavailableError, resolve_backend

def _run_info(*args):
    out = subprocess.run([sys.executable, "-m", "hyperlora", "info", *args], capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout


def test_info_json_shape():
    info = json.loads(_run_info("--json"))
    assert set(info["backends"]) == {"torch", "triton", "cuda"}
    assert info["backends"]["torch"]["available"] is True
    assert isinstance(info["backends"]["cuda"]["built"], bool)
    for name in ("python", "versions", "gpu"):
        assert name in info
    for pkg in ("torch", "triton", "transformers"):
        assert pkg in info["versions"]
    assert info["gpu"]["visible"] == torch.cuda.is_available()
    for status in info["backends"].values():
        assert status["available"] or status["reason"], "an unavailable backend must say why"


def test_info_text_mentions_every_backend():
    text = _run_info()
    for name in ("torch", "triton", "cuda"):
        assert name in text


def test_cuda_extension_built_where_nvcc_exists():
    """Where the machine has nvcc (CI does), the install must have compiled hyperlora._C."""
    if shutil.which("nvcc") is None or os.environ.get("HYPERLORA_SKIP_CUDA_BUILD"):
        pytest.skip("no nvcc on this machine (or the build was skipped on purpose)")
    status = backends.cuda_status()
    assert status["built"], status["reason"]
    assert status["archs"], "the extension must report the architectures it was built for"


def test_forced_unknown_backend_is_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.require_backend("tpu")


def test_forced_unavailable_backend_says_why(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: cuda may be available")
    with pytest.raises(BackendUnavailableError, match="not available"):
        resolve_backend("cuda", torch.device("cpu"))


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("HYPERLORA_BACKEND", "torch")
    assert resolve_backend(None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("HYPERLORA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="not implemented"):
        resolve_backend(None, torch.device("cpu"))


def test_auto_backend_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("HYPERLORA_BACKEND", raising=False)
    assert resolve_backend(None, torch.device("cpu")) == "torch"


def test_op_without_backend_rejects_forcing_it():
    with pytest.raises(ValueError, match="not implemented for this op"):
        resolve_backend("cuda", torch.device("cpu"), supported=("torch",))
