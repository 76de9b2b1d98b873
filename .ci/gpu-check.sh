#!/usr/bin/env bash
# `make gpu-check`: on a machine with an NVIDIA GPU, from a fresh checkout, in one command:
# the CUDA build (.ci/cuda-check.sh: a venv with a CUDA build of torch, fastcur built with
# FASTCUR_BUILD_CUDA=1 for this GPU's architecture only, every op with a CUDA kernel), then
# benchmarks/gpu_check.py in that venv: the `cuda` tests, every op benchmark at GPU shapes,
# `fastcur bench model --size gpu`, and gpu-report/summary.md + summary.json.
# Without a GPU: the CPU venv checks what it can (the cuda tests collect, the benchmarks load
# with their GPU shapes), then exit 2 with "no CUDA device".
# Environment: GPU_REPORT (default gpu-report), CUDA_VENV, TORCH_CUDA (a torch CUDA build the
# driver supports; default as cuda-check), TORCH_CUDA_ARCH_LIST (default: this GPU's), MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REPORT=${GPU_REPORT:-gpu-report}
case $REPORT in /*) ;; *) REPORT=$ROOT/$REPORT ;; esac

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
  PY=${PY:-.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  "$PY" benchmarks/gpu_check.py --out "$REPORT"   # the checks that need no GPU; exits 2
  exit $?
fi

stamp() { echo "== gpu-check $(date -u +%H:%M:%S) $*"; }
t0=$(date +%s)
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' ')
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUDA_VENV=${CUDA_VENV:-.venv-cuda}
stamp "CUDA build for sm $TORCH_CUDA_ARCH_LIST with $MAX_JOBS jobs (.ci/cuda-check.sh)"
bash .ci/cuda-check.sh

VPY=$ROOT/$CUDA_VENV/bin/python
"$VPY" -c "import pytest, transformers, peft, matplotlib, triton" 2>/dev/null ||
  "$VPY" -m pip install -q "pytest>=8" "transformers>=4.45" "peft>=0.13" "matplotlib>=3.8"
stamp "tests and benchmarks (benchmarks/gpu_check.py), $(( $(date +%s) - t0 )) s so far"
# From the built copy (build/cuda-check/src), so the installed CUDA build is what gets imported.
cd build/cuda-check/src
set +e
"$VPY" benchmarks/gpu_check.py --out "$REPORT"
code=$?
set -e
stamp "done in $(( $(date +%s) - t0 )) s (exit $code); report: $REPORT/summary.md"
exit $code
