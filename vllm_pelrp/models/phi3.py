"""Phi-3 and Phi-4-mini: the LLaMA layer with q/k/v and gate/up fused in the hub's checkpoints as
in vLLM's (``qkv_proj``, ``gate_up_proj``, split into row views), partial rotary
(``partial_rotary_factor``: only the first part of each head rotates, Phi-4-mini 3/4 of it) and
default or LongRoPE tables (short or long factors by length, cos/sin scaled)."""

from __future__ import annotations

from typing import Any

from ..engine.spec import DecoderSpec, UnsupportedModelError
from .base import LLAMA_VLLM_LAYER, Architecture, decoder_spec


def spec(config: Any, tensor_parallel_size: int = 1) -> DecoderSpec:
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise UnsupportedModelError(f"{flag}=True is not supported (Phi-3 layers have no biases)")
    return decoder_spec(config, tensor_parallel_size)


ARCHITECTURE = Architecture(
    names=("Phi3ForCausalLM",),
    model_types={"phi3": "Phi3ForCausalLM"},
    spec=spec,
    hf_layer=LLAMA_VLLM_LAYER,  # the hub's names are vLLM's: fused qkv_proj and gate_up_proj
    vllm_layer=LLAMA_VLLM_LAYER,
    blocks=("rms_norm", "linear", "gated_mlp[silu]", "attention",
            "rope[partial; default|longrope]"),
)
