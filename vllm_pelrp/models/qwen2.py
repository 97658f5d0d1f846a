"""Qwen2 / Qwen2.5: the LLaMA layout plus biases on the q, k and v projections (ε-rule: each
bias keeps its share of the relevance, booked in ``conservation``); sliding window only on the
layers its ``layer_types`` mark."""

from __future__ import annotations

from typing import Any

from ..engine.spec import DecoderSpec
from .base import (
    LLAMA_HF_LAYER,
    LLAMA_VLLM_LAYER,
    QKV_BIAS_HF,
    QKV_BIAS_VLLM,
    Architecture,
    decoder_spec,
)


def spec(config: Any, tensor_parallel_size: int = 1) -> DecoderSpec:
    return decoder_spec(config, tensor_parallel_size, qkv_bias=True)


ARCHITECTURE = Architecture(
    names=("Qwen2ForCausalLM",),
    model_types={"qwen2": "Qwen2ForCausalLM"},
    spec=spec,
    hf_layer={**LLAMA_HF_LAYER, **QKV_BIAS_HF},
    vllm_layer={**LLAMA_VLLM_LAYER, **QKV_BIAS_VLLM},
    blocks=("rms_norm", "linear+bias", "gated_mlp[silu]", "attention", "rope"),
)
