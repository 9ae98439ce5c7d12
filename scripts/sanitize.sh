#!/usr/bin/env bash
# Runs the C++ core suite and the Python test suite against a build of tokcore made with
# AddressSanitizer and UndefinedBehaviorSanitizer (CPU kernels only: the sanitizers do not
# see inside CUDA kernels, whose thread bodies the core suite runs on the host instead).
# Any report fails the run and is printed. Needs the venv of scripts/setup.sh (VENV).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(realpath "${VENV:-.venv}")
BUILD=$(realpath -m "${BUILD:-build/asan}")
python="$VENV/bin/python"
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
[ -f "$asan" ] && [ -f "$ubsan" ] || { echo "[sanitize] gcc's libasan/libubsan not found" >&2; exit 1; }

flags="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
echo "[sanitize] building the extension and the C++ core suite with ASan + UBSan in $BUILD"
"$VENV/bin/cmake" -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DTOKCORE_CUDA=OFF -DTOKCORE_BUILD_EXTENSION=ON -DTOKCORE_BUILD_CPP_TESTS=ON \
  -DPython_EXECUTABLE="$python" -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
"$VENV/bin/cmake" --build "$BUILD"

# Leak checking is off: CPython and torch keep allocations alive until exit. A request
# too large to allocate returns null, as without ASan, so that torch raises and the
# tests of tokcore's out-of-memory errors see the error instead of an ASan abort.
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1"
(cd "$BUILD" && "$VENV/bin/ctest" --output-on-failure)
# torch is not built with ASan, so the runtime must come first in the process. A report
# aborts the process: --capture=sys leaves the C++ side's stderr uncaptured, so the report
# is printed rather than lost with pytest's captured output.
LD_PRELOAD="$asan $ubsan" TOKCORE_LIBRARY="$BUILD/libtokcore_ops.so" \
  "$python" -m pytest -q -p no:cacheprovider --capture=sys tests
echo "[sanitize] clean: no ASan or UBSan report"
