#!/usr/bin/env bash
# Prints one hash of the sources a wheel is built from (C++/CUDA, Python, build
# files). build_wheel.sh stores it beside the wheel; gpu_check.sh compares it with
# the tree it runs in, so a wheel built from older sources is never the one tested.
# Uses find, not git: the GPU machine gets a copy of the tree without .git.
set -euo pipefail
cd "$(dirname "$0")/.."
find csrc include python cmake CMakeLists.txt pyproject.toml -type f \
    ! -name '*.pyc' ! -name '*.so' ! -path '*/__pycache__/*' -print0 \
  | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
