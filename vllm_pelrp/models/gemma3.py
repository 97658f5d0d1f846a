"""Gemma 3 (text): RMSNorm scaling by 1 + γ (in fp32), norms before and after attention and MLP
(sandwich), GELU-tanh gated MLP, embeddings times √hidden, per-head q/k norms, attention scaled
by ``query_pre_attn_scalar``^-½, and local (sliding-window) layers with their own RoPE θ beside
global ones."""

from __future__ import annotations

from typing import Any

from ..engine.spec import SLIDING_ATTENTION, DecoderSpec
from .base import LLAMA_HF_LAYER, LLAMA_VLLM_LAYER, QK_NORM, Architecture, decoder_spec, rope_settings

# Gemma names its norms by position: post_attention_layernorm is the attention output's norm
SANDWICH = {
    "attention_output_norm": "post_attention_layernorm.weight",
    "mlp_norm": "pre_feedforward_layernorm.weight",
    "mlp_output_norm": "post_feedforward_layernorm.weight",
}


def local_rope(config: Any):
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and SLIDING_ATTENTION in params:  # transformers 5
        return rope_settings(params[SLIDING_ATTENTION])
    return rope_settings({"rope_theta": getattr(config, "rope_local_base_freq", 10000.0)})


def spec(config: Any, tensor_parallel_size: int = 1) -> DecoderSpec:
    return decoder_spec(
        config, tensor_parallel_size, activation_field="hidden_activation",
        local_rope=local_rope(config), norm_offset=1.0, norm_scale_in_float=True, qk_norm=True,
        sandwich_norms=True, embed_scale=config.hidden_size**0.5,
        query_scale=config.query_pre_attn_scalar**-0.5,
    )


ARCHITECTURE = Architecture(
    names=("Gemma3ForCausalLM",),
    model_types={"gemma3_text": "Gemma3ForCausalLM"},
    spec=spec,
    hf_layer={**LLAMA_HF_LAYER, **QK_NORM, **SANDWICH},
    vllm_layer={**LLAMA_VLLM_LAYER, **QK_NORM, **SANDWICH},
    blocks=("rms_norm[1+γ]", "linear", "gated_mlp[gelu_tanh]", "attention[qk_norm, "
            "query_scale, sliding_window]", "rope[local/global θ]", "embed_scale"),
)
