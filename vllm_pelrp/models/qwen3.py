"""Qwen3 (dense): the LLaMA layout plus a per-head RMSNorm on q and k before RoPE (identity
rule); no biases."""

from __future__ import annotations

from typing import Any

from ..engine.spec import DecoderSpec, UnsupportedModelError
from .base import LLAMA_HF_LAYER, LLAMA_VLLM_LAYER, QK_NORM, Architecture, decoder_spec


def spec(config: Any, tensor_parallel_size: int = 1) -> DecoderSpec:
    if getattr(config, "attention_bias", False):
        raise UnsupportedModelError("attention_bias=True is not supported for Qwen3")
    return decoder_spec(config, tensor_parallel_size, qk_norm=True)


ARCHITECTURE = Architecture(
    names=("Qwen3ForCausalLM",),
    model_types={"qwen3": "Qwen3ForCausalLM"},
    spec=spec,
    hf_layer={**LLAMA_HF_LAYER, **QK_NORM},
    vllm_layer={**LLAMA_VLLM_LAYER, **QK_NORM},
    blocks=("rms_norm", "linear", "gated_mlp[silu]", "attention[qk_norm]", "rope"),
)
