# The two commands of the README:
#   make demo   set everything up, then run every family's end-to-end demo
#   make test   set everything up, then run the test suite
VENV ?= .venv
export VENV

.PHONY: setup demo test test-cpu-variants cpp-test cpp-bench cuda-bench sanitize bench wheel clean

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/tokcore demo

test: setup
	$(VENV)/bin/python -m pytest -q tests

# The pooling suite's fixed and random cases again under each CPU kernel variant
# (TOKCORE_CPU_ISA) with every output written by streaming stores
# (TOKCORE_CPU_STREAM_MIN_MB=0), paths that make test reaches only on large inputs
# or on the CPU it runs on.
test-cpu-variants: setup
	@for isa in avx512 avx2 base; do \
	  echo "== TOKCORE_CPU_ISA=$$isa TOKCORE_CPU_STREAM_MIN_MB=0"; \
	  TOKCORE_CPU_ISA=$$isa TOKCORE_CPU_STREAM_MIN_MB=0 $(VENV)/bin/python -m pytest -q tests/test_pooling.py \
	    -k "random or fixed or gradcheck or ties or few_long or a_long_segment or narrow_rows" || exit 1; \
	done

# The C++ builds' cmake (>= 3.24): the venv's, from pip, once make setup has run,
# else the system's.
CMAKE ?= $(if $(wildcard $(VENV)/bin/cmake),$(VENV)/bin/cmake,cmake)
CTEST ?= $(if $(wildcard $(VENV)/bin/ctest),$(VENV)/bin/ctest,ctest)

# The torch-free core's GoogleTest suite and a short Google Benchmark run
# (needs libgtest-dev, libbenchmark-dev and ninja-build; .ci/run installs them); then
# the check that no AVX code hides in a symbol the baseline kernels may share.
cpp-test:
	$(CMAKE) -S . -B build/cpp -G Ninja -DTOKCORE_BUILD_EXTENSION=OFF -DTOKCORE_CUDA=OFF -DTOKCORE_BUILD_CPP_TESTS=ON
	$(CMAKE) --build build/cpp
	$(CTEST) --test-dir build/cpp --output-on-failure
	bash scripts/check_isa_objects.sh build/cpp

cpp-bench: cpp-test
	build/cpp/bench/cpp/tokcore_core_bench --benchmark_min_time=0.1

# The GPU benchmark of CUDA kernel variants (needs nvcc; no torch): builds it, and runs
# it where a GPU is visible. TOKCORE_CUDA_ARCHS picks the architectures.
TOKCORE_CUDA_ARCHS ?= 80-real;90-real;90-virtual
cuda-bench:
	$(CMAKE) -S . -B build/cuda_bench -G Ninja -DTOKCORE_BUILD_EXTENSION=OFF -DTOKCORE_CUDA=ON \
	  -DTOKCORE_BUILD_CUDA_BENCH=ON "-DTOKCORE_CUDA_ARCHS=$(TOKCORE_CUDA_ARCHS)"
	$(CMAKE) --build build/cuda_bench
	@if nvidia-smi -L >/dev/null 2>&1; then build/cuda_bench/bench/cuda/tokcore_cuda_bench; \
	  else echo "cuda-bench: built; no GPU here to run it on"; fi

# The C++ suite and the Python suite on an ASan + UBSan build (CPU kernels), in build/asan.
sanitize: setup
	bash scripts/sanitize.sh

bench: setup
	$(VENV)/bin/tokcore bench

wheel: setup
	bash scripts/build_wheel.sh

clean:
	rm -rf build dist wheelhouse
