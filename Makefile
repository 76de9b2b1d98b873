# The README's commands. `make test` is what CI runs.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
TORCH_CPU   ?= torch==2.13.0
CUDA_VENV   ?= .venv-cuda
TORCH_CUDA  ?= torch==2.14.1
export MAX_JOBS ?= 2

.PHONY: all setup install test test-fast demo bench bench-pytest cuda-check gpu-check clean

all: test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Installs PyTorch (the CPU build when none is importable), then fastcur editable with the
# C++ extension, without build isolation (the build needs the installed torch).
setup: $(VENV)/bin/python
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_CPU)"
	$(PIP) install -q ninja pybind11 "setuptools>=77" wheel
	$(PIP) install -q --no-build-isolation -e ".[test,bench,hf]"
	@$(PY) -m fastcur.cli info

install: setup

test: setup
	$(PY) -m pytest -q tests

# The continual-learning benchmark, quick mode (`fastcur continual --help` for the options;
# DEMO_ARGS adds some). Runs `make setup` first only when fastcur is not installed yet (setup
# rebuilds the C++ extension). The small CUR-LoRA MLP demo stays as `fastcur demo`.
demo:
	@$(PY) -c "import fastcur._C" 2>/dev/null || $(MAKE) setup
	$(PY) -m fastcur.cli continual --quick $(DEMO_ARGS)

bench: setup
	$(PY) -m fastcur.cli bench $(BENCH_ARGS)

bench-pytest: setup
	$(PY) -m pytest -q benchmarks --benchmark-only

# Compile check of the CUDA kernels (no GPU needed): a second venv with a CUDA build of torch,
# fastcur built in an isolated copy of the tree (so it never touches the CPU venv's editable
# build), then assert every fastcur op has a CUDA kernel registered. See .ci/cuda-check.sh.
cuda-check:
	PYTHON=$(PYTHON) CUDA_VENV=$(CUDA_VENV) TORCH_CUDA="$(TORCH_CUDA)" bash .ci/cuda-check.sh

# On a GPU machine: CUDA build, the `cuda` tests, every benchmark at GPU shapes, the model step,
# gpu-report/summary.md. Without a GPU it checks what it can and exits 2 (.ci/gpu-check.sh).
gpu-check:
	MAX_JOBS=$${GPU_CHECK_JOBS:-$$(nproc)} PYTHON=$(PYTHON) CUDA_VENV=$(CUDA_VENV) TORCH_CUDA="$(TORCH_CUDA)" \
	  bash .ci/gpu-check.sh

clean:
	rm -rf build *.egg-info python/fastcur/*.so
