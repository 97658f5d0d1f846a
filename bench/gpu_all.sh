#!/usr/bin/env bash
# The one prepared GPU run (issue 22, item 9): at most 8 minutes on one H100, on a bare CUDA
# machine (torch, triton, transformers; no vLLM, nothing of this project installed, no real
# weights: random weights of real shapes, drawn on the device).
#   bash bench/gpu_all.sh                (logs and JSON land in $OUT when set, else /tmp)
#   bash bench/gpu_all.sh --cpu-dry-run  (tiny sizes on the CPU, Triton interpreted: checks that
#                                         every step runs, in about a minute here)
# Steps, each under its own time limit (a step that hangs still leaves the others' numbers);
# the estimates are for an H100, from the H200 run of 2026-11-28 where there is one:
#   1. Triton kernels = their references, and their timing       est.  30 s (11 s on the H200) limit  90 s
#   2. engine bf16 vs fp32, from ids and from layer inputs,
#      Llama-3-8B / Qwen2.5-7B / Gemma 3 4B shapes, 6 layers    est.  90 s                    limit 150 s
#   3. time vs gradient×input at 4096 tokens, peak memory
#      (Llama-3-8B shape, 32 layers, 15 GiB of bf16 weights)     est.  90 s                    limit 150 s
#   4. the recording op in a CUDA graph (lead's slot, below)     est.  30 s                    limit  60 s
# The limits add up to 450 s, plus nvidia-smi: under 8 minutes even if every step runs out.
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
mkdir -p "$out"
python="${PYTHON:-python3}"
dry=0
[[ "${1:-}" == "--cpu-dry-run" ]] && dry=1
status=0
start=$SECONDS

step() {  # step NAME LIMIT_S COMMAND...: run under a time limit, log to $out/NAME.log
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "=== $name (limit ${limit} s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [[ $rc -eq 0 ]] || status=1
}

if [[ $dry -eq 1 ]]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  echo "CPU dry run: tiny sizes, Triton interpreted; no number below is a measurement" | tee "$out/gpu.txt"
  step gpu_kernels 300 "$python" bench/perf/gpu_kernels.py --device cpu --sizes 64 --reps 1 --warmup 0
  step gpu_engine_bf16 300 "$python" bench/perf/gpu_engine_bf16.py --cpu-dry-run
  step gpu_bench 300 "$python" bench/perf/gpu_bench.py --lengths 64 --layers 2 --repeats 1
  record_args=(--cpu-dry-run)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  step gpu_kernels 90 "$python" bench/perf/gpu_kernels.py
  step gpu_engine_bf16 150 "$python" bench/perf/gpu_engine_bf16.py --layers 6 --length 4096
  step gpu_bench 150 "$python" bench/perf/gpu_bench.py --lengths 4096
  record_args=()
fi

# the recording op captured in CUDA graphs of a toy decoder, replayed with three slot maps,
# equal to eager (references/record_graph.py)
step gpu_record_graph 60 "$python" bench/perf/gpu_record_graph.py "${record_args[@]}"

echo "gpu_all.sh: total $((SECONDS - start)) s, exit $status"
exit $status
