"""The build: a pure-Python wheel without nvcc, never importing torch, kernels inside the namespace."""
import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_setup_py_never_imports_torch():
    tree = ast.parse((ROOT / "setup.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "torch" not in imported, "isolated builds fail when setup.py imports torch"


@pytest.mark.slow
def test_pure_python_wheel_when_cuda_build_skipped(tmp_path):
    env = dict(os.environ, HYPERLORA_SKIP_CUDA_BUILD="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, env=env, timeout=300,
                   cwd=tmp_path)
    wheels = list(tmp_path.glob("hyperlora-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "hyperlora/kernels/__init__.py" in names, "Triton kernels must ship inside the hyperlora namespace"
    assert not any(n.startswith("kernels/") for n in names), "no top-level `kernels` package (PyPI collision)"
    assert not any(n.endswith(".so") for n in names), "HYPERLORA_SKIP_CUDA_BUILD=1 must skip the extension"
    # the shipped checkpoints (the demo's default) travel with the package
    import json

    default = json.loads((ROOT / "hyperlora" / "checkpoints" / "default.json").read_text())["default"]
    for f in ("hyperlora/checkpoints/default.json", f"hyperlora/checkpoints/{default}/config.json"):
        assert f in names, f"{f} missing from the wheel"
    assert any(n.startswith(f"hyperlora/checkpoints/{default}/") and n.endswith(".safetensors") for n in names)
