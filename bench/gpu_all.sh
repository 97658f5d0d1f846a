#!/usr/bin/env bash
# The one prepared GPU run (device tool, a bare CUDA machine with torch/triton/transformers):
# kernel = reference and kernel-vs-reference timing, then the engine benchmark.
#   bash bench/gpu_all.sh            (logs and JSON land in $OUT when set)
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# Each stage has its own time limit, so one that hangs still leaves the other's numbers.
timeout 200 python3 bench/perf/gpu_kernels.py 2>&1 | tee "$out/gpu_kernels.log" || status=1
timeout 360 python3 bench/perf/gpu_bench.py --lengths 4096 16384 32768 2>&1 | tee "$out/gpu_bench.log" || status=1
exit $status
