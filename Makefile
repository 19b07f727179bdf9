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

.PHONY: run test lint format build bench clean

$(DEPS_STAMP): requirements/build.txt requirements/runtime.txt requirements/test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" -r requirements/build.txt \
		-r requirements/runtime.txt -r requirements/test.txt
	touch $@

# Editable install: the native modules are built into distserve_rt/ by CMake (ninja).
$(BUILD_STAMP): $(DEPS_STAMP) $(NATIVE_SOURCES) pyproject.toml
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

run: $(BUILD_STAMP)
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
