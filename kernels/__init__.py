"""Kernels for PA-LRP: RoPE helpers, the RoPE-LRP backward (Triton kernel and reference) and
the attention-LRP backward (fused through PyTorch's flash attention, sliding windows in tiles of
queries, and its explicit-blocks reference)."""

from .attention_lrp import attention_forward_for_lrp, attention_lrp_backward
from .attention_lrp_reference import attention_lrp_backward_reference
from .rope import (
    SUPPORTED_ROPE_TYPES,
    apply_rope,
    longrope_uses_long_factors,
    rope_angles,
    rope_attention_factor,
    rope_cos_sin,
    rope_inv_freq,
    rope_rotary_dim,
    rotate,
    rotate_transpose,
)
from .rope_lrp import (
    HAS_TRITON,
    MAX_HEAD_DIM,
    rope_lrp_backward,
    rope_lrp_backward_triton,
    triton_available_for,
)
from .rope_lrp_reference import rope_lrp_backward_reference

__all__ = [
    "attention_forward_for_lrp",
    "attention_lrp_backward",
    "attention_lrp_backward_reference",
    "SUPPORTED_ROPE_TYPES",
    "apply_rope",
    "longrope_uses_long_factors",
    "rope_angles",
    "rope_attention_factor",
    "rope_cos_sin",
    "rope_inv_freq",
    "rope_rotary_dim",
    "rotate",
    "rotate_transpose",
    "HAS_TRITON",
    "MAX_HEAD_DIM",
    "rope_lrp_backward",
    "rope_lrp_backward_triton",
    "rope_lrp_backward_reference",
    "triton_available_for",
]
