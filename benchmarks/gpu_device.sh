#!/usr/bin/env bash
# The GPU checks in one script: install, the GPU tests, then benchmarks/gpu.py; logs under $OUT.
#
#   bash benchmarks/gpu_device.sh fetch   # on a machine with PyPI: wheels of what a bare GPU
#                                         # image lacks (dask, partd, locket) into .whl/
#   bash benchmarks/gpu_device.sh         # on the GPU machine (about 8 minutes at most)
#
# On the GPU machine the packages come from .whl/ when it is there (a machine without network
# whose image already holds numba, numba-cuda, CuPy, pandas, xarray, SciPy, pytest and
# hypothesis); otherwise from PyPI with `pip install -e ".[test,gpu-cuda13]"` (set CUDA_EXTRA to
# gpu-cuda12 or gpu for other CUDA versions). Results: $OUT (default gpu-results/) gets
# nvidia-smi.txt, tests.log and benchmark.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = fetch ]; then
  exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "dask==2026.1.1" "partd==1.4.2" "locket==1.0.0"
fi

OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  "$PYTHON" -m pip install -q -e ".[test,${CUDA_EXTRA:-gpu-cuda13}]" || exit 1
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
"$PYTHON" -m pip list 2>/dev/null | grep -i -E "^(numba|numba-cuda|cupy.*|numpy|dask|xarray) " >>"$OUT/nvidia-smi.txt"

# The CUDA kernel's tests on the device (the same tests CI runs under Numba's CUDA simulator),
# the CuPy tests, and the benchmark's host-side checks. Most of the time is Numba compiling the
# kernels for each dtype.
timeout 270 "$PYTHON" -m pytest -q -ra -p no:cacheprovider -o addopts="" \
  tests/test_gpu_kernel.py tests/test_cupy.py tests/test_gpu_benchmark.py 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}

# All statistics with the data on the device against the device's copy bandwidth and our CPU
# path, and RasterAggregator(run_on_gpu=True) on host data against the CPU path.
timeout 270 "$PYTHON" benchmarks/gpu.py --repeat 3 --no-cpu-large 2>&1 | tee "$OUT/benchmark.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench" | tee -a "$OUT/benchmark.log"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
