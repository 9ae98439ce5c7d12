#!/usr/bin/env bash
# The per-instruction-set CPU objects (CMakeLists.txt: tokcore_cpu_isa_variant) are
# compiled from the same headers with -mavx2 / -mavx512f. An inline function or
# template that such an object shares with the baseline build (same name, same
# types: a header helper, std::vector<int64_t>'s growth) is emitted as a weak
# symbol in each object, and the linker keeps ONE copy for all callers: if it kept
# an AVX-compiled copy, the baseline kernels would call AVX code, and crash on a CPU
# without it. This check fails when a weak symbol of an AVX2 or AVX-512 object
# holds a VEX/EVEX instruction (mnemonics v..., and k... mask moves), so such a
# helper gets moved into the per-ISA namespace (or made a template on its types).
# Usage: scripts/check_isa_objects.sh BUILD_DIR (x86-64 builds; elsewhere it passes).
set -euo pipefail
build=${1:?usage: check_isa_objects.sh BUILD_DIR}
objects=$(find "$build" -path '*tokcore_core_cpu_avx*' -name '*.o' | sort)
if [ -z "$objects" ]; then
  echo "check_isa_objects: no AVX2/AVX-512 variant objects under $build (not x86-64?): nothing to check"
  exit 0
fi
bad=0
checked=0
for object in $objects; do
  # weak (W, V) and unique (u) symbols defined here: the ones the linker may share
  for symbol in $(nm --defined-only "$object" | awk '$2 ~ /^[WVu]$/ {print $3}'); do
    checked=$((checked + 1))
    vector_ops=$(objdump -d --no-show-raw-insn --disassemble="$symbol" "$object" |
                 grep -cE $'\t(v[a-z]|k(mov|and|or|xor|not|test|shift|add|unpck))' || true)
    if [ "$vector_ops" != 0 ]; then
      echo "check_isa_objects: $(echo "$symbol" | c++filt) in $object: $vector_ops AVX instructions in a weak symbol"
      bad=1
    fi
  done
done
if [ "$bad" != 0 ]; then
  echo "check_isa_objects: FAILED: the linker may give these AVX copies to the baseline kernels"
  exit 1
fi
echo "check_isa_objects: $checked weak symbols of $(echo "$objects" | wc -l) AVX variant objects: no AVX instruction"
