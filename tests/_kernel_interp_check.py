"""Triton-interpreter checks of the RoPE-LRP kernel against the PyTorch reference.

Run by tests/test_kernels.py in a subprocess with ``TRITON_INTERPRET=1`` (the variable must be set
before triton is imported, which a shared pytest process cannot guarantee). Standalone use::

    TRITON_INTERPRET=1 python tests/_kernel_interp_check.py [case-name ...]

Prints one JSON object ``{"results": {name: {...}}, "seconds": ...}`` on the last stdout line.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import time
import types
import zlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO_ROOT))  # references/, when run as a script
from references.llama3 import ROPE_SCALING as LLAMA3  # noqa: E402

# the tiny Phi-3 LongRoPE (3/4 of a 16-dim head rotates) and Qwen3 YaRN settings of tiny_models.py
PHI3_LONGROPE = {"rope_type": "longrope", "partial_rotary_factor": 0.75, "factor": 16.0,
                 "original_max_position_embeddings": 32,
                 "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                 "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}
QWEN3_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}

# layout: "contig" (q, g contiguous), "fused" (q/k views of a fused qkv buffer, g views of a fused
# grad buffer, both through the kernel, accumulating into one pre-filled positional_out),
# "transposed" ((H, T, D) storage, strided positions).
CASES: list[dict] = [
    dict(name="neox_fp32_s05", T=13, H=9, D=64, neox=True, share=0.5, dtype="float32"),
    dict(name="gptj_fp32_s05", T=13, H=9, D=64, neox=False, share=0.5, dtype="float32"),
    dict(name="neox_fp32_s10", T=5, H=9, D=64, neox=True, share=1.0, dtype="float32"),
    dict(name="gptj_fp32_s10", T=5, H=9, D=64, neox=False, share=1.0, dtype="float32"),
    dict(name="llama3_neox_fp32_h32_d128", T=5, H=32, D=128, neox=True, share=0.5,
         dtype="float32", scaling=LLAMA3, theta=500000.0, max_pos=40000),
    dict(name="llama3_gptj_fp32_h32_d128", T=3, H=32, D=128, neox=False, share=0.5,
         dtype="float32", scaling=LLAMA3, theta=500000.0, max_pos=40000),
    dict(name="gqa_fused_fp32_h9_kv3_d64", T=7, H=9, H_kv=3, D=64, neox=True, share=0.5,
         dtype="float32", layout="fused"),
    dict(name="gqa_fused_gptj_fp32_s10", T=6, H=9, H_kv=3, D=64, neox=False, share=1.0,
         dtype="float32", layout="fused"),
    dict(name="gqa_fused_llama3_bf16_h32_kv8_d128", T=6, H=32, H_kv=8, D=128, neox=True,
         share=0.5, dtype="bfloat16", layout="fused", scaling=LLAMA3, theta=500000.0,
         max_pos=32768),
    dict(name="gqa_fused_bf16_gptj_s10", T=5, H=32, H_kv=8, D=128, neox=False, share=1.0,
         dtype="bfloat16", layout="fused", scaling=LLAMA3, theta=500000.0, max_pos=32768),
    dict(name="bf16_neox_h9_d64", T=9, H=9, D=64, neox=True, share=0.5, dtype="bfloat16"),
    dict(name="fp16_gptj_h9_d64", T=9, H=9, D=64, neox=False, share=0.5, dtype="float16"),
    dict(name="d96_masked_fp32", T=4, H=5, D=96, neox=True, share=0.5, dtype="float32"),
    dict(name="d80_masked_gptj_fp32", T=4, H=5, D=80, neox=False, share=0.5, dtype="float32"),
    dict(name="d256_fp32", T=3, H=11, D=256, neox=True, share=0.5, dtype="float32"),
    dict(name="transposed_int32pos_fp32", T=7, H=6, D=64, neox=True, share=0.5,
         dtype="float32", layout="transposed"),
    dict(name="multi_head_block_h40_d128", T=3, H=40, D=128, neox=True, share=0.5,
         dtype="float32"),
    dict(name="multi_head_block_gptj_h20_d256_bf16", T=3, H=20, D=256, neox=False, share=0.5,
         dtype="bfloat16"),
    dict(name="t1_fp32", T=1, H=4, D=32, neox=True, share=0.5, dtype="float32"),
    dict(name="t0_fp32", T=0, H=4, D=32, neox=True, share=0.5, dtype="float32"),
    dict(name="dispatcher_forced", T=5, H=4, D=64, neox=True, share=0.5, dtype="float32",
         dispatcher=True),
    # partial rotary (rotary_dim < D: the rest passes through) and a cos/sin attention factor
    dict(name="partial_neox_fp32_d96_r64_factor", T=7, H=9, D=96, rotary_dim=64, neox=True,
         share=0.5, dtype="float32", attention_factor=1.19),
    dict(name="partial_gptj_fp32_d64_r24", T=5, H=6, D=64, rotary_dim=24, neox=False, share=0.5,
         dtype="float32"),
    dict(name="partial_fused_gqa_bf16_d128_r96_s10", T=6, H=12, H_kv=4, D=128, rotary_dim=96,
         neox=True, share=1.0, dtype="bfloat16", layout="fused", attention_factor=1.3),
    dict(name="phi3_longrope_d16_r12", T=40, H=4, D=16, neox=True, share=0.5, dtype="float32",
         scaling=PHI3_LONGROPE, max_pos=40),
    dict(name="yarn_qwen3_fp32_d16", T=9, H=4, D=16, neox=True, share=0.5, dtype="float32",
         scaling=QWEN3_YARN, theta=1e6, max_pos=128),
]

TOLERANCES = {
    # grad: max abs error relative to max |ref grad|; pos: relative to max |ref positional|
    "float32": dict(grad=1e-5, pos=1e-5),
    "bfloat16": dict(grad=1.6e-2, pos=1e-4),
    "float16": dict(grad=2e-3, pos=1e-4),
}


def load_kernels():
    """Import ``vllm_pelrp.kernels``; fall back to loading ``<repo>/kernels`` under that name."""
    try:
        return importlib.import_module("vllm_pelrp.kernels")
    except Exception:
        pass
    if sys.modules.get("vllm_pelrp") is None:
        parent = types.ModuleType("vllm_pelrp")
        parent.__path__ = []  # type: ignore[attr-defined]
        sys.modules["vllm_pelrp"] = parent
    kdir = REPO_ROOT / "kernels"
    spec = importlib.util.spec_from_file_location(
        "vllm_pelrp.kernels", kdir / "__init__.py", submodule_search_locations=[str(kdir)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vllm_pelrp.kernels"] = mod
    spec.loader.exec_module(mod)
    return mod


def _rel_err(a, b) -> float:
    diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    scale = b.float().abs().max().item() if b.numel() else 0.0
    return diff / max(scale, 1e-6)


def run_case(K, case: dict) -> dict:
    import torch

    torch.manual_seed(zlib.crc32(case["name"].encode()))
    T, H, D = case["T"], case["H"], case["D"]
    dtype = getattr(torch, case["dtype"])
    share, neox = case["share"], case["neox"]
    positions = torch.randint(0, case.get("max_pos", 4096), (T,), dtype=torch.long)
    inv_freq = K.rope_inv_freq(D, case.get("theta", 10000.0), case.get("scaling"),
                               rotary_dim=case.get("rotary_dim"),
                               seq_len=int(positions.max()) + 1 if T else None)
    factor = case.get("attention_factor", K.rope_attention_factor(case.get("scaling")))
    layout = case.get("layout", "contig")
    out: dict = {}

    def both(g, q, pos, pr_ref=None, pr_tri=None):
        ref = K.rope_lrp_backward_reference(
            g, q, pos, inv_freq, input_share=share, neox_style=neox, positional_out=pr_ref,
            attention_factor=factor,
        )
        fn = K.rope_lrp_backward if case.get("dispatcher") else K.rope_lrp_backward_triton
        tri = fn(g, q, pos, inv_freq, input_share=share, neox_style=neox, positional_out=pr_tri,
                 attention_factor=factor)
        return ref, tri

    if layout == "fused":
        H_kv = case["H_kv"]
        width = (H + 2 * H_kv) * D
        qkv = torch.randn(T, width, dtype=dtype)
        gbuf = torch.randn(T, width + 16, dtype=dtype)  # padded rows: non-trivial stride
        q = qkv[:, : H * D].view(T, H, D)
        k = qkv[:, H * D : (H + H_kv) * D].view(T, H_kv, D)
        gq = gbuf[:, : H * D].view(T, H, D)
        gk = gbuf[:, H * D : (H + H_kv) * D].view(T, H_kv, D)
        base = torch.randn(T, 2)
        pr_ref, pr_tri = base.clone(), base.clone()
        (rq, _), (tq, _) = both(gq, q, positions, pr_ref, pr_tri)
        (rk, pr_ref2), (tk, pr_tri2) = both(gk, k, positions, pr_ref, pr_tri)
        assert pr_ref2 is pr_ref and pr_tri2 is pr_tri
        out["grad_rel_err"] = max(_rel_err(tq, rq), _rel_err(tk, rk))
        out["pos_rel_err"] = _rel_err(pr_tri - base, pr_ref - base)
        out["grad_dtype_ok"] = tq.dtype == dtype and tk.dtype == dtype
        ref_grad, tri_grad = rq, tq
    elif layout == "transposed":
        q = torch.randn(H, T, D, dtype=dtype).transpose(0, 1)
        g = torch.randn(H, T, D, dtype=dtype).transpose(0, 1)
        pos = torch.randint(0, 4096, (2 * T,), dtype=torch.int32)[::2]
        (rg, rp), (tg, tp) = both(g, q, pos)
        out["grad_rel_err"] = _rel_err(tg, rg)
        out["pos_rel_err"] = _rel_err(tp, rp)
        out["grad_dtype_ok"] = tg.dtype == dtype
        ref_grad, tri_grad = rg, tg
    else:
        q = torch.randn(T, H, D, dtype=dtype)
        g = torch.randn(T, H, D, dtype=dtype)
        (rg, rp), (tg, tp) = both(g, q, positions)
        if case.get("dispatcher"):
            from vllm_pelrp.kernels import rope_lrp as rl

            out["dispatched_to_triton"] = rl._use_triton(g.device, "auto")
        out["grad_rel_err"] = _rel_err(tg, rg)
        out["pos_rel_err"] = _rel_err(tp, rp)
        out["grad_dtype_ok"] = tg.dtype == dtype and tp.dtype == torch.float32
        out["shapes_ok"] = tuple(tg.shape) == (T, H, D) and tuple(tp.shape) == (T, 2)
        ref_grad, tri_grad = rg, tg
    out["grad_max_abs_err"] = (
        (tri_grad.float() - ref_grad.float()).abs().max().item() if ref_grad.numel() else 0.0
    )
    tol = TOLERANCES[case["dtype"]]
    out["ok"] = bool(
        out["grad_rel_err"] <= tol["grad"]
        and out["pos_rel_err"] <= tol["pos"]
        and out["grad_dtype_ok"]
        and out.get("shapes_ok", True)
        and out.get("dispatched_to_triton", True)
    )
    return out


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("TRITON_INTERPRET=1 must be set in the environment", file=sys.stderr)
        return 2
    os.environ.setdefault("VLLM_PELRP_FORCE_TRITON", "1")  # for the dispatcher case
    start = time.time()
    K = load_kernels()
    import torch

    torch.set_num_threads(1)
    from vllm_pelrp.kernels import rope_lrp as rl  # noqa: E402

    if not rl._kernel_is_interpreted():
        print("kernel is not running under the Triton interpreter", file=sys.stderr)
        return 2
    wanted = set(argv)
    results = {}
    for case in CASES:
        if wanted and case["name"] not in wanted:
            continue
        t0 = time.time()
        try:
            res = run_case(K, case)
        except Exception as exc:  # report, don't abort the other cases
            res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        res["seconds"] = round(time.time() - t0, 3)
        results[case["name"]] = res
    print(json.dumps({"results": results, "seconds": round(time.time() - start, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
