"""Mixtral: LLaMA's attention (an optional sliding window) with a mixture-of-experts MLP in every
layer: a router over ``num_local_experts`` gated SiLU experts, ``num_experts_per_tok`` per token,
their weights always renormalised over the chosen ones. transformers 5 names the block ``mlp``
(fused experts); the hub's checkpoints, transformers 4 and vLLM name it ``block_sparse_moe``
(experts' w1 gate, w3 up, w2 down)."""

from __future__ import annotations

from typing import Any

from ..engine.spec import DecoderSpec, MoESpec
from .base import LLAMA_HF_LAYER, LLAMA_VLLM_LAYER, decoder_spec
from .moe_base import ExpertLayout, MoEArchitecture, split_intermediate


def spec(config: Any, tensor_parallel_size: int = 1) -> DecoderSpec:
    moe = MoESpec(
        num_experts=config.num_local_experts, top_k=config.num_experts_per_tok,
        intermediate_size=split_intermediate(config.intermediate_size, tensor_parallel_size,
                                             "intermediate_size"),
        renormalize=True)
    return decoder_spec(config, tensor_parallel_size, moe=moe)


ARCHITECTURE = MoEArchitecture(
    names=("MixtralForCausalLM",),
    model_types={"mixtral": "MixtralForCausalLM"},
    spec=spec,
    hf_layer=LLAMA_HF_LAYER,
    vllm_layer=LLAMA_VLLM_LAYER,
    hf_experts=(
        ExpertLayout("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        ExpertLayout("block_sparse_moe.gate.weight",
                     per_expert=("block_sparse_moe.experts.{e}.w1.weight",
                                 "block_sparse_moe.experts.{e}.w3.weight",
                                 "block_sparse_moe.experts.{e}.w2.weight")),
    ),
    vllm_experts=(
        ExpertLayout("block_sparse_moe.gate.weight",
                     "block_sparse_moe.experts.routed_experts.w13_weight",
                     "block_sparse_moe.experts.routed_experts.w2_weight"),
        ExpertLayout("block_sparse_moe.gate.weight", "block_sparse_moe.experts.w13_weight",
                     "block_sparse_moe.experts.w2_weight"),
    ),
    blocks=("rms_norm", "linear", "moe[softmax top-k renormalised, silu experts]", "attention",
            "rope"),
)
