#!/usr/bin/env bash
# Sets up a virtual environment with torch and builds + installs tokcore into it.
# Idempotent: a second run only rebuilds what changed (CMake build dir under build/).
#   VENV=path   where the environment lives (default .venv)
#   TORCH_SPEC  what to install for torch (default: the CPU wheel on this machine's
#               disk if present, else torch==2.13.0 from the index)
#   EDITABLE=1  install in editable mode (Python sources used in place)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -z "${TORCH_SPEC:-}" ]; then
    wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
    TORCH_SPEC=${wheel:-torch==2.13.0}
  fi
  echo "[setup] installing torch ($TORCH_SPEC)"
  "${pip[@]}" install -q "$TORCH_SPEC"
fi

echo "[setup] installing build and test tools"
"${pip[@]}" install -q -c scripts/constraints.txt "scikit-build-core>=0.10" "cmake>=3.24" ninja numpy tqdm pytest hypothesis expecttest

echo "[setup] building and installing tokcore"
if [ "${EDITABLE:-0}" = 1 ]; then
  "${pip[@]}" install -q --no-build-isolation --no-deps -e .
else
  "${pip[@]}" install -q --no-build-isolation --no-deps .
fi
"$VENV/bin/python" -c "import tokcore; print('[setup] tokcore', tokcore.__version__, 'CUDA kernels:', tokcore.has_cuda_kernels())"
if [ "${TOKCORE_CUDA:-AUTO}" != OFF ] && [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null 2>&1 \
   && [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "[setup] note: /usr/local/cuda/bin/nvcc is not on PATH, so the CUDA kernels were not built;" \
    "for them: export PATH=\$PATH:/usr/local/cuda/bin, and run this again"
fi
