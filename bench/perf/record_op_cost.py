"""Direct cost of the recording op for requests that did not ask, against a decode step's compute.

    .venv/bin/python bench/perf/record_op_cost.py [--requests 8] [--steps 2000]

In a compiled server every decoder layer calls ``pelrp::record_layer_input`` on every step
(vllm_pelrp/serving/compiled.py): layer 0 looks each running request up once, the other layers
return when nothing is recorded. This times those 30 calls for a batch of ``--requests`` decode
rows, none explained, against the same rows' pass through the model's 30 decoder layers
(the engine's forward of the default model, one thread), measured in the same run. It bounds
the plugin's direct per-step cost; the wall-clock throughput comparison
(``bench/perf/serving_bench.py``) is noisier than the few per cent it is after.
"""

from __future__ import annotations

import argparse
import time
import types

import torch

from vllm_pelrp import load_explainer
from vllm_pelrp.engine.backward import layer_forward, make_rope
from vllm_pelrp.serving import compiled
from vllm_pelrp.serving.recorder import Recorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    weights = load_explainer().weights
    layers, hidden_size = len(weights.layers), weights.spec.hidden_size
    requests = {
        f"request-{i}": types.SimpleNamespace(
            sampling_params=types.SimpleNamespace(extra_args=None, max_tokens=32),
            prompt_token_ids=[1] * 16, output_token_ids=[])
        for i in range(args.requests)}
    runner = types.SimpleNamespace(
        input_batch=types.SimpleNamespace(num_reqs=args.requests, req_ids=list(requests)),
        requests=requests)
    recorder = Recorder(runner, [None] * layers, hidden_size, weights.dtype, 1 << 30, 2048)
    compiled.set_active(recorder)
    positions = torch.arange(args.requests) + 100
    hidden = torch.randn(args.requests, hidden_size, dtype=weights.dtype)
    residual = torch.randn_like(hidden)
    op = torch.ops.pelrp.record_layer_input

    def one_step_of_ops() -> None:
        for layer in range(layers):
            op(positions, hidden, residual if layer else None, layer)

    rope = make_rope(weights.spec, positions, weights.dtype)

    def one_step_of_layers() -> None:  # decode rows without their KV cache: a lower bound
        x = hidden
        for layer in weights.layers:
            x, _ = layer_forward(weights, layer, x, rope, keep_cache=False)

    for _ in range(50):
        one_step_of_ops()
        one_step_of_layers()
    op_times, layer_times = [], []
    for _ in range(10):  # interleaved blocks: outside load hits both alike
        started = time.perf_counter()
        for _ in range(args.steps // 10):
            one_step_of_ops()
        op_times.append((time.perf_counter() - started) / (args.steps // 10))
        started = time.perf_counter()
        for _ in range(20):
            one_step_of_layers()
        layer_times.append((time.perf_counter() - started) / 20)
    op_time, layer_time = sorted(op_times)[5], sorted(layer_times)[5]
    print(f"recording op, {layers} calls per step, {args.requests} requests none explained: "
          f"{op_time * 1e6:.0f} us per step")
    print(f"the same rows through the {layers} decoder layers: {layer_time * 1e3:.2f} ms per step")
    print(f"ratio: {op_time / layer_time:.4f}")
    compiled.set_active(None)


if __name__ == "__main__":
    main()
