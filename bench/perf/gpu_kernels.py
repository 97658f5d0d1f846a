"""GPU check + benchmark of the RoPE-LRP Triton kernel against the PyTorch reference.

Run from the repository root on a CUDA machine (torch + triton; vLLM not needed, nothing
installed):

    python bench/perf/gpu_kernels.py [--sizes 4096,16384,32768] [--reps 20]

Llama-3-8B attention shapes: q H=32, k H_kv=8, D=128, bf16, llama3 rope scaling (theta 5e5),
q/k/grad as strided views of fused buffers, both pushed through the kernel accumulating into one
positional buffer (as in a real layer). Prints a markdown table and writes JSON to
``$OUT/gpu_kernels.json`` when ``$OUT`` is set. Exit status 0 iff every correctness check passed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from references.llama3 import ROPE_SCALING as LLAMA3  # noqa: E402
from references.llama3 import ROPE_THETA as THETA  # noqa: E402


def load_kernels():
    """``vllm_pelrp.kernels``, installed or loaded from ``<repo>/kernels`` (bench/common/standalone.py)."""
    from bench.common.standalone import ensure_package

    ensure_package()
    return importlib.import_module("vllm_pelrp.kernels")


H, H_KV, D = 32, 8, 128  # Llama-3-8B's attention heads, key-value heads and head size
# bf16: grad error relative to max|ref| (1 bf16 ulp ≈ 7.8e-3); positional relative to max|ref|
TOL = {"bfloat16": (1.6e-2, 1e-4), "float32": (1e-5, 1e-5)}
# "cpu" only for a dry run of this script under TRITON_INTERPRET=1 (--device cpu, tiny sizes)
DEVICE = "cuda"


def _sync(torch):
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def make_layer_inputs(torch, T, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    width = (H + 2 * H_KV) * D
    qkv = torch.randn(T, width, generator=gen, device=device, dtype=torch.float32).to(dtype)
    gbuf = torch.randn(T, width, generator=gen, device=device, dtype=torch.float32).to(dtype)
    q = qkv[:, : H * D].view(T, H, D)
    k = qkv[:, H * D : (H + H_KV) * D].view(T, H_KV, D)
    gq = gbuf[:, : H * D].view(T, H, D)
    gk = gbuf[:, H * D : (H + H_KV) * D].view(T, H_KV, D)
    positions = torch.arange(T, device=device, dtype=torch.long)
    return q, k, gq, gk, positions


def layer_backward(fn, q, k, gq, gk, positions, inv_freq, share, neox, attention_factor=1.0):
    pos_out = None
    gq_out, pos_out = fn(gq, q, positions, inv_freq, input_share=share, neox_style=neox,
                         positional_out=pos_out, attention_factor=attention_factor)
    gk_out, pos_out = fn(gk, k, positions, inv_freq, input_share=share, neox_style=neox,
                         positional_out=pos_out, attention_factor=attention_factor)
    return gq_out, gk_out, pos_out


def compare(torch, K, T, dtype, neox, share, fast_trig=False, rotary_dim=None,
            attention_factor=1.0):
    """Kernel against reference; ``rotary_dim`` < D: partial rotary (Phi-3: the first 3/4 of
    each head), ``attention_factor``: LongRoPE/YaRN's scaled cos/sin."""
    inv = K.rope_inv_freq(D, THETA, LLAMA3, rotary_dim=rotary_dim).to(DEVICE)
    q, k, gq, gk, pos = make_layer_inputs(torch, T, dtype, DEVICE)
    ref = layer_backward(K.rope_lrp_backward_reference, q, k, gq, gk, pos, inv, share, neox,
                         attention_factor)
    old = os.environ.get(K.rope_lrp.FAST_TRIG_ENV)
    if fast_trig:
        os.environ[K.rope_lrp.FAST_TRIG_ENV] = "1"
    try:
        tri = layer_backward(K.rope_lrp_backward_triton, q, k, gq, gk, pos, inv, share, neox,
                             attention_factor)
    finally:
        if old is None:
            os.environ.pop(K.rope_lrp.FAST_TRIG_ENV, None)
        else:
            os.environ[K.rope_lrp.FAST_TRIG_ENV] = old
    _sync(torch)
    gerr = 0.0
    grel = 0.0
    n_big = 0
    for r, t in zip(ref[:2], tri[:2]):
        diff = (t.float() - r.float()).abs()
        gerr = max(gerr, diff.max().item())
        grel = max(grel, diff.max().item() / max(r.float().abs().max().item(), 1e-6))
        # elements off by more than ~1 ulp of their own magnitude
        n_big += int((diff > (r.float().abs() * 8e-3 + 1e-6)).sum().item())
    pdiff = (tri[2] - ref[2]).abs()
    pscale = max(ref[2].abs().max().item(), 1e-6)
    gtol, ptol = TOL[str(dtype).replace("torch.", "")]
    ok = grel <= gtol and pdiff.max().item() / pscale <= ptol
    return {
        "T": T,
        "dtype": str(dtype).replace("torch.", ""),
        "neox": neox,
        "input_share": share,
        "trig": "tl.cos/tl.sin" if fast_trig else "libdevice",
        "rotary_dim": rotary_dim or D,
        "attention_factor": attention_factor,
        "grad_max_abs_err": gerr,
        "grad_rel_err": grel,
        "grad_elems_over_1ulp": n_big,
        "pos_max_abs_err": pdiff.max().item(),
        "pos_rel_err": pdiff.max().item() / pscale,
        "pos_max_abs": pscale,
        "ok": bool(ok),
    }


def time_fn(torch, fn, warmup, reps):
    for _ in range(warmup):
        fn()
    _sync(torch)
    times = []
    for _ in range(reps):
        if DEVICE != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times)


def bench(torch, K, T, dtype, warmup, reps):
    inv = K.rope_inv_freq(D, THETA, LLAMA3).to(DEVICE)
    q, k, gq, gk, pos = make_layer_inputs(torch, T, dtype, DEVICE)
    row = {"T": T, "dtype": str(dtype).replace("torch.", "")}
    nbytes = 3 * T * (H + H_KV) * D * q.element_size() + 2 * T * 8
    for name, fn in (
        ("triton", K.rope_lrp_backward_triton),
        ("reference", K.rope_lrp_backward_reference),
    ):
        med, best = time_fn(
            torch,
            lambda fn=fn: layer_backward(fn, q, k, gq, gk, pos, inv, 0.5, True),
            warmup,
            reps,
        )
        row[f"{name}_ms"] = med
        row[f"{name}_min_ms"] = best
        row[f"{name}_GBps"] = nbytes / (med * 1e-3) / 1e9
    row["speedup"] = row["reference_ms"] / row["triton_ms"]
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def attention_check(torch, K, T, warmup, reps):
    """Fused attention-LRP backward vs its explicit T×T reference (Llama-3-8B heads, bf16 q/k/v,
    one target row): error, and time of each against a plain bf16 SDPA forward + backward."""
    gen = torch.Generator(device=DEVICE).manual_seed(T)
    q, k, v = (torch.randn(T, h, D, device=DEVICE, generator=gen).bfloat16()
               for h in (H, H_KV, H_KV))
    grad = torch.randn(1, T, H, D, device=DEVICE, generator=gen)
    fused = K.attention_lrp_backward(q, k, v, grad, 0.5)
    reference = K.attention_lrp_backward_reference(q, k, v, grad, 0.5)
    row = {"T": T}
    for name, a, b in zip(("q", "k", "v"), fused, reference):
        row[f"d{name}_rel_err"] = ((a - b).norm() / b.norm()).item()
    # a sliding window (Gemma 3's local layers, Mistral): query tiles with band masks (SDPA with
    # a mask on CUDA), against the windowed reference
    window = max(T // 8, 16)
    fused_w = K.attention_lrp_backward(q, k, v, grad, 0.5, sliding_window=window)
    reference_w = K.attention_lrp_backward_reference(q, k, v, grad, 0.5, sliding_window=window)
    for name, a, b in zip(("q", "k", "v"), fused_w, reference_w):
        row[f"window_d{name}_rel_err"] = ((a - b).norm() / b.norm()).item()
    row["ok"] = all(row[f"{p}d{n}_rel_err"] < 2e-2 for n in "qkv" for p in ("", "window_"))

    def plain():
        leaves = [x.transpose(0, 1)[None].detach().requires_grad_() for x in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True,
                                                               enable_gqa=True)
        out.backward(grad.transpose(1, 2).bfloat16())

    for name, fn in (("fused", lambda: K.attention_lrp_backward(q, k, v, grad, 0.5)),
                     ("reference", lambda: K.attention_lrp_backward_reference(q, k, v, grad, 0.5)),
                     ("sdpa_fwd_bwd", plain)):
        row[f"{name}_ms"], _ = time_fn(torch, fn, warmup, reps)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def _style(r: dict) -> str:
    style = "neox" if r["neox"] else "gptj"
    if r.get("rotary_dim", D) != D:
        style += f", rot {r['rotary_dim']}/{D}, ×{r['attention_factor']}"
    return style


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4096,16384,32768")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda", help="cpu = dry run under TRITON_INTERPRET=1")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    sizes = [int(s) for s in args.sizes.split(",") if s]

    import torch

    report: dict = {"checks": [], "timings": [], "errors": []}
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; this script needs a GPU", file=sys.stderr)
        return 2
    K = load_kernels()
    import triton

    report["env"] = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "kernels_module": K.__file__,
    }
    print(f"# RoPE-LRP kernel on {report['env']['device']} "
          f"(torch {torch.__version__}, triton {triton.__version__})\n")
    t_start = time.time()

    check_cfgs = []
    for T in sizes:
        check_cfgs.append((T, torch.bfloat16, True, 0.5, False))
    small = sizes[0]
    check_cfgs += [
        (small, torch.bfloat16, False, 0.5, False),  # GPT-J interleaved
        (small, torch.bfloat16, True, 1.0, False),  # attnlrp share
        (small, torch.float32, True, 0.5, False),  # fp32 tight
        (sizes[-1], torch.bfloat16, True, 0.5, True),  # tl.cos/tl.sin instead of libdevice
    ]
    check_cfgs = [(*cfg, None, 1.0) for cfg in check_cfgs]
    # partial rotary (Phi-3/Phi-4-mini: 3/4 of each head) with a LongRoPE-like cos/sin scale
    check_cfgs += [(small, torch.bfloat16, True, 0.5, False, 3 * D // 4, 1.19),
                   (small, torch.float32, True, 0.5, False, 3 * D // 4, 1.19)]
    for T, dtype, neox, share, fast, rotary_dim, factor in check_cfgs:
        try:
            res = compare(torch, K, T, dtype, neox, share, fast_trig=fast, rotary_dim=rotary_dim,
                          attention_factor=factor)
        except Exception as exc:
            traceback.print_exc()
            res = {"T": T, "dtype": str(dtype), "neox": neox, "input_share": share,
                   "trig": "tl.cos/tl.sin" if fast else "libdevice", "ok": False,
                   "error": f"{type(exc).__name__}: {exc}"}
            report["errors"].append(res["error"])
        report["checks"].append(res)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    print("## Correctness (kernel vs reference; q H=32 + k H_kv=8 into one positional buffer)\n")
    print("| T | dtype | style | s | trig | grad max abs | grad rel | >1ulp elems | pos rel | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["checks"]:
        if "error" in r:
            print(f"| {r['T']} | {r['dtype']} | {_style(r)} | "
                  f"{r['input_share']} | {r['trig']} | ERROR: {r['error'][:80]} | | | | False |")
            continue
        print(f"| {r['T']} | {r['dtype']} | {_style(r)} | "
              f"{r['input_share']} | {r['trig']} | {r['grad_max_abs_err']:.3g} | "
              f"{r['grad_rel_err']:.3g} | {r['grad_elems_over_1ulp']} | {r['pos_rel_err']:.3g} | "
              f"{r['ok']} |")

    for T in sizes:
        try:
            report["timings"].append(bench(torch, K, T, torch.bfloat16, args.warmup, args.reps))
        except Exception as exc:
            traceback.print_exc()
            report["errors"].append(f"bench T={T}: {type(exc).__name__}: {exc}")
    print("\n## Timing (bf16, neox, s=0.5; one layer = q + k launches; median of "
          f"{args.reps} after {args.warmup} warm-up)\n")
    print("| T | triton ms | triton GB/s | reference ms | reference GB/s | speedup |")
    print("|---|---|---|---|---|---|")
    for r in report["timings"]:
        print(f"| {r['T']} | {r['triton_ms']:.4f} | {r['triton_GBps']:.0f} | "
              f"{r['reference_ms']:.3f} | {r['reference_GBps']:.0f} | {r['speedup']:.1f}x |")

    report["attention"] = []
    for T in [t for t in sizes if t <= 8192] or sizes[:1]:
        try:
            report["attention"].append(attention_check(torch, K, T, 2, max(3, args.reps // 4)))
        except Exception as exc:
            traceback.print_exc()
            report["errors"].append(f"attention T={T}: {type(exc).__name__}: {exc}")
    print("\n## Attention-LRP backward: fused vs T×T reference (bf16 q/k/v, H=32/8, D=128)\n")
    print("| T | dq rel | dk rel | dv rel | windowed dq/dk/dv rel | fused ms | reference ms | "
          "plain SDPA fwd+bwd ms | ok |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["attention"]:
        windowed = "/".join(f"{r[f'window_d{n}_rel_err']:.2g}" for n in "qkv")
        print(f"| {r['T']} | {r['dq_rel_err']:.2g} | {r['dk_rel_err']:.2g} | "
              f"{r['dv_rel_err']:.2g} | {windowed} | {r['fused_ms']:.2f} | "
              f"{r['reference_ms']:.2f} | {r['sdpa_fwd_bwd_ms']:.2f} | {r['ok']} |")

    # Only the libdevice (default) path gates the exit status; tl.cos is informational.
    report["env"]["libdevice_trig_failed"] = bool(K.rope_lrp._precise_trig_failed)
    if report["env"]["libdevice_trig_failed"]:
        print("\nWARNING: libdevice cos/sin failed to build; 'libdevice' rows used tl.cos/tl.sin")
    all_ok = all(r["ok"] for r in report["checks"] if r.get("trig") == "libdevice")
    all_ok = all_ok and all(r["ok"] for r in report["attention"])
    report["all_ok"] = all_ok
    report["seconds"] = time.time() - t_start
    print(f"\nall checks ok: {all_ok}  ({report['seconds']:.1f} s)")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_kernels.json").write_text(json.dumps(report, indent=2))
    return 0 if all_ok and not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
