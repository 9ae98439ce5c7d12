#!/usr/bin/env bash
# Run on the CPU machine before a GPU check: downloads the Python packages of
# bench/gpu_requirements.txt (test tools, peers; with dependencies, ~20 MB) into
# build/gpu_wheels, an ignored folder that the device tool can carry
# (carry: ["build/gpu_wheels"]); gpu_check.sh installs them from there, since
# the GPU machine has no network and may lack them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p build/gpu_wheels
"$PY" -m pip download -q -d build/gpu_wheels --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 -r bench/gpu_requirements.txt -c scripts/constraints.txt
ls build/gpu_wheels
