"""LLaMA and Mistral (Llama 2, Llama 3/3.1/3.2 with llama3 rope scaling, TinyLlama, SmolLM2):
RMSNorm, bias-free linear layers, SiLU-gated MLP, GQA attention with RoPE; Mistral's sliding
window on every layer."""

from __future__ import annotations

from typing import Any

from ..engine.spec import DecoderSpec, UnsupportedModelError
from .base import LLAMA_HF_LAYER, LLAMA_VLLM_LAYER, Architecture, decoder_spec


def spec(config: Any, tensor_parallel_size: int = 1) -> DecoderSpec:
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise UnsupportedModelError(f"{flag}=True is not supported (LLaMA layers have no biases)")
    return decoder_spec(config, tensor_parallel_size)


ARCHITECTURE = Architecture(
    names=("LlamaForCausalLM", "MistralForCausalLM"),
    model_types={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"},
    spec=spec,
    hf_layer=LLAMA_HF_LAYER,
    vllm_layer=LLAMA_VLLM_LAYER,
    blocks=("rms_norm", "linear", "gated_mlp[silu]", "attention", "rope[default|llama3|linear]"),
)
