"""Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm, no biases) with mixture-of-experts MLPs:
a router over ``num_experts`` gated SiLU experts, ``num_experts_per_tok`` per token, renormalised
when ``norm_topk_prob``. Layers in ``mlp_only_layers``, and those off ``decoder_sparse_step``,
keep a dense gated MLP of ``intermediate_size``."""

from __future__ import annotations

from typing import Any

from ..engine.spec import DecoderSpec, MoESpec, UnsupportedModelError
from .base import LLAMA_HF_LAYER, LLAMA_VLLM_LAYER, QK_NORM, decoder_spec
from .moe_base import ExpertLayout, MoEArchitecture, split_intermediate


def dense_layers(config: Any) -> tuple[int, ...]:
    """The layers with a dense MLP, as Hugging Face's and vLLM's decoder layers choose them."""
    only = set(getattr(config, "mlp_only_layers", None) or ())
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return tuple(i for i in range(config.num_hidden_layers)
                 if i in only or config.num_experts <= 0 or (i + 1) % step != 0)


def spec(config: Any, tensor_parallel_size: int = 1) -> DecoderSpec:
    if getattr(config, "attention_bias", False):
        raise UnsupportedModelError("attention_bias=True is not supported for Qwen3-MoE")
    if getattr(config, "shared_expert_intermediate_size", 0):
        raise UnsupportedModelError("shared experts are not supported for Qwen3-MoE")
    moe = MoESpec(
        num_experts=config.num_experts, top_k=config.num_experts_per_tok,
        intermediate_size=split_intermediate(config.moe_intermediate_size, tensor_parallel_size,
                                             "moe_intermediate_size"),
        renormalize=bool(config.norm_topk_prob), dense_layers=dense_layers(config))
    return decoder_spec(config, tensor_parallel_size, qk_norm=True, moe=moe)


ARCHITECTURE = MoEArchitecture(
    names=("Qwen3MoeForCausalLM",),
    model_types={"qwen3_moe": "Qwen3MoeForCausalLM"},
    spec=spec,
    hf_layer={**LLAMA_HF_LAYER, **QK_NORM},
    vllm_layer={**LLAMA_VLLM_LAYER, **QK_NORM},
    hf_experts=(
        ExpertLayout("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        ExpertLayout("mlp.gate.weight", per_expert=("mlp.experts.{e}.gate_proj.weight",
                                                    "mlp.experts.{e}.up_proj.weight",
                                                    "mlp.experts.{e}.down_proj.weight")),
    ),
    vllm_experts=(
        ExpertLayout("mlp.gate.weight", "mlp.experts.routed_experts.w13_weight",
                     "mlp.experts.routed_experts.w2_weight"),
        ExpertLayout("mlp.gate.weight", "mlp.experts.w13_weight", "mlp.experts.w2_weight"),
    ),
    blocks=("rms_norm", "linear", "gated_mlp[silu]", "moe[softmax top-k, silu experts]",
            "attention[qk_norm]", "rope"),
)
