# Quick start: `make demo` and `make test` work on a fresh machine with Python, make and
# a C++ compiler. They create .venv, install torch==2.13.0 when no torch is there (never
# a plain `torch`, which would pull a multi-GB CUDA build), build and install the package
# with its test extras, and run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
DEPS   := $(VENV)/.deps-installed
BUILD_DEPS := "setuptools>=77" wheel "pybind11>=2.12" "cmake>=3.24"
PYTEST_ARGS ?=

.PHONY: all install test demo demo-train bench clean info

all: install

$(DEPS): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q $(BUILD_DEPS)
	$(PIP) install -q --no-build-isolation ".[test]"
	touch $@

# Rebuild and reinstall the package (CMake builds incrementally in build/).
install: $(DEPS)
	$(PIP) install -q --no-build-isolation --no-deps .

# The tests, then every docstring example (>>>) of the installed package.
test: install
	TRITON_INTERPRET=1 NUMBA_ENABLE_CUDASIM=1 $(BIN)/pytest $(PYTEST_ARGS)
	TRITON_INTERPRET=1 NUMBA_ENABLE_CUDASIM=1 $(BIN)/pytest -q --doctest-modules --pyargs pyfastscan

demo: install
	$(BIN)/pyfastscan demo

# The demo model trained with `pyfastscan train` and one hard negative mining round (minutes).
demo-train: install
	$(BIN)/pyfastscan demo --train

info: install
	$(BIN)/pyfastscan info

bench: install
	mkdir -p .benchmarks
	$(BIN)/pytest bench -o python_files="bench_*.py" --benchmark-only --benchmark-columns=min,median,max,iqr,rounds --benchmark-json=.benchmarks/latest.json
	$(BIN)/python bench/report.py .benchmarks/latest.json

clean:
	rm -rf build *.egg-info .pytest_cache .benchmarks
