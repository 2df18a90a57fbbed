#!/usr/bin/env bash
# One-shot GPU check on a lent machine: the GPU-marked tests, then the benchmark table, from the repo root:
#   bash bench/gpu_run.sh [extra gpu_suite.py args]
# Carry ".whl" (bitsandbytes wheel from ../shared/device/bnb-wheel.sh) and
# "peft_kernels/_cuda/libpeft_kernels_cuda.so" (the CUDA C library built here). Writes gpu_suite.json,
# gpu_suite.md, gpu_suite.log and pytest_gpu.log under $OUT (or ./out) and prints the table last.
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$out/gpu_suite.log"
timeout 180 python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu.log" | tail -n 15
timeout 360 python3 bench/gpu_suite.py --out "$out/gpu_suite.json" "$@" 2>&1 | tee -a "$out/gpu_suite.log"
