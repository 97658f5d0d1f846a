"""The backward's peak memory on CPU against ``engine/cost.py``'s estimate.

For each model, tokens T and target rows B: the explanation from token ids (``/v1/explain``:
the forward, then the backward) and from given layer inputs (a recording), in the worker's row
chunks (``ROW_CHUNK``), one thread, no recompute on spare cores. Measured: the peak of tensor
bytes alive at once (torch's profiler, ``tests/memory_probe.py``), plus the layer inputs when
they were given (a recording is resident). Estimate: ``working_set(...).total``. Run::

    PYTHONPATH=$PWD .venv/bin/python bench/perf/explain_memory.py [--model smollm2|tiny]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from memory_probe import (  # noqa: E402
    cuda_peak_bytes,
    decoder_spec,
    peak_bytes,
    random_decoder_weights,
    rss_peak_bytes,
)

from vllm_pelrp import pipeline  # noqa: E402
from vllm_pelrp.engine.backward import forward_layer_inputs  # noqa: E402
from vllm_pelrp.engine.cost import ModelShape, explanation_gflop, working_set  # noqa: E402
from vllm_pelrp.serving.worker import ROW_CHUNK  # noqa: E402


def measure(weights, tokens: int, rows: int, from_ids: bool, how: str = "profiler"
            ) -> tuple[int, int]:
    """(measured peak bytes, estimated bytes) of one explanation; ``how``: "profiler" (torch's
    record of the CPU allocator) or "rss" (the process's resident high-water mark)."""
    spec = weights.spec
    shape = ModelShape.of_spec(spec, weights.dtype, row_chunk=ROW_CHUNK)
    peak_bytes_of = cuda_peak_bytes if weights.device.type == "cuda" else (
        rss_peak_bytes if how == "rss" else peak_bytes)
    generator = torch.Generator().manual_seed(tokens)
    ids = torch.randint(4, spec.vocab_size, (tokens,), generator=generator).tolist()
    seeds = [[[tokens - 1 - r, ids[tokens - 1 - r]]] for r in range(rows)]
    job = pipeline.BackwardJob(token_ids=ids, prompt_length=1, seeds=seeds, mode="pa-lrp")
    estimate = working_set(shape, rows, tokens, from_ids=from_ids)
    if from_ids or shape.kind == "additive":  # an additive model always starts from the ids
        peak = peak_bytes_of(lambda: pipeline.compute(weights, job, row_chunk=ROW_CHUNK))
        return peak, estimate.total
    inputs, _ = forward_layer_inputs(weights, torch.tensor(ids, device=weights.device))
    stream = sum(x.numel() * x.element_size() for x in inputs)
    peak = peak_bytes_of(lambda: pipeline.compute(weights, job, inputs, row_chunk=ROW_CHUNK))
    return peak + stream, estimate.total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "tiny", "tiny-gpt2", "llama3-8b-shape"),
                        default="smollm2",
                        help="SmolLM2-135M (shipped), a tiny random LLaMA-like decoder, a tiny "
                             "random GPT-2 (the additive engine: from ids, every layer cached), "
                             "or random weights of Llama-3-8B's shapes (--layers of them)")
    parser.add_argument("--measure", choices=("profiler", "rss"), default="profiler",
                        help="CPU: torch's profiler (exact tensor bytes; its record grows with "
                             "the run: the tiny models) or the resident high-water mark under "
                             "MALLOC_MMAP_THRESHOLD_=65536 (SmolLM2)")
    parser.add_argument("--layers", type=int, default=4, help="llama3-8b-shape: layers")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="llama3-8b-shape: the weights' dtype")
    parser.add_argument("--device", default="cpu",
                        help="llama3-8b-shape: cpu or cuda (peak from the CUDA allocator)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    if args.measure == "rss" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        # glibc reads it at start: run again with every block over 64 KiB mapped on its own
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    torch.set_num_threads(1)
    if args.model == "smollm2":
        from vllm_pelrp import load_explainer

        weights = load_explainer().weights
    elif args.model == "tiny":
        weights = random_decoder_weights(decoder_spec(64, 3, 4, 2, 128))
    elif args.model == "llama3-8b-shape":
        spec = decoder_spec(4096, args.layers, 32, 8, 14336, vocab=128256)
        weights = random_decoder_weights(spec, getattr(torch, args.dtype), device=args.device)
    else:
        from tiny_additive import tiny_additive

        from vllm_pelrp.models import architecture_for

        model = tiny_additive("gpt2", n_positions=max(args.tokens))
        weights = architecture_for(model.config).weights_from_hf(model)
    print(f"{'path':>8} {'T':>5} {'B':>3} {'measured MiB':>13} {'estimate MiB':>13} "
          f"{'est/meas':>8} {'GFLOP':>8}")
    shape = ModelShape.of_spec(weights.spec, weights.dtype, row_chunk=ROW_CHUNK)
    for tokens in args.tokens:
        # warm-up at this length: the first call of new shapes makes oneDNN's kernels and
        # scratch buffers, held for the process's life, not per explanation (rss sees them)
        measure(weights, tokens, 1, True, args.measure)
        for rows in args.rows:
            for from_ids in (True, False) if shape.kind == "rotary" else (True,):
                measured, estimate = measure(weights, tokens, rows, from_ids, args.measure)
                gflop = explanation_gflop(shape, rows, tokens, from_ids=from_ids)
                print(f"{'ids' if from_ids else 'recorded':>8} {tokens:>5} {rows:>3} "
                      f"{measured / 2**20:>13.1f} {estimate / 2**20:>13.1f} "
                      f"{estimate / measured:>8.2f} {gflop:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
