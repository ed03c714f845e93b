"""The benchmark suite's shared set-up (pytest-benchmark). Run it with `make bench`, or

    pytest benchmarks/ --benchmark-json benchmarks/results/bench_cpu_<date>.json          # quick CPU sizes
    pytest benchmarks/ --bench-size full --benchmark-json ...                            # the full sweeps
    pytest benchmarks/ -m gpu --benchmark-json benchmarks/results/bench_gpu_<date>.json  # Triton/CUDA (a GPU)

`benchmarks/` lies outside `testpaths` (`tests/`), so a plain `pytest` or `make test` never runs it. Here:

* collection of the `bench_*.py` modules (pytest's default pattern is `test_*.py`);
* `--bench-size quick|full` (or BENCH_SIZE) and `--bench-threads N` (or BENCH_THREADS; default 1: the CPU
  machines are shared, and two-thread OpenMP regions stall when the other core is busy);
* the timer: process CPU time (`time.process_time`) for CPU benchmarks on one thread, so time spent
  descheduled on a shared machine does not count; wall time otherwise. GPU benchmarks synchronize inside the
  timed call and use wall time;
* `gpu` benchmarks skip with a reason when CUDA (or the backend they time) is unavailable;
* one results schema, added to pytest-benchmark's JSON by `pytest_benchmark_update_json`: `schema`,
  `machine` (cpu, cores, gpu if any, torch, triton, threads, load average), `commit` (id, dirty and the
  modified paths under hyperlora/ csrc/ benchmarks/), `date`, `command`, `bench_size`; every benchmark keeps
  pytest-benchmark's stats (the median is the reported figure) and an `extra_info` with the case, the
  method, and the comparisons derived after the run from the medians of the same session:
  `extra_info["ratios"] = {name: [numerator, denominator]}` (each a method of the same group, "self", or a
  list of methods whose fastest counts; an optional third element multiplies) becomes `extra_info[name]`; `bytes`, `flops` and `roofline_s`
  become `GBps`, `TFLOPs` and `roofline_frac` (roofline time / median).
"""
from __future__ import annotations

import datetime as _dt
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # the bench modules import _common by name, however they are loaded
from _common import SIZES, bench_size as _size_of, cuda_sync_timer, derive, env_positive_int, machine_info, measure_roofline  # noqa: E402,F401

SCHEMA = "hyperlora-bench/1"
QUICK_MAX_TIME_S = 0.25  # seconds per benchmark at the quick size, unless --benchmark-max-time is given


# ------------------------------------------------------------------------------------------------ options
def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("hyperlora benchmarks")
    g.addoption("--bench-size", default=None, choices=SIZES,
                help="benchmark sizes: quick (default; minutes on a 2-core CPU) or full (the old full sweeps); "
                     "env BENCH_SIZE")
    g.addoption("--bench-threads", type=int, default=None,
                help="torch CPU threads during the benchmarks (default 1; env BENCH_THREADS)")


def bench_size(config: pytest.Config) -> str:
    """The size chosen by --bench-size or BENCH_SIZE (default quick); an unknown value is a usage error."""
    try:
        return _size_of(config)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def bench_threads(config: pytest.Config) -> int:
    """Torch CPU threads from --bench-threads or BENCH_THREADS (default 1); must be a positive integer."""
    raw = config.getoption("--bench-threads", None)
    if raw is None:
        return env_positive_int("BENCH_THREADS", 1)
    if raw < 1:
        raise pytest.UsageError(f"--bench-threads/BENCH_THREADS must be >= 1, got {raw}")
    return raw


def pytest_configure(config: pytest.Config) -> None:
    size, threads = bench_size(config), bench_threads(config)  # bad values fail here, before anything runs
    config.stash[_SIZE] = size
    config.stash[_THREADS] = threads
    torch.set_num_threads(threads)


_SIZE = pytest.StashKey[str]()
_THREADS = pytest.StashKey[int]()


# ------------------------------------------------------------------------------------------------ collection
def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Collect benchmarks/bench_*.py (an explicitly named file is collected by pytest itself)."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_") and file_path.parent == HERE
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def cpu_timer(config: pytest.Config):
    """Process CPU time with one torch thread (a shared machine's preemption does not count), else wall."""
    return time.process_time if config.stash[_THREADS] == 1 else time.perf_counter


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every benchmark its timer (prepended, so it is the closest `benchmark` marker; GPU: wall time
    after a CUDA sync, read around a round of back-to-back calls), a short time budget at the quick size,
    and skip GPU benchmarks without CUDA."""
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    own_max_time = any(a.startswith("--benchmark-max-time") for a in config.invocation_params.args)
    for item in items:
        if "benchmark" not in getattr(item, "fixturenames", ()):
            continue
        gpu = item.get_closest_marker("gpu") is not None
        if gpu and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        old = item.get_closest_marker("benchmark")
        kwargs = dict(old.kwargs) if old else {}
        kwargs.setdefault("timer", cuda_sync_timer if gpu else cpu_timer(config))
        if gpu:
            kwargs.setdefault("min_time", 2e-4)  # rounds of many launches: the one sync per round is noise
        if config.stash[_SIZE] == "quick" and not own_max_time:
            kwargs.setdefault("max_time", QUICK_MAX_TIME_S)
        item.add_marker(pytest.mark.benchmark(**kwargs), append=False)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def size(pytestconfig: pytest.Config) -> str:
    """'quick' or 'full'."""
    return pytestconfig.stash[_SIZE]


@pytest.fixture(scope="session")
def cpu_roofline() -> dict[str, float]:
    """This CPU's copy bandwidth and float32 GEMM rate, measured once per session with the benchmark's
    thread count (the machine is shared: nominal figures mean little)."""
    return measure_roofline(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def gpu_roofline() -> dict[str, float]:
    """The GPU's copy bandwidth (1 GiB copy) and bf16 8192^3 GEMM rate, measured once per session."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
    return measure_roofline(torch.device("cuda"), torch.bfloat16)


# ------------------------------------------------------------------------------------------------ derived figures
def _session_rows(config: pytest.Config) -> list[tuple[str | None, dict, float]]:
    bs = getattr(config, "_benchmarksession", None)
    out = []
    for m in getattr(bs, "benchmarks", []) or []:
        if m and not getattr(m.fixture, "has_error", False):
            out.append((m.group, m.extra_info, m.stats.median))
    return out


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int):
    """Derive the comparisons before pytest-benchmark writes its JSON and table."""
    derive(_session_rows(session.config))
    yield


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line per benchmark with its derived comparisons (pytest-benchmark's table has only the times)."""
    rows = _session_rows(config)
    lines = []
    for g, ei, med in rows:
        names = [*ei.get("ratios", {}), "roofline_frac", "GBps"]
        figs = {k: ei[k] for k in names if isinstance(ei.get(k), float)}
        if figs:
            lines.append(f"{g} | {ei.get('method')}: median {med * 1e3:.3f} ms; "
                         + ", ".join(f"{k} {v:.3g}" for k, v in figs.items()))
    if lines:
        terminalreporter.section("hyperlora benchmarks: comparisons (medians of this run)")
        for line in lines:
            terminalreporter.write_line(line)


# ------------------------------------------------------------------------------------------------ the schema
def git_commit(root: Path = ROOT) -> dict[str, Any]:
    """HEAD, whether the tree is dirty, and the modified paths that can change timings."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if head is None:
        return {"id": os.environ.get("BENCH_COMMIT", "unknown"), "dirty": None, "modified": None}
    status = git("status", "--porcelain", "--", "hyperlora", "csrc", "benchmarks") or ""
    modified = [line[3:] for line in status.splitlines() if not line[3:].startswith("benchmarks/results/")]
    return {"id": head, "short": head[:10], "dirty": bool(modified), "modified": modified}


def schema_header(config: pytest.Config) -> dict[str, Any]:
    """The fields every results file carries besides pytest-benchmark's own: machine, commit, date, command."""
    cuda = torch.cuda.is_available()
    info = machine_info(torch.device("cuda") if cuda else torch.device("cpu"))
    machine = {"cpu": info.get("cpu"), "cores": os.cpu_count(), "gpu": info.get("gpu"),
               **{k: v for k, v in info.items() if k not in ("cpu", "gpu", "cpu_count")}}
    args = list(config.invocation_params.args)
    return {"schema": SCHEMA, "machine": machine, "commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "pytest " + shlex.join(args), "bench_size": config.stash[_SIZE],
            "torch_threads": config.stash[_THREADS],
            "timer": {"cpu": cpu_timer(config).__name__, "gpu": cuda_sync_timer.__name__}}


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict) -> None:
    """Add the schema's header and the derived comparisons to the JSON pytest-benchmark writes."""
    output_json.update(schema_header(config))
    derive((b.get("group"), b.get("extra_info", {}), (b.get("stats") or {}).get("median"))
           for b in output_json.get("benchmarks", []))
