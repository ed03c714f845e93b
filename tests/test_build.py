"""The build: never importing torch, kernels inside the namespace; without nvcc a wheel with the CPU kernel
extension (hyperlora._cpu) only, and a pure-Python wheel when that is skipped too or no compiler works."""
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
def _wheel_names(tmp_path, **env_vars) -> list[str]:
    """Build a wheel of the repository (no isolation) with these environment variables, in a fresh build
    directory (the repository's build/ would reuse objects compiled earlier); its file names."""
    cfg = tmp_path / "build.cfg"
    cfg.write_text(f"[build]\nbuild_base = {tmp_path / 'build'}\n")
    env = dict(os.environ, DIST_EXTRA_CONFIG=str(cfg), **env_vars)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, env=env, timeout=300,
                   cwd=tmp_path)
    wheels = list(tmp_path.glob("hyperlora-*.whl"))
    assert len(wheels) == 1
    return zipfile.ZipFile(wheels[0]).namelist()


@pytest.mark.slow
def test_pure_python_wheel_when_cuda_build_skipped(tmp_path):
    names = _wheel_names(tmp_path, HYPERLORA_SKIP_CUDA_BUILD="1", HYPERLORA_SKIP_CPU_BUILD="1")
    assert "hyperlora/kernels/__init__.py" in names, "Triton kernels must ship inside the hyperlora namespace"
    assert not any(n.startswith("kernels/") for n in names), "no top-level `kernels` package (PyPI collision)"
    assert not any(n.endswith(".so") for n in names), "both HYPERLORA_SKIP_*_BUILD=1 must skip the extensions"
    # the shipped checkpoints (the demo's default) travel with the package
    import json

    default = json.loads((ROOT / "hyperlora" / "checkpoints" / "default.json").read_text())["default"]
    for f in ("hyperlora/checkpoints/default.json", f"hyperlora/checkpoints/{default}/config.json"):
        assert f in names, f"{f} missing from the wheel"
    assert any(n.startswith(f"hyperlora/checkpoints/{default}/") and n.endswith(".safetensors") for n in names)


@pytest.mark.slow
def test_wheel_without_nvcc_has_the_cpu_extension(tmp_path):
    """No CUDA build (as on CI): the CPU kernel extension is still compiled, ships, loads and runs its
    runtime ISA check, without torch."""
    names = _wheel_names(tmp_path, HYPERLORA_SKIP_CUDA_BUILD="1")
    sos = [n for n in names if n.endswith(".so")]
    assert not any(n.startswith("hyperlora/_C.") for n in sos), "HYPERLORA_SKIP_CUDA_BUILD=1 must skip hyperlora._C"
    cpu = [n for n in sos if n.startswith("hyperlora/_cpu.")]
    assert len(cpu) == 1, f"the CPU kernel extension is missing from the wheel: {sos}"
    wheel = next(tmp_path.glob("hyperlora-*.whl"))
    out = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extract(cpu[0], out)
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('hyperlora._cpu', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(m.isa()); assert 'torch' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code, str(out / cpu[0])], check=True, capture_output=True,
                         text=True, timeout=60)
    assert res.stdout.strip() in ("avx2", "generic")


@pytest.mark.slow
def test_wheel_builds_when_no_compiler_works(tmp_path):
    """A broken C++ compiler leaves the optional CPU extension out instead of failing the build."""
    names = _wheel_names(tmp_path, HYPERLORA_SKIP_CUDA_BUILD="1", CC="false", CXX="false", LDSHARED="false",
                         LDCXXSHARED="false")
    assert not any(n.endswith(".so") for n in names)
    assert "hyperlora/ops/add_lora.py" in names


def test_cpu_extension_uses_portable_flags():
    """The shipped CPU build must run on any x86-64 (or other) CPU: no -march=native, AVX2 chosen at run time."""
    text = (ROOT / "setup.py").read_text()
    assert '"-march=native"' not in text and '"-mavx' not in text and '"-mfma"' not in text
    src = (ROOT / "csrc" / "cpu" / "add_lora_cpu.cpp").read_text()
    assert "__builtin_cpu_supports" in src
