"""Where the GPU time goes: torch.profiler tables for gradient×input and for the PA-LRP
backward from given layer inputs, on a Llama-3-8B-shaped random bf16 model.

    python bench/perf/gpu_profile.py [--length 4096] [--layers 8]

Same setup as ``bench/perf/gpu_bench.py`` (bare CUDA machine, nothing installed). Prints the top
CUDA kernels of each by total time, and writes the tables to $OUT/gpu_profile.txt when OUT is
set. A diagnostic, not a benchmark: the ratios to report come from gpu_bench.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_bench  # noqa: E402  (puts the package on the path)
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    from vllm_pelrp.engine import backward

    model, weights = gpu_bench.random_llama_engine(args.layers, args.length)
    device = gpu_bench.DEVICE
    ids = torch.randint(0, model.config.vocab_size, (args.length,), device=device)
    seeds = backward.LogitSeeds.from_rows([[(args.length - 1, 0)]])
    positions = torch.arange(args.length, device=device)
    layer_inputs, _ = backward.forward_layer_inputs(weights, ids, positions)

    cases = {
        "gradient×input": lambda: gpu_bench.gradxinput(model, ids, 0),
        "PA-LRP from layer inputs": lambda: backward.relevance_from_layer_inputs(
            weights, layer_inputs, positions, seeds, "pa-lrp"),
        "PA-LRP from ids": lambda: backward.relevance_from_input_ids(weights, ids, seeds, "pa-lrp"),
    }
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sort_key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    report = []
    for name, fn in cases.items():
        fn()
        fn()  # warm-up: Triton compiles, cuBLAS heuristics
        if device == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by=sort_key, row_limit=args.rows, max_name_column_width=70)
        report.append(f"## {name} (T={args.length}, {args.layers} layers)\n\n{table}\n")
        print(report[-1], flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_profile.txt").write_text("\n".join(report))


if __name__ == "__main__":
    main()
