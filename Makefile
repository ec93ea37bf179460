# `make bench` and `make test` do all the set-up on a fresh machine: a virtual environment with the pinned
# requirements, the package installed in editable mode, and the compiled library built in place (incrementally).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
BENCH_OUT ?= bench-results
CMAKE_BUILD := build/cmake

# The `nvcc` on PATH may be a wrapper script; `nvcc --dryrun` prints the toolkit's real root as TOP.
CUDA_HOME ?= $(shell command -v nvcc >/dev/null && nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 \
                     | sed -n 's/^#\$$ TOP=//p' | head -n1 | xargs -r realpath)
export CUDA_HOME
# No GPU here: build for Hopper unless told otherwise (setup.py picks the visible GPU's arch when there is one).
# Hopper is built as sm_90a, the target its wgmma kernels need.
TORCH_CUDA_ARCH_LIST ?= $(shell command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=compute_cap \
                                --format=csv,noheader 2>/dev/null | head -n1 | sed 's/^9\.0$$/9.0a/')
ifeq ($(strip $(TORCH_CUDA_ARCH_LIST)),)
TORCH_CUDA_ARCH_LIST := 9.0a
endif
export TORCH_CUDA_ARCH_LIST

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

.PHONY: all setup build test pytest cmake-test old-archs bench bench-pytest clean
all: test

$(VENV)/.requirements: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Registers the package (and the xception-ops command) without compiling; `build` compiles in place.
$(VENV)/.installed: $(VENV)/.requirements setup.py
	XCEPTION_OPS_SKIP_EXT=1 $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

build: $(VENV)/.installed
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) setup.py --quiet build_ext --inplace

$(CMAKE_BUILD)/CMakeCache.txt: $(VENV)/.requirements CMakeLists.txt
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	    -DPython3_EXECUTABLE=$(CURDIR)/$(PY)

cmake-test: $(CMAKE_BUILD)/CMakeCache.txt
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH cmake --build $(CMAKE_BUILD)
	cd $(CMAKE_BUILD) && PATH=$(CURDIR)/$(VENV)/bin:$$PATH ctest --output-on-failure

# The kernels for pre-Turing GPUs (sm_37, sm_60, sm_70), which CUDA 13 cannot target: clang-19 + CUDA 11.8.
old-archs: $(VENV)/.requirements
	PYTHON=$(PY) tools/build_old_archs.sh

pytest: build
	$(PY) -m pytest

# The whole suite, then each benchmark of benchmarks/ once (--benchmark-disable) so the suites keep working.
test: build cmake-test old-archs
	$(PY) -m pytest
	$(PY) -m pytest benchmarks -q --benchmark-disable

# BENCH_FLAGS: more options of `xception-ops bench`, e.g. BENCH_FLAGS=--resume to go on from $(BENCH_OUT)/bench.json.
bench: build
	$(VENV)/bin/xception-ops bench --out $(BENCH_OUT) $(BENCH_FLAGS)

# The pytest-benchmark suites (timed); add BENCH_ARGS="--benchmark-json=FILE" to keep the numbers.
bench-pytest: build
	$(PY) -m pytest benchmarks --benchmark-only $(BENCH_ARGS)

clean:
	rm -rf build $(BENCH_OUT) xception_ops/_C*.so
