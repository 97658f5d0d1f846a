"""Triton kernel for the PA-LRP backward through RoPE, plus a dispatcher.

One program per position ``t`` loops over the heads in blocks of ``BLOCK_H``: it recomputes
cos/sin from ``positions[t] * inv_freq`` in fp32, writes ``grad_pre_rope[t]`` and adds the two
positional sums into ``positional[t]`` (the program owns row ``t``, so no atomics are needed).
Each head vector is handled as its two rotation halves ``x1``/``x2`` (neox: ``d`` and ``d + D/2``;
interleaved: ``2i`` and ``2i + 1``), for which ``x̃1 = x1·c − x2·s`` and ``x̃2 = x2·c + x1·s``,
with ``c``/``s`` scaled by the attention factor (LongRoPE, YaRN). With a rotary dim ``R < D``
(partial rotary) the halves live in the first ``R`` dims (neox: ``d`` and ``d + R/2``), and the
program copies the gradient of the pass-through dims ``R ≤ d < D`` unchanged.

The kernel runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before
this module was first imported.
"""

from __future__ import annotations

import warnings

import torch

from vllm_pelrp import settings  # absolute: transformers probes a top-level "kernels" too

from .rope_lrp_reference import _check_rope_lrp_args, rope_lrp_backward_reference

try:  # Triton is optional: without it only the reference path exists.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

try:  # precise libdevice trig for compiled CUDA kernels (not available in the interpreter)
    from triton.language.extra import libdevice as _libdevice  # type: ignore

    _HAS_LIBDEVICE = HAS_TRITON
except Exception:  # pragma: no cover
    _libdevice = None
    _HAS_LIBDEVICE = False

MAX_HEAD_DIM = 256
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: env var forcing the Triton path on CPU tensors (needs TRITON_INTERPRET=1 before import)
FORCE_TRITON_ENV = "VLLM_PELRP_FORCE_TRITON"
#: env var selecting tl.cos/tl.sin instead of libdevice cosf/sinf on CUDA
FAST_TRIG_ENV = "VLLM_PELRP_ROPE_FAST_TRIG"
# set when a libdevice build failed once; later launches use tl.cos/tl.sin directly
_precise_trig_failed = False


if HAS_TRITON:

    @triton.jit
    def _rope_lrp_bwd_kernel(
        g_ptr,
        q_ptr,
        pos_ptr,
        inv_freq_ptr,
        out_ptr,
        posrel_ptr,
        H,
        HALF,
        PASS,
        stride_g_t,
        stride_g_h,
        stride_g_d,
        stride_q_t,
        stride_q_h,
        stride_q_d,
        stride_o_t,
        stride_o_h,
        stride_o_d,
        stride_pos,
        stride_pr_t,
        stride_pr_c,
        input_share,
        attention_factor,
        NEOX: tl.constexpr,
        PRECISE_TRIG: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        BLOCK_PASS: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BLOCK_HALF)
        i_mask = i < HALF
        if NEOX:
            d1 = i
            d2 = i + HALF
        else:
            d1 = 2 * i
            d2 = 2 * i + 1

        pos = tl.load(pos_ptr + t * stride_pos).to(tl.float32)
        freq = tl.load(inv_freq_ptr + i, mask=i_mask, other=0.0)
        ang = pos * freq
        if PRECISE_TRIG:
            c = _libdevice.cos(ang)
            s = _libdevice.sin(ang)
        else:
            c = tl.cos(ang)
            s = tl.sin(ang)
        c = c * attention_factor
        s = s * attention_factor
        c2 = c[None, :]
        s2 = s[None, :]

        share = input_share
        acc_c = tl.zeros((BLOCK_H, BLOCK_HALF), dtype=tl.float32)
        acc_s = tl.zeros((BLOCK_H, BLOCK_HALF), dtype=tl.float32)
        g_row = g_ptr + t * stride_g_t
        q_row = q_ptr + t * stride_q_t
        o_row = out_ptr + t * stride_o_t
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            m = (h < H)[:, None] & i_mask[None, :]
            hg = h[:, None] * stride_g_h
            hq = h[:, None] * stride_q_h
            ho = h[:, None] * stride_o_h
            g1 = tl.load(g_row + hg + d1[None, :] * stride_g_d, mask=m, other=0.0).to(tl.float32)
            g2 = tl.load(g_row + hg + d2[None, :] * stride_g_d, mask=m, other=0.0).to(tl.float32)
            q1 = tl.load(q_row + hq + d1[None, :] * stride_q_d, mask=m, other=0.0).to(tl.float32)
            q2 = tl.load(q_row + hq + d2[None, :] * stride_q_d, mask=m, other=0.0).to(tl.float32)
            # Rᵀ g, scaled by the input share.
            gq1 = (g1 * c2 + g2 * s2) * share
            gq2 = (g2 * c2 - g1 * s2) * share
            tl.store(o_row + ho + d1[None, :] * stride_o_d, gq1.to(out_ptr.dtype.element_ty), mask=m)
            tl.store(o_row + ho + d2[None, :] * stride_o_d, gq2.to(out_ptr.dtype.element_ty), mask=m)
            # q⊙g (cos terms) and rot(q)⊙g (sin terms), summed over heads later.
            acc_c += q1 * g1 + q2 * g2
            acc_s += q1 * g2 - q2 * g1
            if BLOCK_PASS > 0:  # partial rotary: the dims 2·HALF ≤ d < 2·HALF + PASS pass through
                p = 2 * HALF + tl.arange(0, BLOCK_PASS)
                mp = (h < H)[:, None] & (tl.arange(0, BLOCK_PASS) < PASS)[None, :]
                gp = tl.load(g_row + hg + p[None, :] * stride_g_d, mask=mp, other=0.0)
                tl.store(o_row + ho + p[None, :] * stride_o_d, gp.to(out_ptr.dtype.element_ty),
                         mask=mp)

        rest = 1.0 - share
        cos_part = tl.sum(tl.sum(acc_c * c2, axis=1), axis=0) * rest
        sin_part = tl.sum(tl.sum(acc_s * s2, axis=1), axis=0) * rest
        pr = posrel_ptr + t * stride_pr_t
        tl.store(pr, tl.load(pr) + cos_part)
        tl.store(pr + stride_pr_c, tl.load(pr + stride_pr_c) + sin_part)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _kernel_is_interpreted() -> bool:
    if not HAS_TRITON:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover
        return False
    return isinstance(_rope_lrp_bwd_kernel, InterpretedFunction)


def triton_available_for(device: torch.device) -> bool:
    """Whether the Triton kernel can run on tensors of ``device``."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return _kernel_is_interpreted()
    return False


def rope_lrp_backward_triton(
    grad_rotated: torch.Tensor,
    pre_rope: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    input_share: float,
    neox_style: bool = True,
    positional_out: torch.Tensor | None = None,
    attention_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`rope_lrp_backward_reference` (same signature and semantics)."""
    global _precise_trig_failed
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use rope_lrp_backward_reference")
    _check_rope_lrp_args(grad_rotated, pre_rope, positions, inv_freq, input_share, positional_out,
                         attention_factor)
    T, H, D = grad_rotated.shape
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} exceeds the kernel maximum {MAX_HEAD_DIM}")
    for name, t in (("grad_rotated", grad_rotated), ("pre_rope", pre_rope)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} not supported (float32, bfloat16, float16)")
    dev = grad_rotated.device
    if not triton_available_for(dev):
        if dev.type == "cpu":
            raise ValueError(
                "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing "
                "vllm_pelrp.kernels (or use rope_lrp_backward_reference)"
            )
        raise ValueError(f"unsupported device {dev} for the Triton kernel")

    grad = torch.empty((T, H, D), dtype=grad_rotated.dtype, device=dev)
    if positional_out is None:
        positional_out = torch.zeros((T, 2), dtype=torch.float32, device=dev)
    if T == 0 or H == 0 or D == 0:
        return grad, positional_out

    inv_freq = inv_freq.contiguous()
    half = inv_freq.shape[0]  # R/2: the rotary dim R may be smaller than D
    pass_dims = D - 2 * half
    block_half = _next_pow2(half)
    block_pass = _next_pow2(pass_dims) if pass_dims else 0
    block_h = max(1, min(_next_pow2(H), 2048 // block_half))
    interpreted = _kernel_is_interpreted()
    precise = (
        _HAS_LIBDEVICE
        and not _precise_trig_failed
        and not interpreted
        and dev.type == "cuda"
        and not settings.get(FAST_TRIG_ENV)
    )
    num_warps = 4 if block_h * block_half <= 2048 else 8
    kwargs = {} if interpreted else {"num_warps": num_warps}
    args = (
        grad_rotated,
        pre_rope,
        positions,
        inv_freq,
        grad,
        positional_out,
        H,
        half,
        pass_dims,
        grad_rotated.stride(0),
        grad_rotated.stride(1),
        grad_rotated.stride(2),
        pre_rope.stride(0),
        pre_rope.stride(1),
        pre_rope.stride(2),
        grad.stride(0),
        grad.stride(1),
        grad.stride(2),
        positions.stride(0),
        positional_out.stride(0),
        positional_out.stride(1),
        float(input_share),
        float(attention_factor),
    )
    meta = dict(NEOX=bool(neox_style), BLOCK_H=block_h, BLOCK_HALF=block_half,
                BLOCK_PASS=block_pass, **kwargs)
    if precise:
        try:
            _rope_lrp_bwd_kernel[(T,)](*args, PRECISE_TRIG=True, **meta)
            return grad, positional_out
        except Exception as exc:  # libdevice unavailable for this backend: fall back once
            _precise_trig_failed = True
            warnings.warn(
                f"rope_lrp: libdevice cos/sin failed ({type(exc).__name__}: {exc}); "
                "using tl.cos/tl.sin",
                RuntimeWarning,
                stacklevel=2,
            )
    _rope_lrp_bwd_kernel[(T,)](*args, PRECISE_TRIG=False, **meta)
    return grad, positional_out


def _use_triton(device: torch.device, backend: str) -> bool:
    if backend == "triton":
        return True
    if backend == "reference":
        return False
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return settings.get(FORCE_TRITON_ENV) and _kernel_is_interpreted()
    return False


def rope_lrp_backward(
    grad_rotated: torch.Tensor,
    pre_rope: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    input_share: float,
    neox_style: bool = True,
    positional_out: torch.Tensor | None = None,
    backend: str = "auto",
    attention_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the Triton kernel (CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``
    and ``VLLM_PELRP_FORCE_TRITON=1``) or to the PyTorch reference. ``backend`` forces one:
    ``"auto"`` (default), ``"triton"`` or ``"reference"``."""
    fn = (
        rope_lrp_backward_triton
        if _use_triton(grad_rotated.device, backend)
        else rope_lrp_backward_reference
    )
    return fn(
        grad_rotated,
        pre_rope,
        positions,
        inv_freq,
        input_share=input_share,
        neox_style=neox_style,
        positional_out=positional_out,
        attention_factor=attention_factor,
    )


__all__ = [
    "HAS_TRITON",
    "MAX_HEAD_DIM",
    "FORCE_TRITON_ENV",
    "FAST_TRIG_ENV",
    "rope_lrp_backward",
    "rope_lrp_backward_triton",
    "triton_available_for",
]
