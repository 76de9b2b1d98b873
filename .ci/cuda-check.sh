#!/usr/bin/env bash
# Compile check of the CUDA kernels, no GPU needed (ARCHITECTURE.md "Building"), run by
# `make cuda-check`: a CUDA build of torch in its own venv, fastcur built with
# FASTCUR_BUILD_CUDA=1, then every fastcur op must have a CUDA kernel.
#
# The build runs in a copy of the working tree (build/cuda-check/src), never in the source
# tree: an editable install there would put a _C*.so built against the CUDA torch where the
# CPU venv's editable build expects its own, and both would share build/. The copy keeps its
# own build/ between runs and files keep their mtimes, so a rebuild with nothing changed only
# relinks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
CUDA_VENV=${CUDA_VENV:-.venv-cuda}
TORCH_CUDA=${TORCH_CUDA:-torch==2.14.1}
WORK=build/cuda-check
SRC=$WORK/src
VPY=$PWD/$CUDA_VENV/bin/python

command -v nvcc >/dev/null || { echo "cuda-check: nvcc not found on PATH" >&2; exit 1; }

# 1. The CUDA venv, reused when it already has everything.
[ -x "$VPY" ] || "$PYTHON" -m venv "$CUDA_VENV"
"$VPY" -c "import torch, numpy, safetensors, tqdm, ninja, pybind11, setuptools, wheel
assert torch.version.cuda" 2>/dev/null ||
  "$VPY" -m pip install -q "$TORCH_CUDA" numpy safetensors tqdm ninja pybind11 "setuptools>=77" wheel

# 2. CUDA_HOME: the toolkit root above nvcc. When nvcc on PATH is a wrapper script outside
# the toolkit (here /usr/local/bin/nvcc), ask nvcc where it lives.
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
  if [ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]; then
    top=$(nvcc --dryrun -x cu -c /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    [ -n "$top" ] && CUDA_HOME=$(cd "$top" && pwd)
  fi
fi
SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

# 3. Refresh the copy: the files git tracks or would track (so uncommitted work is checked),
# mtimes preserved by tar; everything but the copy's build/ is replaced.
mkdir -p "$SRC"
find "$SRC" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
  tar --null -T - -cf - | tar -xf - -C "$SRC"
# setuptools skips the extension when its sources are older than the .so, blind to header
# edits; forcing build_ext hands the decision to ninja, which tracks headers.
printf '[build_ext]\nforce = 1\n' > "$SRC/setup.cfg"

# 4. Build and install (non-editable) into the CUDA venv; the venv's bin/ on PATH so torch
# runs the ninja installed above, whatever the system has.
(cd "$SRC" &&
  PATH=$(dirname "$VPY"):$PATH \
  CUDA_HOME=$CUDA_HOME \
  CPATH=$SITE/nvidia/cu13/include${CPATH:+:$CPATH} \
  FASTCUR_BUILD_CUDA=1 \
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0} \
  MAX_JOBS=${MAX_JOBS:-2} \
  "$VPY" -m pip install -q --no-build-isolation .)

# 5. Run from outside the source tree so the installed package is the one imported.
cd "$WORK" && "$VPY" -m fastcur.cli info --require-cuda-kernels
