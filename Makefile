# The two commands a new user needs (see README):
#   make run   - set up .venv, build, run the main job on CPU with the built-in tiny setup
#   make test  - same set-up, then the whole test suite plus ruff and clang-format checks
# TORCH_SPEC overrides the pinned CPU torch, e.g. `make test TORCH_SPEC=torch==2.11.0`.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# Set-up stamps: re-run a step only when its inputs change.
DEPS_STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
NATIVE_SOURCES := $(shell find csrc include -type f 2>/dev/null) CMakeLists.txt setup.py
CXX_FILES = $(shell find csrc include -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')

.PHONY: run bench-ops test lint format build bench clean

$(DEPS_STAMP): requirements/build.txt requirements/runtime.txt requirements/test.txt requirements/cluster.txt
	@echo "== set-up: installing torch and the Python dependencies into $(VENV) (first time: 1-2 minutes)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" -r requirements/build.txt \
		-r requirements/runtime.txt -r requirements/test.txt -r requirements/cluster.txt
	touch $@

# Editable install: the native modules are built into distserve_rt/ by CMake (ninja).
# Without -q pip shows its progress line while CMake compiles (about 1.5 minutes on 2 cores).
$(BUILD_STAMP): $(DEPS_STAMP) $(NATIVE_SOURCES) pyproject.toml
	@echo "== build: compiling the native extension (C++, CMake + ninja; about 1.5 minutes)"
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

# The main job (issue 5), about 1 minute on 2 cores: the same short chat workload through
# disaggregated 1 prefill + 1 decode instance (pinned to one core each) and colocated with
# the default policy, chunked prefill (one instance, 2 threads on the same 2 cores), one
# vLLM-style table per run and then both side by side. Choices, measured on the 2-core dev VM with dummy:llama-tiny:
# - workload: ShareGPT ("chat") lengths x 0.125 (prompt mean 76, max 255 tokens; output mean
#   49, max 128), so a request takes ~20 ms of prefill and ~5 ms per decode step, as a chat
#   request takes ~10x that on a GPU with a 13B model; 60 requests per rate.
# - SLOs: TTFT 70 ms and TPOT 10 ms, about 4x the unloaded TTFT (17 ms) and 2.5x the
#   unloaded TPOT (4 ms) of the colocated engine here (bench/sim_vs_runtime.py uses 4x/2x;
#   2x left no room for the load other users put on shared cores).
# - rates 5 and 10 req/s: below and around where one of the two setups starts missing them.
# OMP_NUM_THREADS=2 keeps the colocated engine at 2 threads on bigger machines (the
# disaggregated instances pin themselves to the first 2 cores this process may use).
RUN_ARGS := --compare disaggregated colocated --dataset-name chat --length-scale 0.125 \
	--num-prompts 60 --request-rate 5 10 --slo-ttft-ms 70 --slo-tpot-ms 10 \
	--kv-cache-memory-bytes 256MiB --disable-tqdm

run: $(BUILD_STAMP)
	OMP_NUM_THREADS=2 $(VENV)/bin/drt-run bench $(RUN_ARGS)

# The op microbenchmarks (the job `make run` ran before the serving engine existed).
bench-ops: $(BUILD_STAMP)
	$(VENV)/bin/drt-run bench-ops

test: $(BUILD_STAMP) lint
	$(PY) -m pytest -q tests

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check distserve_rt tests bench setup.py
	$(VENV)/bin/ruff format --check distserve_rt tests bench setup.py
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_FILES)

format: $(DEPS_STAMP)
	$(VENV)/bin/ruff check --fix distserve_rt tests bench setup.py
	$(VENV)/bin/ruff format distserve_rt tests bench setup.py
	$(VENV)/bin/clang-format -i $(CXX_FILES)

bench: $(BUILD_STAMP)
	$(PY) -m pytest bench -q --benchmark-only --benchmark-json=bench/results/pytest_benchmark_cpu.json

clean:
	rm -rf build $(VENV) distserve_rt/*.so *.egg-info
