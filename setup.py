"""Build script: pure Python + Triton sources always; the CPU kernel extension `hyperlora._cpu` wherever a
C++ compiler works; the CUDA extension `hyperlora._C` when nvcc exists.

The build never imports torch (isolated builds would fail on that). The extensions take raw pointers
(and, for CUDA, a stream handle), so they link only against pybind11 (and static cudart), not torch's
C++ ABI. The CPU extension is optional: if it fails to compile, the build goes on without it and
add_lora's torch paths run instead. It uses portable flags only (-O3 -std=c++17): its AVX2 code is
chosen at run time inside the library (csrc/cpu/add_lora_cpu.cpp), never with -march=native.

Environment variables:
  HYPERLORA_SKIP_CUDA_BUILD=1   build without the CUDA extension even where nvcc exists
  HYPERLORA_SKIP_CPU_BUILD=1    build without the CPU kernel extension (with both skips: a pure-Python wheel)
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

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CPU_SRC = CSRC / "cpu"
CPU_EXT = "hyperlora._cpu"
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
    """Compiles csrc/*.cu with nvcc (ninja when available) and links a pybind11 module; the CPU extension
    (csrc/cpu/*.cpp) goes through setuptools' own C++ compiler, as an optional extension."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name == CPU_EXT:
            self._build_cpu(ext)
            return
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

    def _build_cpu(self, ext: Extension) -> None:
        """Host C++ compiler, portable flags; any failure (no compiler, no pybind11) skips the extension."""
        try:
            import pybind11  # build requirement, never torch

            ext.include_dirs = [pybind11.get_include(), str(CPU_SRC)]
            super().build_extension(ext)
        except Exception as exc:  # optional: the package works without it (torch paths)
            print(f"hyperlora: WARNING: the CPU kernel extension {CPU_EXT} was not built ({exc}); "
                  "add_lora will use torch ops on the CPU", flush=True)
            out = Path(self.get_ext_fullpath(ext.name))
            if out.exists():
                out.unlink()

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


def cpu_extension() -> list[Extension]:
    """hyperlora._cpu from csrc/cpu/*.cpp (optional: a failed compile leaves it out)."""
    if _truthy("HYPERLORA_SKIP_CPU_BUILD"):
        print("hyperlora: HYPERLORA_SKIP_CPU_BUILD set, building without the CPU kernel extension", flush=True)
        return []
    sources = sorted(str(p.relative_to(ROOT)) for p in CPU_SRC.glob("*.cpp"))
    return [Extension(CPU_EXT, sources=sources, language="c++", optional=True,
                      extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-g0"])]


def cuda_extension() -> list[Extension]:
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


def extensions() -> list[Extension]:
    return cpu_extension() + cuda_extension()


setup(
    packages=find_packages(include=["hyperlora", "hyperlora.*"]),
    package_dir={"hyperlora": "hyperlora"},
    # checkpoints/ is data only (weights, configs, reports), not a package
    package_data={"hyperlora": ["checkpoints/*.json", "checkpoints/*.safetensors", "checkpoints/*/*.json",
                                "checkpoints/*/*.safetensors", "checkpoints/*/*.md"],
                  "hyperlora.tasks": ["data/*.jsonl"], "hyperlora.training": ["configs/*.json"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": CudaBuildExt},
)
