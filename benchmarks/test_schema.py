"""Checks of the suite's own machinery (no timing): the derived comparisons, the size option, the plot
script's schema check. They run with `pytest benchmarks/` (seconds) and never with `make test`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/_common.py and plot.py, however this file is loaded
import plot  # noqa: E402
from _common import bench_size, derive, round_robin  # noqa: E402


def test_derive_ratios_roofline_and_missing_peers():
    """Ratios use the medians of the same group only; a list counts its fastest; a factor multiplies; bytes,
    flops and roofline_s become GBps, TFLOPs and roofline_frac; an absent peer gives None and is named."""
    loop = {"method": "loop"}
    ours = {"method": "ours", "bytes": 4e9, "flops": 2e12, "roofline_s": 1.0,
            "ratios": {"speedup": ["loop", "self"], "vs_best": ["self", ["loop", "ours"]],
                       "bound": ["loop", "self", 0.5], "vs_missing": ["gone", "self"]}}
    other_group_loop = {"method": "loop"}
    derive([("g", loop, 8.0), ("g", ours, 2.0), ("h", other_group_loop, 100.0)])
    assert ours["speedup"] == 4.0 and ours["vs_best"] == 1.0 and ours["bound"] == 2.0
    assert ours["GBps"] == 2.0 and ours["TFLOPs"] == 1.0 and ours["roofline_frac"] == 0.5
    assert ours["vs_missing"] is None and ours["missing_peers"] == ["vs_missing"]
    assert "speedup" not in loop and "missing_peers" not in loop


def test_bench_size_default_env_and_bad_value(monkeypatch):
    """quick by default, BENCH_SIZE chooses, an unknown size is refused with the accepted values."""
    monkeypatch.delenv("BENCH_SIZE", raising=False)
    assert bench_size(None) == "quick"
    monkeypatch.setenv("BENCH_SIZE", "full")
    assert bench_size(None) == "full"
    monkeypatch.setenv("BENCH_SIZE", "huge")
    with pytest.raises(ValueError, match="'huge'.*quick, full"):
        bench_size(None)


def test_plot_refuses_other_schemas_and_summarizes_runs(tmp_path, capsys):
    """plot.py names a file in the old per-script schema; on two runs of one benchmark it prints the median
    and the min-max of its figures."""
    old = HERE / "results" / "add_lora_cpu.json"
    with pytest.raises(ValueError, match="add_lora_cpu.json: not a hyperlora-bench/1"):
        plot.load([old])

    def run(median: float, speedup: float) -> Path:
        data = {"schema": "hyperlora-bench/1", "machine": {"cpu": "x"}, "date": "d", "commit": {"short": "c"},
                "benchmarks": [{"name": "test_add_lora_cpu[a]", "group": "add_lora cpu float32 T=1",
                                "stats": {"median": median},
                                "extra_info": {"method": "hyperlora_torch", "speedup_vs_loop": speedup,
                                               "ratios": {"speedup_vs_loop": ["per_adapter_loop", "self"]}}}]}
        p = tmp_path / f"r{median}.json"
        p.write_text(json.dumps(data))
        return p

    assert plot.main([str(run(0.001, 2.0)), str(run(0.003, 4.0)), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "hyperlora_torch: 2.000 ms [1.000-3.000] (2 runs); speedup_vs_loop 3.00 [2.00-4.00]" in out


def test_benchmarks_are_outside_testpaths():
    """The repository's pytest configuration collects tests/ only, so `make test` never runs a benchmark."""
    text = (HERE.parent / "pyproject.toml").read_text()
    assert 'testpaths = ["tests"]' in text


def test_round_robin_runs_every_other_method_before_each_timed_call():
    """Each timed call of a method follows one call of each other method (the old scripts' round robin); the
    rounds stay within bounds; an unknown method is refused before anything runs."""
    calls: list[str] = []

    class FakeBenchmark:
        extra_info: dict = {}

        def pedantic(self, target, setup, rounds, iterations):
            assert iterations == 1
            for _ in range(rounds):
                setup()
                target()

    fns = {m: (lambda m=m: calls.append(m)) for m in ("a", "b", "c")}
    rounds = round_robin(FakeBenchmark(), fns, "b", budget_s=1e9, max_rounds=4, min_rounds=2)
    assert rounds == 4
    assert calls == ["a", "b", "c"] + ["a", "c", "b"] * 4
    with pytest.raises(KeyError, match="'d' is not one of a, b, c"):
        round_robin(FakeBenchmark(), fns, "d", budget_s=1.0)
    assert len(calls) == 15


def test_plot_summarizes_the_load_benchmark(tmp_path, capsys):
    """bench_serve.py's records (test_serve_*) form the `serve` family: the summary gives throughput, TTFT and
    time per output token next to the ratios of the run."""
    ei = {"method": "hyperlora", "throughput_tok_s": 120.0, "ttft_p50_s": 0.5, "ttft_p99_s": 0.9, "tpot_p50_s": 0.05,
          "tpot_p99_s": 0.08, "throughput_vs_one_policy": 4.5,
          "ratios": {"throughput_vs_one_policy": ["one_policy_at_a_time", "self"]}}
    data = {"schema": "hyperlora-bench/1", "machine": {"cpu": "x"}, "date": "d", "commit": {"short": "c"},
            "benchmarks": [{"name": "test_serve_load[8x8-hyperlora]", "group": "serve 8x8 prompt=48 N=16",
                            "stats": {"median": 1.0}, "extra_info": ei}]}
    p = tmp_path / "serve.json"
    p.write_text(json.dumps(data))
    assert plot.main([str(p), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "## serve" in out
    assert ("hyperlora: 1000.000 ms; throughput_tok_s 120.00, ttft_p50_s 0.50, ttft_p99_s 0.90, tpot_p50_s 0.05, "
            "tpot_p99_s 0.08, throughput_vs_one_policy 4.50") in out
