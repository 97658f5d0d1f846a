"""Plain-PyTorch reference for the PA-LRP backward through RoPE (gradient×input form).

The rotary dim ``R = 2·len(inv_freq)`` may be smaller than the head dim ``D`` (partial rotary,
Phi-3): the first ``R`` dims of each head follow the RoPE rule, with cos/sin scaled by the
attention factor (LongRoPE, YaRN: the scaled cos/sin are the positional inputs); the other
``D − R`` dims pass through, and their relevance goes entirely to the input (gradient identity).
"""

from __future__ import annotations

import math

import torch

from .rope import rope_angles, rotate, rotate_transpose


def _check_rope_lrp_args(
    grad_rotated: torch.Tensor,
    pre_rope: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    input_share: float,
    positional_out: torch.Tensor | None,
    attention_factor: float = 1.0,
) -> None:
    if grad_rotated.dim() != 3:
        raise ValueError(f"grad_rotated must be (T, H, D), got shape {tuple(grad_rotated.shape)}")
    if pre_rope.shape != grad_rotated.shape:
        raise ValueError(
            f"pre_rope shape {tuple(pre_rope.shape)} != grad_rotated shape {tuple(grad_rotated.shape)}"
        )
    T, _, D = grad_rotated.shape
    if D % 2:
        raise ValueError(f"head dim D must be even, got {D}")
    for name, t in (("grad_rotated", grad_rotated), ("pre_rope", pre_rope)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if positions.dim() != 1 or positions.shape[0] != T:
        raise ValueError(f"positions must be (T,) = ({T},), got shape {tuple(positions.shape)}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise ValueError(f"positions must be an integer tensor, got {positions.dtype}")
    if inv_freq.dim() != 1 or not 0 < inv_freq.shape[0] <= D // 2:
        raise ValueError(f"inv_freq must be (R/2,) with R/2 in 1..D/2 = {D // 2}, got shape "
                         f"{tuple(inv_freq.shape)}")
    if inv_freq.dtype != torch.float32:
        raise ValueError(f"inv_freq must be float32, got {inv_freq.dtype}")
    if not 0.0 <= float(input_share) <= 1.0:
        raise ValueError(f"input_share must be in [0, 1], got {input_share}")
    if not math.isfinite(float(attention_factor)) or float(attention_factor) <= 0.0:
        raise ValueError(f"attention_factor must be a positive number, got {attention_factor}")
    dev = grad_rotated.device
    for name, t in (("pre_rope", pre_rope), ("positions", positions), ("inv_freq", inv_freq)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, grad_rotated on {dev}")
    if positional_out is not None:
        if positional_out.shape != (T, 2):
            raise ValueError(
                f"positional_out must be (T, 2) = ({T}, 2), got shape {tuple(positional_out.shape)}"
            )
        if positional_out.dtype != torch.float32:
            raise ValueError(f"positional_out must be float32, got {positional_out.dtype}")
        if positional_out.device != dev:
            raise ValueError(f"positional_out is on {positional_out.device}, grad_rotated on {dev}")


def rope_lrp_backward_reference(
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
    """grad_pre_rope = [s·Rᵀ(g_rot), g_pass]; positional[t] = (1−s)·[Σ_{h,d<R} q⊙cos⊙g, Σ_{h,d<R} rot(q)⊙sin⊙g].

    ``g = grad_rotated`` (T, H, D), ``q = pre_rope`` (T, H, D), ``s = input_share`` (0.5 pa-lrp,
    1.0 attnlrp); cos/sin (T, R) are ``attention_factor · cos/sin(positions * inv_freq)`` in
    fp32, ``R = 2·len(inv_freq) ≤ D``; dims ``d ≥ R`` pass ``g`` through. Math is fp32; the
    returned gradient has ``grad_rotated.dtype`` and positional is (T, 2) fp32
    ``[cos_part, sin_part]``, added into ``positional_out`` (and returned) when given. Inputs may
    be non-contiguous views.
    """
    _check_rope_lrp_args(grad_rotated, pre_rope, positions, inv_freq, input_share, positional_out,
                         attention_factor)
    s = float(input_share)
    rotary_dim = 2 * inv_freq.shape[0]
    g_all = grad_rotated.to(torch.float32)
    g = g_all[..., :rotary_dim]
    q = pre_rope.to(torch.float32)[..., :rotary_dim]
    ang = rope_angles(positions, inv_freq)  # (T, R/2) fp32
    c_half, s_half = ang.cos(), ang.sin()
    if attention_factor != 1.0:
        c_half, s_half = c_half * attention_factor, s_half * attention_factor
    if neox_style:
        cos = torch.cat((c_half, c_half), dim=-1)
        sin = torch.cat((s_half, s_half), dim=-1)
    else:
        cos = c_half.repeat_interleave(2, dim=-1)
        sin = s_half.repeat_interleave(2, dim=-1)
    cos = cos.unsqueeze(1)  # (T, 1, R)
    sin = sin.unsqueeze(1)

    grad = g * cos + rotate_transpose(g * sin, neox_style)
    if s != 1.0:
        grad = grad * s
    if rotary_dim < g_all.shape[-1]:  # the pass-through dims: identity
        grad = torch.cat((grad, g_all[..., rotary_dim:]), dim=-1)
    grad = grad.to(grad_rotated.dtype)

    cos_part = (q * cos * g).sum(dim=(1, 2))
    sin_part = (rotate(q, neox_style) * sin * g).sum(dim=(1, 2))
    positional = torch.stack((cos_part, sin_part), dim=-1) * (1.0 - s)
    if positional_out is not None:
        positional_out.add_(positional)
        return grad, positional_out
    return grad, positional


__all__ = ["rope_lrp_backward_reference"]
