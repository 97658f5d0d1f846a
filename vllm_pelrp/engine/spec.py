"""Model description the engine runs on: plain weight tensors, no framework objects.

One ``DecoderSpec`` describes every pre-norm rotary decoder the engine implements: RMSNorm (γ or
Gemma's 1 + γ), linear layers with or without bias, a gated MLP (SiLU or GELU-tanh) or a mixture
of experts, attention with optional per-head q/k RMSNorm, a query scale other than 1/√d and
sliding-window layers, and RoPE (default, llama3, linear, LongRoPE, YaRN; a different θ on local
and global layers; on all of each head or only its first ``rotary_dim`` dims). The files of
``vllm_pelrp.models`` (one per architecture) build it from a Hugging Face config and name the
weights; the tensors are views of the source weights, nothing is copied. One builder reads it,
``backward.rotary_model``, which picks the blocks (``blocks.py``, ``attention.py``,
``layer.py``); the layers themselves do not branch on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "longrope", "yarn")
ACTIVATIONS = ("silu", "gelu_tanh")
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"


class UnsupportedModelError(ValueError):
    """The checkpoint is not an architecture (or a variant of one) the engine implements."""


@dataclass(frozen=True)
class RopeSpec:
    """θ and the HF scaling dict (None: default RoPE) of one kind of layer."""

    theta: float
    scaling: dict | None = None


@dataclass(frozen=True)
class MoESpec:
    """A mixture-of-experts MLP (per tensor-parallel rank for the expert size): a router over
    ``num_experts`` gated experts, ``top_k`` of them per token, their routing weights
    renormalised to sum 1 over the chosen ones when ``renormalize`` (Mixtral; Qwen3-MoE's
    ``norm_topk_prob``). ``dense_layers``: layers that keep a dense gated MLP instead."""

    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool
    dense_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class DecoderSpec:
    """Shapes and constants of a rotary pre-norm decoder (per tensor-parallel rank for heads).

    ``layer_types[l]`` is ``"full_attention"`` or ``"sliding_attention"``: a sliding layer sees
    the last ``sliding_window`` keys and uses ``local_rope`` when given (Gemma 3), else ``rope``.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None
    neox_style: bool = True
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # None: every layer sliding iff sliding_window
    local_rope: RopeSpec | None = None
    activation: str = "silu"
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + γ): 1 for Gemma
    norm_scale_in_float: bool = False  # γ applied in fp32 before the cast back (Gemma)
    qkv_bias: bool = False  # q/k/v projections have biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # RMSNorm on the attention and MLP outputs too (Gemma)
    embed_scale: float = 1.0  # token embeddings are multiplied by this (Gemma: √hidden)
    query_scale: float | None = None  # attention scale; None: 1/√head_dim
    # partial rotary (Phi-3's partial_rotary_factor): only the first rotary_dim dims of each head
    # rotate; None: all of them
    rotary_dim: int | None = None
    # the length LongRoPE picks its short or long factors by; None: each input's own (HF)
    rope_table_length: int | None = None
    moe: MoESpec | None = None  # mixture-of-experts MLPs (every layer but ``moe.dense_layers``)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"activation {self.activation!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise UnsupportedModelError(
                f"{len(self.layer_types)} layer_types for {self.num_layers} layers")
        if self.rotary_dim is not None and not (
                0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise UnsupportedModelError(
                f"rotary dim {self.rotary_dim} of a {self.head_dim}-dim head (must be even)")

    @property
    def rotated_dims(self) -> int:
        """Dims of each head that RoPE rotates (the first ones)."""
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def attention_scale(self) -> float:
        return self.query_scale if self.query_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def layer_type(self, index: int) -> str:
        if self.layer_types is not None:
            return self.layer_types[index]
        return SLIDING_ATTENTION if self.sliding_window is not None else FULL_ATTENTION

    def layer_window(self, index: int) -> int | None:
        """Keys a query of layer ``index`` sees (itself included), None: all earlier ones."""
        return self.sliding_window if self.layer_type(index) == SLIDING_ATTENTION else None

    def layer_has_moe(self, index: int) -> bool:
        """Whether layer ``index``'s MLP is a mixture of experts (else a dense gated MLP)."""
        return self.moe is not None and index not in self.moe.dense_layers

    def layer_rope(self, index: int) -> RopeSpec:
        if self.local_rope is not None and self.layer_type(index) == SLIDING_ATTENTION:
            return self.local_rope
        return RopeSpec(self.rope_theta, self.rope_scaling)


@dataclass
class ExpertWeights:
    """One expert of a mixture of experts: a gated MLP, (out_features, in_features) each."""

    gate_proj: Tensor
    up_proj: Tensor
    down_proj: Tensor


@dataclass
class MoEWeights:
    """A mixture-of-experts MLP: the router (num_experts, hidden) and the experts (views of
    the source's per-expert or fused tensors)."""

    router: Tensor
    experts: list[ExpertWeights]


@dataclass
class LayerWeights:
    """One decoder layer; projection weights are (out_features, in_features) as in nn.Linear.

    Optional parts are None where the architecture has none: q/k/v biases (Qwen2), per-head q/k
    norms (Qwen3, Gemma 3), the attention- and MLP-output norms (Gemma's sandwich norms). A
    mixture-of-experts layer has ``moe`` and no dense gate/up/down projections.
    """

    attention_norm: Tensor
    q_proj: Tensor
    k_proj: Tensor
    v_proj: Tensor
    o_proj: Tensor
    mlp_norm: Tensor
    gate_proj: Tensor | None = None
    up_proj: Tensor | None = None
    down_proj: Tensor | None = None
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    v_bias: Tensor | None = None
    q_norm: Tensor | None = None
    k_norm: Tensor | None = None
    attention_output_norm: Tensor | None = None
    mlp_output_norm: Tensor | None = None
    moe: MoEWeights | None = None


@dataclass
class ModelWeights:
    """Everything the relevance backward needs.

    ``all_reduce`` sums a tensor across tensor-parallel ranks (identity on one rank). With
    sharded weights (column-parallel q/k/v/gate/up, row-parallel o/down), each rank owns a
    slice of heads and of the MLP; the engine calls ``all_reduce`` where a rank's partial
    gradient of the (replicated) residual stream must be summed, and on positional relevance.
    """

    spec: DecoderSpec
    embed_tokens: Tensor
    layers: list[LayerWeights]
    final_norm: Tensor
    lm_head: Tensor
    all_reduce: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def reduce(self, tensor: Tensor) -> Tensor:
        return self.all_reduce(tensor) if self.all_reduce is not None else tensor
