"""Direct cost of the recording op against a decode step's compute.

    .venv/bin/python bench/perf/record_op_cost.py [--requests 8] [--steps 2000]

In a served model every decoder layer calls ``pelrp::record_layer_input`` on every step
(vllm_pelrp/serving/record_pool.py). This times those 30 calls for a batch of ``--requests``
decode rows (a) when no row of the step is recorded (the op returns on a host flag) and (b)
when one row is (the op writes every row: the recorded one to its slot, the others to the
scratch slot, as it must under CUDA graph replay), against the same rows' pass through the
model's 30 decoder layers (the engine's forward of the default model, one thread), measured in
the same run. It bounds the plugin's direct per-step cost; the wall-clock throughput
comparison (``bench/perf/serving_bench.py``) is noisier than the few per cent it is after.
"""

from __future__ import annotations

import argparse
import time

import torch

from vllm_pelrp import load_explainer
from vllm_pelrp.engine.backward import rotary_model
from vllm_pelrp.serving.record_pool import RecordingPool, set_pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    weights = load_explainer().weights
    layers, hidden_size = len(weights.layers), weights.spec.hidden_size
    pool = RecordingPool(layers, hidden_size, weights.dtype, "cpu", cap_bytes=256 * 2**20,
                         max_batch_tokens=2048)
    set_pool(pool)
    pages = pool.allocate(64)
    positions = torch.arange(args.requests) + 100
    hidden = torch.randn(args.requests, hidden_size, dtype=weights.dtype)
    residual = torch.randn_like(hidden)
    op = torch.ops.pelrp.record_layer_input

    def one_step_of_ops() -> None:
        for layer in range(layers):
            op(hidden, residual if layer else None, layer)

    model = rotary_model(weights)
    context = model.positions(positions)

    def one_step_of_layers() -> None:  # decode rows without their KV cache: a lower bound
        x = hidden
        for layer in model.layers:
            x, _ = layer.forward(x, context, keep_cache=False)

    def timed(function, repeats: int) -> float:
        started = time.perf_counter()
        for _ in range(repeats):
            function()
        return (time.perf_counter() - started) / repeats

    for _ in range(50):
        one_step_of_ops()
        one_step_of_layers()
    idle, recording, layer_times = [], [], []
    for _ in range(10):  # interleaved blocks: outside load hits both alike
        pool.set_step([])
        idle.append(timed(one_step_of_ops, args.steps // 10))
        pool.set_step([(0, 1, pages, 10)])
        recording.append(timed(one_step_of_ops, args.steps // 10))
        layer_times.append(timed(one_step_of_layers, 20))
    idle_time, record_time = sorted(idle)[5], sorted(recording)[5]
    layer_time = sorted(layer_times)[5]
    print(f"recording op, {layers} calls per step, {args.requests} decode rows:")
    print(f"  none recorded: {idle_time * 1e6:.0f} us per step, ratio to the layers "
          f"{idle_time / layer_time:.4f}")
    print(f"  one recorded (every row written): {record_time * 1e6:.0f} us per step, ratio "
          f"{record_time / layer_time:.4f}")
    print(f"the same rows through the {layers} decoder layers: {layer_time * 1e3:.2f} ms per step")
    set_pool(None)


if __name__ == "__main__":
    main()
