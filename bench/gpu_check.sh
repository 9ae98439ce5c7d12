#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU and no network, build tokcore, run
# the CUDA tests and the GPU benchmarks, and print one table; then a memcheck run.
# Writes its logs and table to $OUT when that is set. Finishes within
# GPU_CHECK_BUDGET seconds (default 420: 7 minutes), so that a session's 15 minutes
# of device time hold the machine's start, this check, and a rerun of what failed.
#   bash bench/gpu_check.sh
#   GPU_CHECK_STAGES="tests" bash bench/gpu_check.sh   # a rerun of some stages only:
#     any of tests, bench, variants, memcheck (default: all four, in that order); the
#     install and its smoke test always run
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh   # on a machine without a GPU: every
#     step on the CPU instead (wheel install, smoke test, the CPU tests, a quick
#     benchmark, the variants' build), so that a broken step costs no GPU time; it
#     rehearses the steps, not their times: its tests are the whole CPU suite (on 2
#     cores about 4 minutes), so its budget is 1200 s and its tests' limit 900 s
#
# A session with a GPU machine (15 minutes of device time in all, its start included):
#   1. on the CPU machine: `make wheel && bash bench/gpu_prepare.sh`, unless
#      wheelhouse/SOURCE_HASH already equals `bash scripts/source_hash.sh`;
#   2. one device run: command `bash bench/gpu_check.sh`, carry ["wheelhouse",
#      "build/gpu_wheels"], timeout_s 480 (the budget and the install's minute);
#   3. a failed stage, once fixed: the same run with GPU_CHECK_STAGES=<that stage>,
#      while the machine is warm; then give it back;
#   4. copy $OUT's nvidia-*.md (the benchmark tables) into bench/results/, and the
#      test counts and the targets' lines into the issue note.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT" || exit 1
export OUT
PY=${PYTHON:-python3}
start=$(date +%s)
status=0
stamp() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }
# Every stage runs under a timeout, so that one that hangs (a kernel that never ends)
# leaves time for the stages after it: at most its own limit, and never past
# GPU_CHECK_BUDGET seconds from the start (the device tool stops a command at 600 s).
dry=${GPU_CHECK_DRY_RUN:-0}
budget=${GPU_CHECK_BUDGET:-$([ "$dry" = 1 ] && echo 1200 || echo 420)}
all_stages="tests bench variants memcheck"
stages=${GPU_CHECK_STAGES:-$all_stages}
for s in $stages; do
  case " $all_stages " in *" $s "*) ;; *)
    echo "GPU_CHECK_STAGES: unknown stage '$s' (choose from: $all_stages)" >&2; exit 2 ;;
  esac
done
# The numeric settings, checked before any work, as the stages are (empty: the default).
for setting in "GPU_CHECK_BUDGET:seconds" "GPU_CHECK_WORKERS:pytest workers"; do
  name=${setting%%:*}
  value=${!name-}
  case "$value" in *[!0-9]*)
    echo "$name must be a whole number (${setting#*:}), got '$value'" >&2; exit 2 ;;
  esac
done
wants() { case " $stages " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
stage_limit() {  # stage_limit MAX: seconds for the next stage
  local left=$(( budget - ($(date +%s) - start) ))
  [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"
}
timed_out() {  # timed_out RC WHAT: report a stage that timeout stopped
  [ "$1" = 124 ] && stamp "$2 STOPPED: out of time (see above for its limit)"
  return 0
}
device=cuda
[ "$dry" = 1 ] && { device=cpu; stamp "DRY RUN: every step on the CPU"; }

stamp "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
stamp "torch: $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)')"

# A throwaway venv over the machine's packages (torch, scikit-build-core, cmake,
# ninja, pytest): nothing is downloaded and the system site is left alone.
venv_dir=$(mktemp -d)  # removed on exit ($OUT, the results, stays)
trap 'rm -rf "$venv_dir"' EXIT
venv=$venv_dir/venv
# (If $PY is itself a venv's interpreter, a nested venv would not see its torch.)
if $PY -m venv --system-site-packages "$venv" > /dev/null 2>&1 && "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  PY="$venv/bin/python"
else  # no venv module (ensurepip missing), or torch not visible from one
  stamp "no usable venv over $PY's packages; installing into $PY's site-packages"
  export PIP_BREAK_SYSTEM_PACKAGES=1
fi

# CMake finds nvcc only on PATH (or $CUDA_PATH/bin); the toolkit may not be on it.
command -v nvcc > /dev/null 2>&1 || for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
  [ -x "$d/nvcc" ] && { export PATH="$PATH:$d"; break; }
done
generator=""
command -v ninja > /dev/null 2>&1 && generator="-G Ninja"

arch=$($PY -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")' 2>/dev/null)  # e.g. 90
[ "$dry" = 1 ] && arch=90  # the H200's, for the builds
if [ -z "$arch" ]; then
  stamp "NO CUDA GPU VISIBLE TO TORCH ($($PY -c 'import torch; print(torch.__version__)' 2>&1)); nothing to check"
  exit 1
fi

# Prefer the one abi3 wheel built on the CPU machine (make wheel; carry
# "wheelhouse"): running it here shows that the same binary serves this torch
# and Python. Without it, build from source for the GPU at hand only.
wheel=$(ls wheelhouse/tokcore-*.whl 2>/dev/null | head -n 1 || true)
installed=0
if [ -n "$wheel" ] && [ "$(cat wheelhouse/SOURCE_HASH 2>/dev/null)" != "$(bash scripts/source_hash.sh)" ]; then
  stamp "WARNING: $wheel was built from other sources than this tree (wheelhouse/SOURCE_HASH); building from source instead"
  wheel=""
fi
if [ -n "$wheel" ]; then
  stamp "installing the CPU machine's wheel $wheel"
  # (--force-reinstall: a tokcore of the same version left by an earlier run, say one
  # built from source, would otherwise stay and be the one tested)
  if $PY -m pip install --force-reinstall --no-deps --no-index "$wheel" > "$OUT/build.log" 2>&1; then
    installed=1
  else  # e.g. a platform tag this machine's glibc does not accept
    tail -n 5 "$OUT/build.log"; stamp "WHEEL INSTALL FAILED; building from source instead"
  fi
fi
# A one-op CUDA smoke test of the installed wheel, so that a wheel that installs
# but cannot run here costs a rebuild, not the whole check.
smoke="
import torch, tokcore
from tokcore.pooling import segment_reduce
x = torch.randn(1000, 64, device='$device')
off = torch.tensor([0, 3, 3, 700, 1000], device='$device')
y = segment_reduce(x, off, 'mean')
ref = torch.stack([x[0:3].mean(0), torch.zeros(64, device='$device'), x[3:700].mean(0), x[700:].mean(0)])
assert torch.allclose(y, ref, atol=1e-5), float((y - ref).abs().max())
print('$device smoke test passed')
"
if [ "$installed" = 1 ] && ! (cd /tmp && $PY -c "$smoke") >> "$OUT/build.log" 2>&1; then
  tail -n 15 "$OUT/build.log"; stamp "THE WHEEL FAILED ITS CUDA SMOKE TEST; building from source instead"
  $PY -m pip uninstall -y tokcore >> "$OUT/build.log" 2>&1
  installed=0
fi
if [ "$installed" = 0 ]; then
  export TOKCORE_CUDA=ON TOKCORE_CUDA_ARCHS="${arch}-real"
  stamp "building tokcore for sm_${arch}"
  if ! $PY -m pip install --force-reinstall --no-build-isolation --no-deps --no-index . >> "$OUT/build.log" 2>&1; then
    tail -n 40 "$OUT/build.log"; stamp "BUILD FAILED"; exit 1
  fi
  # the same smoke test; on failure the stages still run, to show what else fails
  if ! (cd /tmp && $PY -c "$smoke") >> "$OUT/build.log" 2>&1; then
    tail -n 15 "$OUT/build.log"; stamp "THE BUILD FROM SOURCE FAILED ITS SMOKE TEST"; status=1
  fi
fi
if [ -d build/gpu_wheels ]; then  # made by bench/gpu_prepare.sh on the CPU machine
  $PY -m pip install -q --no-index --find-links build/gpu_wheels -r bench/gpu_requirements.txt >> "$OUT/build.log" 2>&1
fi
$PY -c 'import pytest, hypothesis, numpy, tqdm' 2>/dev/null || stamp "WARNING: pytest, hypothesis, numpy or tqdm missing: run bench/gpu_prepare.sh first and carry build/gpu_wheels"

stamp "installed:"
$PY -m tokcore info 2>&1  # (to stdout, not a file: the device tool brings back at most 8 files of $OUT, all taken below)

stamp "stages: $stages (budget $budget s)"

if wants tests; then
  tests=cuda
  [ "$dry" = 1 ] && tests="not cuda"  # the CUDA cases would all skip: the CPU ones, on this wheel and torch
  # Several pytest workers where pytest-xdist is installed (the GPU machine's image has
  # it): the tests' CPU references then run side by side, 2 threads each.
  # GPU_CHECK_WORKERS sets how many (default: half the cores, at most 8; 0: none).
  workers=() threads=()
  n=${GPU_CHECK_WORKERS:-$(( $(nproc) / 2 > 8 ? 8 : $(nproc) / 2 ))}
  if [ "$n" -ge 2 ] && $PY -c 'import xdist' 2>/dev/null; then
    workers=(-n "$n") threads=(OMP_NUM_THREADS=2)
  fi
  limit=$(stage_limit $([ "$dry" = 1 ] && echo 900 || echo 180))
  stamp "tests: -k '$tests' ${workers[*]} (at most $limit s)"
  # -v: each result is logged as it comes, so a stage that runs out of time still
  # names the tests that failed before (-q names them only in its final summary)
  env "${threads[@]}" timeout "$limit" $PY -m pytest -v tests -k "$tests" -p no:cacheprovider --maxfail=20 \
    --durations=15 "${workers[@]}" > "$OUT/tests_${device}.log" 2>&1
  rc=$?; [ "$rc" = 0 ] || status=1; timed_out "$rc" "TESTS"
  [ "$rc" = 0 ] || grep -E "(FAILED|ERROR) " "$OUT/tests_${device}.log" | grep -v "^=" | head -n 30
  tail -n 15 "$OUT/tests_${device}.log"
fi

if wants bench; then
  stamp "GPU benchmarks"
  bench_args=(--device cuda)
  [ "$dry" = 1 ] && bench_args=(--device cpu --quick --no-save)
  for bench in bench/bench_*.py; do  # every family's benchmark takes --device
    family=$(basename "$bench" .py)
    limit=$(stage_limit 180)
    stamp "$family (at most $limit s)"
    timeout "$limit" $PY "$bench" "${bench_args[@]}" 2>&1 | tee "$OUT/${family}_${device}.log"
    rc=$?; [ "$rc" = 0 ] || status=1; timed_out "$rc" "$family"
  done
fi

# The forward kernel against variants that keep more loads in flight (torch-free,
# bench/cuda): which one a later change should adopt, if the target is missed.
if wants variants; then
  limit=$(stage_limit 90)
  stamp "CUDA kernel variants (bench/cuda, sm_${arch}; the build at most $limit s)"
  # ($1: the generator option, split into its words on purpose; $2: the architecture)
  if timeout "$limit" bash -c 'cmake -S . -B build/cuda_bench $1 -DTOKCORE_BUILD_EXTENSION=OFF -DTOKCORE_CUDA=ON \
       -DTOKCORE_BUILD_CUDA_BENCH=ON "-DTOKCORE_CUDA_ARCHS=$2-real" \
       && cmake --build build/cuda_bench -j --target tokcore_cuda_bench' _ "$generator" "$arch" \
       > "$OUT/cuda_bench_build.log" 2>&1; then
    if [ "$dry" = 1 ]; then
      stamp "built (dry run: not run)"
    else
      timeout "$(stage_limit 60)" build/cuda_bench/bench/cuda/tokcore_cuda_bench 2>&1 | tee "$OUT/cuda_variants.md"
      rc=$?; [ "$rc" = 0 ] || status=1; timed_out "$rc" "CUDA VARIANT BENCHMARK"
    fi
  else
    tail -n 20 "$OUT/cuda_bench_build.log"; stamp "CUDA VARIANT BENCHMARK DID NOT BUILD (or not in time)"; status=1
  fi
fi

# Last, since the table above is what this check is for: compute-sanitizer's memcheck
# over the small CUDA cases (bad offsets included), with torch's caching allocator off
# so that every tensor is its own allocation and any out-of-bounds access is seen.
# (--report-api-errors no: a CUDA call that returns an error torch expects, as its
# event queries do, is not a fault; bad accesses by a kernel are still reported.)
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if ! wants memcheck; then
  :
elif [ "$dry" = 1 ]; then
  stamp "memcheck skipped (dry run)"
elif [ "$(stage_limit 45)" -lt 45 ]; then
  stamp "memcheck skipped: less than 45 s left of GPU_CHECK_BUDGET=$budget" \
    "(rerun it alone: GPU_CHECK_STAGES=memcheck)"
elif [ -n "$sanitizer" ]; then
  # The invalid-offsets cases first, on their own: with the offsets check off (for the
  # process or, with check_offsets=False, for one call), they are where an out-of-bounds
  # access would show.
  memcheck() {  # memcheck LOG SECONDS PYTEST-ARGS...: skipped when fewer seconds are left
    local log=$1 limit=$2; shift 2
    if [ "$(stage_limit "$limit")" -lt "$limit" ]; then
      stamp "memcheck ($log) skipped: less than $limit s left (rerun it alone: GPU_CHECK_STAGES=memcheck)"
      return
    fi
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 HYPOTHESIS_PROFILE=dev timeout "$limit" "$sanitizer" --tool memcheck \
      --error-exitcode 9 --print-limit 20 --report-api-errors no $PY -m pytest -v -p no:cacheprovider -x "$@" \
      > "$OUT/$log" 2>&1
    local rc=$? passed
    passed=$(grep -c ' PASSED' "$OUT/$log" 2>/dev/null)
    case $rc in
      0) stamp "memcheck ($log): no errors in ${passed:-0} cases" ;;
      124) stamp "memcheck ($log): NOT FINISHED in $limit s: no error in the ${passed:-0} cases it passed before that" ;;
      *) tail -n 30 "$OUT/$log"; stamp "MEMCHECK FAILED (see $log)"; status=1 ;;
    esac
  }
  stamp "compute-sanitizer memcheck: invalid offsets (45 s), then the small CUDA cases (75 s), each while time is left"
  memcheck memcheck_invalid_offsets.log 45 tests/test_pooling.py -k "cuda and (invalid_offsets or check_offsets_false)"
  # (the long segments' blocks for two reduces of one dtype: all 64 such cases and the large
  # random streams would not finish in 75 s under memcheck)
  memcheck memcheck.log 75 tests \
    -k "cuda and (fixed or empty or random or (few_long and float32 and (mean or max))) and not stdlib and not large_random"
else
  stamp "memcheck skipped: no compute-sanitizer on this machine"
fi

stamp "done, status $status; table in $OUT"
exit $status
