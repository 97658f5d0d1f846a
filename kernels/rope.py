"""Plain-PyTorch rotary position embedding (RoPE) helpers shared by the LRP kernels.

Conventions (match HF transformers' LLaMA):
- ``inv_freq`` is fp32 of shape ``(D/2,)``; angles are ``position * inv_freq`` computed in fp32.
- neox style (HF ``rotate_half``): ``rot(x) = cat(-x[D/2:], x[:D/2])`` and ``cos = cat(cos(a), cos(a))``.
- GPT-J interleaved style: pairs ``(2i, 2i+1)``: ``rot(x)[2i] = -x[2i+1]``, ``rot(x)[2i+1] = x[2i]``
  and ``cos = repeat_interleave(cos(a), 2)``.
- ``x̃ = x * cos + rot(x) * sin``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")


def _rope_type(scaling: Mapping[str, Any] | None) -> str:
    if not scaling:
        return "default"
    # HF accepts both the new ``rope_type`` key and the legacy ``type`` key.
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """fp32 inverse frequencies ``(head_dim/2,)`` on ``device``, computed exactly as transformers
    does.

    ``scaling`` is the HF ``rope_scaling`` / ``rope_parameters`` dict (or ``None``). Supported
    ``rope_type``: ``default``, ``linear`` (``inv_freq / factor``) and ``llama3``
    (``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``).
    Any other type raises ``ValueError``.
    """
    head_dim = int(head_dim)
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even integer, got {head_dim}")
    rope_type = _rope_type(scaling)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_type {rope_type!r}; supported types: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if scaling is not None and "partial_rotary_factor" in scaling:
        if float(scaling["partial_rotary_factor"]) != 1.0:
            raise ValueError("partial_rotary_factor != 1.0 is not supported")
    dim = head_dim
    # Same expression as transformers' _compute_default_rope_parameters.
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(dtype=torch.float)
                  / dim)
    )
    if rope_type == "default":
        return inv_freq
    assert scaling is not None
    if rope_type == "linear":
        inv_freq /= scaling["factor"]
        return inv_freq

    # llama3: transformers' _compute_llama3_parameters, verbatim arithmetic.
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    inv_freq_llama = torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
    return inv_freq_llama


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """fp32 angles ``(T, D/2) = position * inv_freq``."""
    return positions.to(torch.float32)[:, None] * inv_freq.to(
        device=positions.device, dtype=torch.float32
    )[None, :]


def rope_cos_sin(
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    neox_style: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``(T, D)``, computed in fp32 and then cast to ``dtype``."""
    ang = rope_angles(positions, inv_freq)
    cos, sin = ang.cos(), ang.sin()
    if neox_style:
        cos = torch.cat((cos, cos), dim=-1)
        sin = torch.cat((sin, sin), dim=-1)
    else:
        cos = cos.repeat_interleave(2, dim=-1)
        sin = sin.repeat_interleave(2, dim=-1)
    return cos.to(dtype), sin.to(dtype)


def rotate(x: torch.Tensor, neox_style: bool = True) -> torch.Tensor:
    """The RoPE rotation partner ``rot(x)`` along the last dim (see module docstring)."""
    if neox_style:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    even = x[..., 0::2]
    odd = x[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def rotate_transpose(x: torch.Tensor, neox_style: bool = True) -> torch.Tensor:
    """``rotᵀ(x)``; the rotation matrix is skew-symmetric, so this is ``-rot(x)``."""
    return -rotate(x, neox_style)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox_style: bool = True
) -> torch.Tensor:
    """``x̃ = x * cos + rot(x) * sin`` for ``x`` of shape ``(T, H, D)`` and ``cos``/``sin`` ``(T, D)``."""
    return x * cos.unsqueeze(-2) + rotate(x, neox_style) * sin.unsqueeze(-2)


__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "rope_inv_freq",
    "rope_angles",
    "rope_cos_sin",
    "rotate",
    "rotate_transpose",
    "apply_rope",
]
