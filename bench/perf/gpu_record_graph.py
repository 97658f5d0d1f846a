"""The recording op under graph capture: a toy decoder whose layers call
``pelrp::record_layer_input`` (as the plugin hooks a served model), captured once and replayed
with three different slot maps, must leave the pool exactly as the eager model does.

    python3 bench/perf/gpu_record_graph.py                  (CUDA: captured CUDA graphs)
    python3 bench/perf/gpu_record_graph.py --cpu-dry-run    (CPU: torch.compile(fullgraph) only)

On CUDA the forward is captured in a ``torch.cuda.CUDAGraph`` (as vLLM captures its decode
batches) and, separately, compiled with ``torch.compile(fullgraph=True)`` and then captured (as
vLLM's piecewise graphs are); on CPU only the compiled form runs. Each replay changes only the
contents of the persistent inputs and of the pool's slot index, never their addresses. The
decoder and the check are ``references/record_graph.py``'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from references.record_graph import COMPILED_TOLERANCE, TOLERANCE, check  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run on the CPU (compiled form only), as bench/gpu_all.sh's dry run")
    args = parser.parse_args()
    device = "cpu" if args.cpu_dry_run or not torch.cuda.is_available() else "cuda"
    diffs = check(device)
    for name, diff in diffs.items():
        print(f"{device}: {name}, 3 slot maps replayed: max |pool - eager| = {diff:.3g}")
    ok = all(diff <= TOLERANCE.get(name, COMPILED_TOLERANCE) for name, diff in diffs.items())
    print("recording under replay equals eager:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
