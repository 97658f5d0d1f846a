"""CPU benchmark: time and peak memory per explanation, PA-LRP vs gradient×input vs LXT AttnLRP.

    .venv/bin/python bench/perf/cpu_bench.py [--lengths 128 512 2048] [--repeats 3] [--no-lxt]

Everything is reported as a ratio to plain autograd gradient×input on the same model, measured
in the same run (absolute times on shared machines are noise). Timing: one process per length
loads the model once and runs the methods round-robin (warm-up first, median of the repeats).
Memory: each (length, method) runs once more in a fresh process, which resets the kernel's
peak-RSS counter after loading the weights and reports VmHWM − VmRSS-before: the peak bytes
beyond the weights. LXT runs in its own environment (.venv-lxt, transformers 4.x), timed by
references/lxt_reference.py the same way.

Methods:
- gradxinput: HF LlamaForCausalLM (SDPA attention), parameters frozen, inputs_embeds a leaf,
  logit.backward(); relevance = (e ⊙ ∂e).sum(-1).
- pa-lrp (ids): vllm_pelrp engine from token ids (forward + layer-wise backward).
- pa-lrp (layer inputs): the serving case: the residual stream is given (recorded by vLLM).
- attnlrp (ids): our AttnLRP mode, for reference.

``--window`` instead measures one sliding-window attention layer (Gemma 3 270M's heads: 4 query
heads, 1 kv head, D = 256, fp32, one target row) at ``--window-length`` tokens and window
``--window-size``, attention forward + LRP backward, windowed against dense (one process each,
peak beyond the inputs and median time):
- windowed: ``kernels/attention_lrp.py`` in tiles of ``WINDOW_TILE`` queries (the engine's path);
- dense mask, fused: a T×T additive mask through the same fused CPU flash kernels;
- dense fallback: what the engine did before: SDPA with a T×T mask, then the reference over
  every earlier key (``sliding_window=None``: the same work as the old windowed reference);
- windowed reference: ``kernels/attention_lrp_reference.py`` with the window.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_pelrp import settings

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["gradxinput", "pa-lrp (ids)", "pa-lrp (layer inputs)", "attnlrp (ids)"]


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _input_ids(tokenizer, length: int) -> list[int]:
    """Real text (this file's docstring and the README), repeated to the length."""
    text = __doc__ + (ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else __doc__
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return (ids * (length // len(ids) + 1))[:length]


def _runner(length: int):
    """Load the model; return (callables per method, input ids)."""
    import torch

    from vllm_pelrp import load_explainer
    from vllm_pelrp.engine.backward import (
        LogitSeeds,
        forward_layer_inputs,
        relevance_from_input_ids,
        relevance_from_layer_inputs,
    )

    explainer = load_explainer()
    model, weights = explainer.hf_model, explainer.weights
    ids = torch.tensor(_input_ids(explainer.tokenizer, length))
    target = int(model(ids[None], logits_to_keep=1).logits[0, -1].argmax())
    seeds = LogitSeeds.from_rows([[(length - 1, target)]])
    positions = torch.arange(length)
    state = {}

    def gradxinput():
        embeds = model.model.embed_tokens(ids[None]).detach().requires_grad_()
        logit = model(inputs_embeds=embeds, logits_to_keep=1).logits[0, -1, target]
        logit.backward()
        return (embeds * embeds.grad).sum(-1)

    def prepare_layer_inputs():
        state["layer_inputs"], _ = forward_layer_inputs(weights, ids, positions)

    methods = {
        "gradxinput": gradxinput,
        "pa-lrp (ids)": lambda: relevance_from_input_ids(weights, ids, seeds, "pa-lrp"),
        "pa-lrp (layer inputs)": lambda: relevance_from_layer_inputs(
            weights, state["layer_inputs"], positions, seeds, "pa-lrp"),
        "attnlrp (ids)": lambda: relevance_from_input_ids(weights, ids, seeds, "attnlrp"),
    }
    return methods, prepare_layer_inputs, ids.tolist(), target


def child_time(length: int, repeats: int) -> dict:
    methods, prepare, _, target = _runner(length)
    prepare()
    times = {name: [] for name in methods}
    cpu_times = {name: [] for name in methods}
    for name, run in methods.items():  # warm-up
        run()
    for _ in range(repeats):
        for name, run in methods.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    return {"times": {name: statistics.median(values) for name, values in times.items()},
            "cpu_times": {name: statistics.median(v) for name, v in cpu_times.items()},
            "target": target}


def child_memory(length: int, method: str) -> dict:
    import gc

    import ctypes

    methods, prepare, _, _ = _runner(length)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so reuse can't hide a peak
    Path("/proc/self/clear_refs").write_text("5")
    before = _vm("VmRSS")
    if method == "pa-lrp (layer inputs)":
        prepare()  # the recorded residual stream counts as memory of the serving case
    methods[method]()
    return {"peak_bytes_beyond_weights": _vm("VmHWM") - before}


WINDOW_METHODS = ["windowed", "dense mask, fused", "dense fallback", "windowed reference"]


def _window_runner(method: str, length: int, window: int):
    """Inputs of one Gemma-3-270M-shaped attention layer, and the method as a callable."""
    import torch

    from vllm_pelrp.kernels import attention_lrp
    from vllm_pelrp.kernels.attention_lrp_reference import attention_lrp_backward_reference

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(length, h, 256, generator=gen) for h in (4, 1, 1))
    grad = torch.randn(1, length, 4, 256, generator=gen)

    def dense_mask():
        distance = torch.arange(length)[:, None] - torch.arange(length)[None, :]
        return torch.zeros(length, length).masked_fill((distance < 0) | (distance >= window),
                                                       float("-inf"))

    def windowed():
        output, lse = attention_lrp.attention_forward_for_lrp(q, k, v, sliding_window=window)
        return attention_lrp.attention_lrp_backward(q, k, v, grad, 0.5, sliding_window=window,
                                                    output=output, logsumexp=lse)

    def dense_fused():
        mask = dense_mask()
        q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q4, k4, v4, 0.0, False, attn_mask=mask)
        return attention_lrp._flash_backward_cpu(q4, k4, v4, grad.transpose(1, 2), output, lse,
                                                 False, None, mask)

    def dense_fallback():
        mask = dense_mask()
        torch.nn.functional.scaled_dot_product_attention(
            *(x.transpose(0, 1) for x in (q, k, v)), attn_mask=mask, enable_gqa=True)
        del mask
        return attention_lrp_backward_reference(q, k, v, grad, 0.5)

    def windowed_reference():
        return attention_lrp_backward_reference(q, k, v, grad, 0.5, sliding_window=window)

    return {"windowed": windowed, "dense mask, fused": dense_fused,
            "dense fallback": dense_fallback, "windowed reference": windowed_reference}[method]


def child_window(method: str, length: int, window: int, repeats: int) -> dict:
    """Peak bytes beyond the inputs of the first call (fresh process), then the median time."""
    import ctypes
    import gc

    run = _window_runner(method, length, window)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _vm("VmRSS")
    run()
    peak = _vm("VmHWM") - before
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {"peak_bytes_beyond_inputs": peak, "time_s": statistics.median(times),
            "cpu_time_s": statistics.median(cpu_times)}


def run_window(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from vllm_pelrp.kernels.attention_lrp import WINDOW_TILE

    length, window = args.window_length, args.window_size
    results = {method: run_child(["window", method, str(length), str(window), str(args.repeats)])
               for method in WINDOW_METHODS}
    table = Table(title=f"CPU, one sliding-window attention layer (4 q heads, 1 kv head, D=256, "
                        f"fp32, 1 row), T={length}, W={window}, tile {WINDOW_TILE}: "
                        f"forward + LRP backward")
    for column in ("method", "time s", "time ratio", "CPU s", "CPU ratio", "peak MiB",
                   "memory ratio"):
        table.add_column(column, justify="right" if column != "method" else "left")
    base = results["windowed"]
    for method, entry in results.items():
        table.add_row(method, f"{entry['time_s']:.2f}", f"{entry['time_s'] / base['time_s']:.2f}×",
                      f"{entry['cpu_time_s']:.2f}",
                      f"{entry['cpu_time_s'] / base['cpu_time_s']:.2f}×",
                      f"{entry['peak_bytes_beyond_inputs'] / 2**20:.0f}",
                      f"{entry['peak_bytes_beyond_inputs'] / base['peak_bytes_beyond_inputs']:.2f}×")
    Console().print(table)
    out = args.json.with_name("cpu_bench_window.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"length": length, "window": window, "tile": WINDOW_TILE,
                               "threads": args.threads, "results": results}, indent=2))
    print(f"wrote {out}")


def run_child(args: list[str]) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True,
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def run_lxt(length: int, repeats: int, target: int) -> dict | None:
    lxt_python = ROOT / ".venv-lxt" / "bin" / "python"
    if not lxt_python.exists():
        return None
    from transformers import AutoTokenizer

    from vllm_pelrp.default_model import default_checkpoint_dir, ensure_default_checkpoint

    ensure_default_checkpoint(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(default_checkpoint_dir())
    ids = _input_ids(tokenizer, length)
    with tempfile.TemporaryDirectory() as work:
        request = {"cases": [{"input_ids": ids, "target_position": length - 1,
                              "target_token_id": target}],
                   "mode": "attnlrp", "repeats": repeats, "time": True,
                   "only_target_logits": True}
        Path(work, "in.json").write_text(json.dumps(request))
        subprocess.run([str(lxt_python), str(ROOT / "references" / "lxt_reference.py"), "--model",
                        str(default_checkpoint_dir()), "--input-json", f"{work}/in.json",
                        "--output-json", f"{work}/out.json"], check=True, capture_output=True)
        case = json.loads(Path(work, "out.json").read_text())["cases"][0]
    return {"time_s": case["time_s_median"], "peak_bytes_beyond_weights": case["peak_bytes_beyond_weights"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-lxt", action="store_true")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "perf" / "results" / "cpu_bench.json")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's). With 1, the process CPU time is "
                             "a fair measure even on a loaded machine")
    parser.add_argument("--window", action="store_true",
                        help="one sliding-window attention layer, windowed against dense")
    parser.add_argument("--window-length", type=int, default=4096)
    parser.add_argument("--window-size", type=int, default=512)
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        settings.set_in_process("VLLM_PELRP_BENCH_THREADS", args.threads)  # children inherit it
    elif threads := settings.get("VLLM_PELRP_BENCH_THREADS"):
        import torch

        torch.set_num_threads(threads)
    if args.child:
        kind = args.child[0]
        if kind == "window":
            result = child_window(args.child[1], *map(int, args.child[2:5]))
        else:
            length = int(args.child[1])
            result = (child_time(length, int(args.child[2])) if kind == "time"
                      else child_memory(length, args.child[2]))
        print(json.dumps(result))
        return

    if args.window:
        run_window(args)
        return

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console()
    results = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmark", total=len(args.lengths) * (len(METHODS) + 2))
        for length in args.lengths:
            repeats = args.repeats if length <= 512 else max(1, args.repeats - 1)
            progress.update(task, description=f"T={length}: timing")
            timing = run_child(["time", str(length), str(repeats)])
            times = timing["times"]
            progress.advance(task)
            memory = {}
            for method in METHODS:
                progress.update(task, description=f"T={length}: memory of {method}")
                memory[method] = run_child(["memory", str(length), method])["peak_bytes_beyond_weights"]
                progress.advance(task)
            lxt = None if args.no_lxt else run_lxt(length, repeats, timing["target"])
            progress.advance(task)
            results[length] = {"time_s": times, "cpu_time_s": timing["cpu_times"],
                               "peak_bytes_beyond_weights": memory, "lxt": lxt,
                               "threads": args.threads}
            args.json.parent.mkdir(parents=True, exist_ok=True)  # partial results survive
            args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))

    table = Table(title="CPU, SmolLM2-135M fp32: ratio to gradient×input (same run)")
    for column in ("tokens", "method", "time ratio", "CPU-time ratio", "memory ratio", "time s",
                   "peak MiB"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for length, entry in results.items():
        base_time = entry["time_s"]["gradxinput"]
        base_cpu = entry["cpu_time_s"]["gradxinput"]
        base_memory = entry["peak_bytes_beyond_weights"]["gradxinput"]
        rows = [(m, entry["time_s"][m], entry["cpu_time_s"][m],
                 entry["peak_bytes_beyond_weights"][m]) for m in METHODS]
        if entry["lxt"]:
            rows.append(("LXT AttnLRP (own env, eager)", entry["lxt"]["time_s"], None,
                         entry["lxt"]["peak_bytes_beyond_weights"]))
        for method, seconds, cpu_seconds, peak in rows:
            cpu_ratio = "–" if cpu_seconds is None else f"{cpu_seconds / base_cpu:.2f}×"
            table.add_row(str(length), method, f"{seconds / base_time:.2f}×", cpu_ratio,
                          f"{peak / base_memory:.2f}×", f"{seconds:.2f}", f"{peak / 2**20:.0f}")
    console.print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
