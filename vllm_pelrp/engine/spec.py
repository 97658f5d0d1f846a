"""Model description the engine runs on: plain weight tensors, no framework objects.

Adapters (``vllm_pelrp.adapters``) build it from a Hugging Face ``LlamaForCausalLM`` or from
vLLM's fused weight layout. The tensors are views of the source weights: nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class UnsupportedModelError(ValueError):
    """The checkpoint is not a LLaMA-family decoder the engine implements."""


@dataclass(frozen=True)
class LlamaSpec:
    """Shapes and constants of a LLaMA-family decoder (per tensor-parallel rank for heads)."""

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

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class LayerWeights:
    """One decoder layer; projection weights are (out_features, in_features) as in nn.Linear."""

    input_norm: Tensor
    q_proj: Tensor
    k_proj: Tensor
    v_proj: Tensor
    o_proj: Tensor
    post_attention_norm: Tensor
    gate_proj: Tensor
    up_proj: Tensor
    down_proj: Tensor


@dataclass
class ModelWeights:
    """Everything the relevance backward needs.

    ``all_reduce`` sums a tensor across tensor-parallel ranks (identity on one rank). With
    sharded weights (column-parallel q/k/v/gate/up, row-parallel o/down), each rank owns a
    slice of heads and of the MLP; the engine calls ``all_reduce`` where a rank's partial
    gradient of the (replicated) residual stream must be summed, and on positional relevance.
    """

    spec: LlamaSpec
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
