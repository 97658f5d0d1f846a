"""Plain-PyTorch rotary position embedding (RoPE) helpers shared by the LRP kernels.

Conventions (match HF transformers' LLaMA and Phi-3):
- ``inv_freq`` is fp32 of shape ``(R/2,)`` for a rotary dim ``R ≤ D`` (the head dim); angles are
  ``position * inv_freq`` computed in fp32.
- Partial rotary (``R < D``, Phi-3's ``partial_rotary_factor``): only the first ``R`` dims of each
  head rotate, the other ``D − R`` pass through unchanged (HF: ``q_rot, q_pass = q[..., :R],
  q[..., R:]``). Everything below is about the rotated part.
- neox style (HF ``rotate_half``): ``rot(x) = cat(-x[R/2:], x[:R/2])`` and ``cos = cat(cos(a), cos(a))``.
- GPT-J interleaved style: pairs ``(2i, 2i+1)``: ``rot(x)[2i] = -x[2i+1]``, ``rot(x)[2i+1] = x[2i]``
  and ``cos = repeat_interleave(cos(a), 2)``.
- ``x̃ = x * cos + rot(x) * sin``, where LongRoPE and YaRN scale cos and sin by an attention
  factor ``m`` (``rope_attention_factor``): ``cos = m·cos(a)``, ``sin = m·sin(a)``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "longrope", "yarn")


def _rope_type(scaling: Mapping[str, Any] | None) -> str:
    if not scaling:
        return "default"
    # HF accepts both the new ``rope_type`` key and the legacy ``type`` key.
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def rope_rotary_dim(head_dim: int, scaling: Mapping[str, Any] | None = None) -> int:
    """Rotated dims of a head: ``int(head_dim · partial_rotary_factor)`` as transformers computes
    it (factor 1 when ``scaling`` has none)."""
    factor = float((scaling or {}).get("partial_rotary_factor", 1.0) or 1.0)
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {factor}")
    return int(int(head_dim) * factor)


def _factor(scaling: Mapping[str, Any]) -> float:
    factor = scaling.get("factor")
    if factor is None:  # HF: max_position_embeddings / original_max_position_embeddings
        raise ValueError(f"{_rope_type(scaling)} rope scaling needs 'factor' (the config reader "
                         "sets it from max_position_embeddings when the config has none)")
    return float(factor)


def longrope_uses_long_factors(scaling: Mapping[str, Any], seq_len: int | None) -> bool:
    """LongRoPE's choice, as transformers' ``longrope_frequency_update``: the long factors when
    the sequence (``max(position) + 1``) is longer than ``original_max_position_embeddings``,
    else the short ones (also for ``seq_len=None``, as at HF's init).

    vLLM (0.32, ``Phi3LongRoPEScaledRotaryEmbedding``) decides once per server instead: long
    factors for every sequence when ``max_model_len > original_max_position_embeddings``, short
    otherwise; and its cos/sin scale is always ``√(1 + ln(s)/ln(original))`` with
    ``s = max_position_embeddings / original`` (or ``short_mscale``/``long_mscale``), ignoring
    the config's ``factor`` and ``attention_factor``, which transformers honours. Pass
    ``seq_len = max_model_len`` to reproduce vLLM's choice.
    """
    return bool(seq_len) and int(seq_len) > int(scaling["original_max_position_embeddings"])


def rope_attention_factor(scaling: Mapping[str, Any] | None) -> float:
    """The factor transformers multiplies cos and sin by (``attention_scaling``): 1 for default,
    linear and llama3; LongRoPE's and YaRN's from ``_compute_longrope_parameters`` /
    ``_compute_yarn_parameters`` (``attention_factor`` when the config sets it)."""
    rope_type = _rope_type(scaling)
    if rope_type not in ("longrope", "yarn"):
        return 1.0
    assert scaling is not None
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _factor(scaling)
    if rope_type == "longrope":
        if factor <= 1.0:
            return 1.0
        original = scaling["original_max_position_embeddings"]
        return math.sqrt(1 + math.log(factor) / math.log(original))

    def get_mscale(scale, mscale=1):
        if scale <= 1:
            return 1.0
        return 0.1 * mscale * math.log(scale) + 1.0

    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
    return get_mscale(factor)


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None, *, rotary_dim: int | None = None,
    seq_len: int | None = None,
) -> torch.Tensor:
    """fp32 inverse frequencies ``(rotary_dim/2,)`` on ``device``, computed exactly as
    transformers does.

    ``scaling`` is the HF ``rope_scaling`` / ``rope_parameters`` dict (or ``None``). Supported
    ``rope_type``: ``default``, ``linear`` (``inv_freq / factor``), ``llama3`` (``factor``,
    ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``),
    ``longrope`` (``short_factor``/``long_factor`` per frequency, picked by ``seq_len``: see
    ``longrope_uses_long_factors``) and ``yarn`` (``factor``, ``original_max_position_embeddings``,
    optional ``beta_fast``/``beta_slow``/``truncate``). Any other type raises ``ValueError``.
    ``rotary_dim`` defaults to ``rope_rotary_dim(head_dim, scaling)`` (the whole head unless the
    dict has a ``partial_rotary_factor``); the cos/sin scale is ``rope_attention_factor``.
    """
    head_dim = int(head_dim)
    rope_type = _rope_type(scaling)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_type {rope_type!r}; supported types: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    dim = rope_rotary_dim(head_dim, scaling) if rotary_dim is None else int(rotary_dim)
    if dim <= 0 or dim % 2 or dim > head_dim:
        raise ValueError(
            f"the rotary dim must be a positive even integer ≤ head_dim {head_dim}, got {dim}")
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
    if rope_type == "longrope":  # transformers' _compute_longrope_parameters
        factors = scaling["long_factor" if longrope_uses_long_factors(scaling, seq_len)
                          else "short_factor"]
        if len(factors) != dim // 2:
            raise ValueError(f"longrope needs {dim // 2} factors (rotary dim {dim}), got {len(factors)}")
        ext_factors = torch.tensor(factors, dtype=torch.float32, device=device)
        inv_freq_shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        return 1.0 / (ext_factors * theta**inv_freq_shape)
    if rope_type == "yarn":
        return _yarn_inv_freq(dim, theta, scaling, device)

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


def _yarn_inv_freq(dim: int, base: float, scaling: Mapping[str, Any],
                   device: torch.device | str | None) -> torch.Tensor:
    """transformers' _compute_yarn_parameters (inverse frequencies), verbatim arithmetic."""
    factor = _factor(scaling)
    original_max_position_embeddings = scaling["original_max_position_embeddings"]
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def find_correction_dim(num_rotations, dim, base, max_position_embeddings):
        return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base))

    def find_correction_range(low_rot, high_rot, dim, base, max_position_embeddings, truncate):
        low = find_correction_dim(low_rot, dim, base, max_position_embeddings)
        high = find_correction_dim(high_rot, dim, base, max_position_embeddings)
        if truncate:
            low = math.floor(low)
            high = math.ceil(high)
        return max(low, 0), min(high, dim - 1)

    def linear_ramp_factor(min, max, dim):
        if min == max:
            max += 0.001  # Prevent singularity
        linear_func = (torch.arange(dim, dtype=torch.float32) - min) / (max - min)
        return torch.clamp(linear_func, 0, 1)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    truncate = scaling.get("truncate", True)
    low, high = find_correction_range(beta_fast, beta_slow, dim, base,
                                      original_max_position_embeddings, truncate)
    inv_freq_extrapolation_factor = 1 - linear_ramp_factor(low, high, dim // 2).to(
        device=device, dtype=torch.float)
    return (inv_freq_interpolation * (1 - inv_freq_extrapolation_factor)
            + inv_freq_extrapolation * inv_freq_extrapolation_factor)


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
    attention_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``(T, R)`` for ``R = 2·len(inv_freq)``, times ``attention_factor``,
    computed in fp32 and then cast to ``dtype`` (as transformers does)."""
    ang = rope_angles(positions, inv_freq)
    cos, sin = ang.cos(), ang.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
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
    """``x̃ = x * cos + rot(x) * sin`` for ``x`` of shape ``(T, H, D)`` and ``cos``/``sin``
    ``(T, R)``: the first ``R`` dims of each head rotate, the rest pass through (``R < D``)."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos.unsqueeze(-2) + rotate(x, neox_style) * sin.unsqueeze(-2)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = x_rot * cos.unsqueeze(-2) + rotate(x_rot, neox_style) * sin.unsqueeze(-2)
    return torch.cat((rotated, x_pass), dim=-1)


__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "rope_rotary_dim",
    "rope_attention_factor",
    "longrope_uses_long_factors",
    "rope_inv_freq",
    "rope_angles",
    "rope_cos_sin",
    "rotate",
    "rotate_transpose",
    "apply_rope",
]
