"""Build script: pure Python + Triton sources always; the CUDA extension `hyperlora._C` when nvcc exists.

The build never imports torch (isolated builds would fail on that). The extension takes raw device
pointers and a stream handle, so it links only against static cudart and pybind11, not torch's C++ ABI.

Environment variables:
  HYPERLORA_SKIP_CUDA_BUILD=1   build a pure-Python wheel even where nvcc exists
  HYPERLORA_CUDA_ARCHS          semicolon list of SM targets (default "80;90a")
  MAX_JOBS                      parallel nvcc jobs (default: number of CPUs)
  CUDA_HOME / CUDA_PATH         CUDA toolkit root (default /usr/local/cuda; `which nvcc` may be a wrapper)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80;90a"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def find_cuda_home() -> Path | None:
    """The toolkit root with include/cuda_runtime.h; None if there is no usable nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:  # /usr/local/bin/nvcc may be a wrapper script: only trust a parent that has the headers
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for cand in candidates:
        if cand and (Path(cand) / "include" / "cuda_runtime.h").is_file() and (Path(cand) / "bin" / "nvcc").exists():
            return Path(cand)
    return None


def parse_archs(spec: str) -> list[str]:
    """'80;90a' -> ['80', '90a'] (also accepts '8.0', 'sm_90a', commas and spaces)."""
    archs = []
    for tok in spec.replace(",", ";").replace(" ", ";").split(";"):
        tok = tok.strip().lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if tok:
            if not tok.rstrip("a").isdigit():
                raise ValueError(f"HYPERLORA_CUDA_ARCHS: cannot parse architecture {tok!r} (use e.g. '80;90a')")
            archs.append(tok)
    if not archs:
        raise ValueError("HYPERLORA_CUDA_ARCHS is empty")
    return archs


class CudaBuildExt(build_ext):
    """Compiles csrc/*.cu with nvcc (ninja when available) and links a pybind11 module."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11  # build requirement, never torch

        cuda_home = Path(ext.cuda_home)  # type: ignore[attr-defined]
        nvcc = str(cuda_home / "bin" / "nvcc")
        archs = parse_archs(os.environ.get("HYPERLORA_CUDA_ARCHS", DEFAULT_ARCHS))
        jobs = int(os.environ.get("MAX_JOBS", "0") or 0) or os.cpu_count() or 1
        build_dir = Path(self.build_temp) / "hyperlora_cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        includes = [pybind11.get_include(), sysconfig.get_paths()["include"], str(cuda_home / "include"), str(CSRC)]
        inc_flags = [f"-I{p}" for p in includes]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        defines = [f'-DHYPERLORA_CUDA_ARCHS="{";".join(archs)}"', f"-DTORCH_EXTENSION_NAME=_C"]
        nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
                      "-Xcompiler", "-fvisibility=hidden", *gencode, *defines, *inc_flags]
        cxx_flags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", *defines, *inc_flags]

        jobs_list = []  # (compiler, flags, src, obj)
        for src in sorted(CSRC.glob("*.cu")):
            jobs_list.append((nvcc, nvcc_flags, src, build_dir / (src.stem + ".cu.o")))
        for src in sorted(CSRC.glob("*.cpp")):
            jobs_list.append(("c++", cxx_flags, src, build_dir / (src.stem + ".cpp.o")))
        print(f"hyperlora: compiling {len(jobs_list)} CUDA/C++ sources for sm_{', sm_'.join(archs)} "
              f"with {jobs} jobs ({'ninja' if shutil.which('ninja') else 'thread pool'})", flush=True)
        if shutil.which("ninja"):
            self._compile_ninja(jobs_list, build_dir, jobs)
        else:
            self._compile_pool(jobs_list, jobs)

        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        link = ["c++", "-shared", "-o", str(out), *[str(o) for _, _, _, o in jobs_list],
                f"-L{cuda_home / 'lib64'}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
        self._run(link)

    @staticmethod
    def _run(cmd: list[str]) -> None:
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)

    def _compile_pool(self, jobs_list, jobs: int) -> None:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for fut in [pool.submit(self._run, [cc, *flags, "-c", str(src), "-o", str(obj)])
                        for cc, flags, src, obj in jobs_list]:
                fut.result()

    @staticmethod
    def _compile_ninja(jobs_list, build_dir: Path, jobs: int) -> None:
        def q(s: str) -> str:
            return s.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")

        lines = ["ninja_required_version = 1.3"]
        for i, (cc, flags, _, _) in enumerate(jobs_list):
            shell_flags = " ".join(f"'{f}'" if '"' in f else f for f in flags)
            lines += [f"rule cc{i}", f"  command = {cc} {shell_flags} -c $in -o $out", f"  description = CC $in"]
        for i, (_, _, src, obj) in enumerate(jobs_list):
            lines.append(f"build {q(str(obj))}: cc{i} {q(str(src))}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        subprocess.run(["ninja", "-C", str(build_dir), "-j", str(jobs)], check=True)


def extensions() -> list[Extension]:
    if _truthy("HYPERLORA_SKIP_CUDA_BUILD"):
        print("hyperlora: HYPERLORA_SKIP_CUDA_BUILD set, building without the CUDA extension", flush=True)
        return []
    cuda_home = find_cuda_home()
    if cuda_home is None:
        print("hyperlora: no nvcc/CUDA toolkit found, building without the CUDA extension "
              "(set CUDA_HOME to build it)", flush=True)
        return []
    ext = Extension("hyperlora._C", sources=[])
    ext.cuda_home = str(cuda_home)  # type: ignore[attr-defined]
    return [ext]


setup(
    packages=["hyperlora", "hyperlora.ops", "hyperlora.kernels", "hyperlora.tasks", "hyperlora.training",
              "hyperlora.checkpoints"],
    package_dir={"hyperlora": "hyperlora", "hyperlora.kernels": "kernels"},
    package_data={"hyperlora.checkpoints": ["*.json", "**/*.json", "**/*.safetensors", "**/*.md"],
                  "hyperlora.tasks": ["data/*.jsonl"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": CudaBuildExt},
)
