"""GPU benchmark: PA-LRP vs gradient×input on a Llama-3-8B-shaped model with random bf16 weights.

    python bench/perf/gpu_bench.py [--lengths 4096 16384 32768] [--layers 32] [--repeats 3]

Runs from the repo root on a bare CUDA machine (torch, triton and transformers; no install of
this project, no pydantic, no vLLM). Reports, per length, as ratios to gradient×input measured
in the same process: time from token ids, time when the layer inputs are given (the serving
case), and peak GPU memory beyond the weights (torch.cuda.max_memory_allocated after a reset).
Targets (issue 2): at 4096 tokens time ≤ 1.4× from ids, ≤ 1.1× from layer inputs, memory ≤ 25%.

gradient×input: transformers LlamaForCausalLM (SDPA), parameters frozen, inputs_embeds a leaf,
logit.backward(). Both share the same weight tensors (the engine gets views of the HF model).
Writes JSON to $OUT/gpu_bench.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common.standalone import ensure_package  # noqa: E402

ensure_package()

import torch  # noqa: E402

from references.llama3 import ROPE_SCALING, ROPE_THETA  # noqa: E402


def llama3_8b_config(layers: int, max_length: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        max_position_embeddings=max(131072, max_length),
        rope_parameters={**ROPE_SCALING, "rope_theta": ROPE_THETA},
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # cpu: a dry run of the script itself (tiny shapes)


def cuda_time(fn, repeats: int) -> float:
    import time

    fn()  # warm-up (Triton compile, cuBLAS heuristics)
    times = []
    for _ in range(repeats):
        if not CUDA:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def peak_beyond(fn) -> int:
    """Peak allocated bytes during fn beyond what is allocated before (weights, given inputs)."""
    if not CUDA:
        fn()
        return 1
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def random_llama(layers: int, max_length: int):
    """The Llama-3-8B-shaped model with random bf16 weights (tiny shapes for a CPU dry run),
    frozen, seeded."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = llama3_8b_config(layers, max_length)
    if not CUDA:
        config.hidden_size, config.intermediate_size, config.vocab_size = 256, 512, 1000
        config.head_dim, config.num_attention_heads, config.num_key_value_heads = 32, 8, 2
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02) if param.dim() > 1 else param.fill_(1.0)
    return model.requires_grad_(False)


def random_llama_engine(layers: int, max_length: int):
    """``random_llama`` and the engine's weights for it (views of the model's tensors)."""
    from vllm_pelrp.models import decoder_architecture_for

    model = random_llama(layers, max_length)
    return model, decoder_architecture_for(model.config).weights_from_hf(model)


def gradxinput(model, ids, target: int):
    """The baseline: gradient×input of the last position's logit ``target`` at the input
    embeddings (a leaf; the parameters are frozen), summed over the hidden dimension."""
    embeds = model.model.embed_tokens(ids[None]).detach().requires_grad_()
    model(inputs_embeds=embeds, logits_to_keep=1).logits[0, -1, target].backward()
    return (embeds.float() * embeds.grad.float()).sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from vllm_pelrp.engine.backward import (
        LogitSeeds,
        forward_layer_inputs,
        relevance_from_input_ids,
        relevance_from_layer_inputs,
    )

    model, weights = random_llama_engine(args.layers, max(args.lengths))
    config = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    device_name = torch.cuda.get_device_name() if CUDA else "CPU dry run"
    print(f"{device_name}: {args.layers} layers, weights {weight_bytes / 2**30:.1f} GiB")
    results = {}
    for length in args.lengths:
        ids = torch.randint(0, config.vocab_size, (length,), device=DEVICE)
        target = int(model(ids[None], logits_to_keep=1).logits[0, -1].argmax())
        seeds = LogitSeeds.from_rows([[(length - 1, target)]])
        positions = torch.arange(length, device=DEVICE)
        entry = {}

        def baseline():
            return gradxinput(model, ids, target)

        def ours_from_ids():
            return relevance_from_input_ids(weights, ids, seeds, "pa-lrp")

        try:
            entry["gradxinput_s"] = cuda_time(baseline, args.repeats)
            entry["gradxinput_peak"] = peak_beyond(baseline)
        except torch.OutOfMemoryError:
            entry["gradxinput_s"] = entry["gradxinput_peak"] = None
            torch.cuda.empty_cache()
        entry["ids_s"] = cuda_time(ours_from_ids, args.repeats)
        entry["ids_peak"] = peak_beyond(ours_from_ids)
        layer_inputs, _ = forward_layer_inputs(weights, ids, positions)
        entry["stream_bytes"] = sum(t.numel() * t.element_size() for t in layer_inputs)

        def ours_from_inputs():
            return relevance_from_layer_inputs(weights, layer_inputs, positions, seeds, "pa-lrp")

        entry["inputs_s"] = cuda_time(ours_from_inputs, args.repeats)
        entry["inputs_peak"] = peak_beyond(ours_from_inputs) + entry["stream_bytes"]
        del layer_inputs
        base_s, base_peak = entry["gradxinput_s"], entry["gradxinput_peak"]
        ratio = (lambda v, b: f"{v / b:.2f}×" if b else "n/a (grad×input OOM)")
        print(
            f"T={length}: grad×input {base_s if base_s is None else round(base_s, 3)} s, "
            f"peak {None if base_peak is None else round(base_peak / 2**30, 2)} GiB | "
            f"PA-LRP ids {entry['ids_s']:.3f} s ({ratio(entry['ids_s'], base_s)}), "
            f"layer inputs {entry['inputs_s']:.3f} s ({ratio(entry['inputs_s'], base_s)}) | "
            f"peak beyond weights ids {entry['ids_peak'] / 2**30:.2f} GiB "
            f"({ratio(entry['ids_peak'], base_peak)}), inputs {entry['inputs_peak'] / 2**30:.2f} GiB "
            f"({ratio(entry['inputs_peak'], base_peak)})",
            flush=True,
        )
        results[length] = entry
        if CUDA:
            torch.cuda.empty_cache()
        if os.environ.get("OUT"):  # after every length, so a run cut short keeps what it measured
            report = {"device": device_name, "layers": args.layers, "results": results}
            Path(os.environ["OUT"], "gpu_bench.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
