"""GPU check: the engine in bf16 against fp32, from token ids and from layer inputs, on random
weights of real model shapes (Llama-3-8B, Qwen2.5-7B, Gemma 3 4B), with fewer layers than the
real models.

    python bench/perf/gpu_engine_bf16.py [--layers 6] [--length 4096] [--models llama3-8b ...]
    python bench/perf/gpu_engine_bf16.py --cpu-dry-run     # tiny shapes on CPU: the script runs

Bare CUDA machine (torch and transformers, for the configs; nothing of this project installed,
no vLLM, no weights): each model's Hugging Face config has the real hidden, intermediate, head,
kv-head, head_dim, vocabulary and RoPE settings, only ``num_hidden_layers`` is cut (6 by
default: Gemma 3's sixth layer is its first global one, so both kinds of layer run). The engine's
spec comes from that config through ``vllm_pelrp.models``; the parameter names and shapes from
the Hugging Face model built on the ``meta`` device. Weights are drawn on the device in bf16
(matrices and biases N(0, 0.02²), norm scales 1 + N(0, 0.1²) as the model applies them); the
fp32 model holds the same values upcast, so the two runs differ only in their arithmetic.

Per model, bf16 against fp32: relative L2 of the token relevance, of the positional relevance
(Σ over layers of |cos| + |sin|), of the combined relevance (the library's default combination,
when ``vllm_pelrp.assemble`` imports, i.e. pydantic is there) and the top-10 overlap (combined,
else token), from ids and from layer inputs (each dtype's own forward); and from ids = from
layer inputs within each dtype. Target: the issue's bf16 bound, relative L2 ≤ 2% and overlap
≥ 0.9 (on the combined relevance; without it on token and positional each). Prints a markdown
table, writes ``$OUT/gpu_engine_bf16.json`` when OUT is set; exit status 0 iff all checks pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_bench  # noqa: E402  (puts the package and bench/ on the path)
import torch  # noqa: E402

from bench.common.compare import relative_l2, top_k_overlap  # noqa: E402

MAX_REL_L2, MIN_OVERLAP = 0.02, 0.9  # issue 22, item 8
SAME_PATH_REL_L2 = {torch.float32: 1e-4, torch.bfloat16: 1e-2}  # from ids = from layer inputs


def qwen25_7b_config(layers: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers,
        num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
        max_position_embeddings=131072, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        use_sliding_window=False, tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"],
    )


def gemma3_4b_config(layers: int):
    """google/gemma-3-4b's text config: 5 local (sliding 1024, θ 1e4) then 1 global layer (θ 1e6,
    linear scaling 8), head_dim 256, query_pre_attn_scalar 256."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
        query_pre_attn_scalar=256, sliding_window=1024, max_position_embeddings=131072,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                     for i in range(layers)],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        architectures=["Gemma3ForCausalLM"],
    )


MODELS = {  # name → (layers, length) → Hugging Face config
    "llama3-8b": lambda layers, length: gpu_bench.llama3_8b_config(layers, length),
    "qwen2.5-7b": lambda layers, length: qwen25_7b_config(layers),
    "gemma3-4b": lambda layers, length: gemma3_4b_config(layers),
}
REAL_LAYERS = {"llama3-8b": 32, "qwen2.5-7b": 28, "gemma3-4b": 34}
# --cpu-dry-run: every size cut so the script itself runs on a CPU in seconds
DRY_RUN_SIZES = dict(hidden_size=64, intermediate_size=128, vocab_size=500, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, sliding_window=24,
                     query_pre_attn_scalar=16)


def random_weights(config, device: str):
    """The engine's bf16 and fp32 weights of ``config``: the same random values (see the module
    docstring), named and shaped as the Hugging Face model's parameters."""
    from transformers import AutoModelForCausalLM

    from vllm_pelrp.models import decoder_architecture_for
    from vllm_pelrp.models.base import weights_from_state

    arch = decoder_architecture_for(config)
    spec = arch.spec(config, 1)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: param.shape for name, param in model.named_parameters()}
    gen = torch.Generator(device=device).manual_seed(0)
    state = {}
    for name, shape in shapes.items():
        value = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
        if len(shape) == 1 and not name.endswith("bias"):  # a norm: it scales by offset + γ
            value = value * 0.1 + (1.0 - spec.norm_offset)
        else:
            value = value * 0.02
        state[name] = value
    half = weights_from_state(state, spec, arch.hf_layer, prefix="model.")
    full = weights_from_state({n: t.float() for n, t in state.items()}, spec, arch.hf_layer,
                              prefix="model.")
    return half, full


def combine():
    """The library's default combination, (token, cos, sin) → combined; None without pydantic."""
    try:
        from vllm_pelrp.assemble import combine_relevance
    except ImportError:
        return None
    return combine_relevance


def relevance(weights, ids, seeds, combined):
    """{'ids': ..., 'inputs': ...}: per path, the token, positional and combined relevance."""
    from vllm_pelrp.engine.backward import (
        forward_layer_inputs,
        relevance_from_input_ids,
        relevance_from_layer_inputs,
    )

    positions = torch.arange(len(ids), device=ids.device)
    layer_inputs, _ = forward_layer_inputs(weights, ids, positions)
    results = {"ids": relevance_from_input_ids(weights, ids, seeds, "pa-lrp"),
               "inputs": relevance_from_layer_inputs(weights, layer_inputs, positions, seeds,
                                                     "pa-lrp")}
    del layer_inputs
    parts = {}
    for path, r in results.items():
        token, cos, sin = r.token[0].cpu(), r.positional_cos[0].cpu(), r.positional_sin[0].cpu()
        parts[path] = {"token": token, "positional": (cos.abs() + sin.abs()).sum(0),
                       "combined": combined(token, cos, sin) if combined else None}
    return parts


def check_model(name: str, layers: int, length: int, device: str, dry_run: bool) -> dict:
    start = time.perf_counter()
    config = MODELS[name](layers, length)
    if dry_run:
        for key, value in DRY_RUN_SIZES.items():
            if hasattr(config, key):
                setattr(config, key, value)
    half, full = random_weights(config, device)
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (length,), device=device, generator=gen)
    from vllm_pelrp.engine.backward import LogitSeeds, final_logits, forward_layer_inputs

    _, final_hidden = forward_layer_inputs(full, ids)
    target = int(final_logits(full, final_hidden[-1:])[0].argmax())
    del final_hidden
    seeds = LogitSeeds.from_rows([[(length - 1, target)]])
    combined = combine()
    runs = {dtype: relevance(w, ids, seeds, combined)
            for dtype, w in ((torch.float32, full), (torch.bfloat16, half))}
    key = "combined" if combined else "token"
    entry = {"model": name, "layers": layers, "real_layers": REAL_LAYERS[name], "tokens": length,
             "target": target, "compared_on": key, "paths": {}}
    ok = True
    for path in ("ids", "inputs"):
        low, ref = runs[torch.bfloat16][path], runs[torch.float32][path]
        row = {part: relative_l2(low[part], ref[part])
               for part in ("token", "positional", "combined") if ref[part] is not None}
        row["top10_overlap"] = top_k_overlap(low[key], ref[key])
        checked = [row["combined"]] if combined else [row["token"], row["positional"]]
        row["ok"] = max(checked) <= MAX_REL_L2 and row["top10_overlap"] >= MIN_OVERLAP
        entry["paths"][path] = row
        ok = ok and row["ok"]
    for dtype, runs_of in runs.items():
        same = relative_l2(runs_of["ids"]["token"], runs_of["inputs"]["token"])
        entry[f"ids_vs_inputs_{str(dtype)[6:]}"] = same
        ok = ok and same <= SAME_PATH_REL_L2[dtype]
    entry["ok"] = ok
    entry["seconds"] = time.perf_counter() - start
    del half, full
    if device == "cuda":
        entry["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="tiny shapes on the CPU (checks that the script runs)")
    args = parser.parse_args()
    dry_run = args.cpu_dry_run
    device = "cpu" if dry_run else "cuda"
    if not dry_run and not torch.cuda.is_available():
        print("CUDA is not available; use --cpu-dry-run", file=sys.stderr)
        return 2
    length = min(args.length, 96) if dry_run else args.length
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU dry run (tiny shapes)"
    print(f"# Engine bf16 vs fp32 on {card}: random weights of real shapes, {args.layers} layers "
          f"each (fewer than the real models), {length} tokens, PA-LRP, target = fp32 argmax\n")
    entries = []
    for name in args.models:
        try:
            entries.append(check_model(name, args.layers, length, device, dry_run))
        except Exception as exc:  # one model's failure still leaves the others' numbers
            import traceback

            traceback.print_exc()
            entries.append({"model": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            if device == "cuda":
                torch.cuda.empty_cache()
        entry = entries[-1]
        if "error" in entry:
            print(f"| {name} | ERROR: {entry['error'][:100]} |")
            continue
        if len(entries) == 1 or "error" in entries[-2]:
            print("| model | layers (real) | path | token rel L2 | positional rel L2 | "
                  "combined rel L2 | top-10 overlap | ids = inputs fp32 / bf16 | s | peak GiB "
                  "| ok |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
        for path, row in entry["paths"].items():
            combined = f"{row['combined']:.2%}" if "combined" in row else "n/a (no pydantic)"
            print(f"| {name} | {entry['layers']} ({entry['real_layers']}) | from {path} | "
                  f"{row['token']:.2%} | {row['positional']:.2%} | {combined} | "
                  f"{row['top10_overlap']:.1f} | {entry['ids_vs_inputs_float32']:.1e} / "
                  f"{entry['ids_vs_inputs_bfloat16']:.1e} | {entry['seconds']:.0f} | "
                  f"{entry.get('peak_gib', float('nan')):.1f} | {row['ok']} |",
                  flush=True)
    ok = all(e["ok"] for e in entries)
    print(f"\nall engine bf16 checks ok: {ok} (targets: rel L2 ≤ {MAX_REL_L2:.0%}, top-10 "
          f"overlap ≥ {MIN_OVERLAP}; from ids = from inputs within "
          f"{SAME_PATH_REL_L2[torch.float32]:.0e} fp32, "
          f"{SAME_PATH_REL_L2[torch.bfloat16]:.0e} bf16)")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_engine_bf16.json").write_text(
            json.dumps({"device": card, "results": entries}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
