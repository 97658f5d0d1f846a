"""GPT-2 (``GPT2LMHeadModel``): a pre-LN causal decoder with additive word + learned position
embeddings (``wte`` + ``wpe``), linear layers (HF's Conv1D, weights stored (in, out)) and
LayerNorms with biases, a GELU-tanh (``gelu_new``) MLP, ``ln_f`` and an LM head tied to ``wte``.

Hugging Face packs q/k/v into ``attn.c_attn`` (Conv1D: (hidden, 3·hidden)); vLLM keeps the same
names with the weights transposed to (out, in) at load (``c_attn``: q, k, v rows).
"""

from __future__ import annotations

from typing import Any

from ..engine.additive import AdditiveSpec
from ..engine.spec import UnsupportedModelError
from .additive_base import AdditiveArchitecture, AdditiveNames, activation_of, split_heads

GPT2_TOP = {
    "word_embeddings": "transformer.wte.weight",
    "position_embeddings": "transformer.wpe.weight",
    "final_norm": "transformer.ln_f.weight",
    "final_norm_bias": "transformer.ln_f.bias",
    "lm_head": "lm_head.weight",
}
GPT2_LAYER = {
    "attention_norm": "ln_1.weight",
    "attention_norm_bias": "ln_1.bias",
    ("q_proj", "k_proj", "v_proj"): "attn.c_attn.weight",
    ("q_bias", "k_bias", "v_bias"): "attn.c_attn.bias",
    "o_proj": "attn.c_proj.weight",
    "o_bias": "attn.c_proj.bias",
    "mlp_norm": "ln_2.weight",
    "mlp_norm_bias": "ln_2.bias",
    "up_proj": "mlp.c_fc.weight",
    "up_bias": "mlp.c_fc.bias",
    "down_proj": "mlp.c_proj.weight",
    "down_bias": "mlp.c_proj.bias",
}
_TIED = {"lm_head": "word_embeddings"}
GPT2_HF = AdditiveNames(top=GPT2_TOP, layer=GPT2_LAYER, layers="transformer.h.{i}.",
                        transposed=True, tied=_TIED)
GPT2_VLLM = AdditiveNames(top=GPT2_TOP, layer=GPT2_LAYER, layers="transformer.h.{i}.",
                          tied=_TIED)


def spec(config: Any, tensor_parallel_size: int = 1) -> AdditiveSpec:
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError("add_cross_attention=True is not supported")
    hidden = config.n_embd
    inner = config.n_inner if getattr(config, "n_inner", None) else 4 * hidden
    heads, intermediate = split_heads(tensor_parallel_size, config.n_head, inner)
    head_dim = hidden // config.n_head
    return AdditiveSpec(
        hidden_size=hidden,
        num_layers=config.n_layer,
        num_heads=heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=config.vocab_size,
        max_positions=config.n_positions,
        layer_norm_eps=float(config.layer_norm_epsilon),
        causal=True,
        norm_placement="pre",
        activation=activation_of(config, "activation_function"),
        attention_scale=head_dim ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0,
        scale_by_inverse_layer=bool(getattr(config, "scale_attn_by_inverse_layer_idx", False)),
    )


ARCHITECTURE = AdditiveArchitecture(
    names=("GPT2LMHeadModel",), spec=spec, hf=GPT2_HF, vllm=GPT2_VLLM,
    model_types={"gpt2": "GPT2LMHeadModel"},
    blocks=("additive_embedding[word+learned position]", "layer_norm+bias", "linear+bias",
            "attention[causal]", "mlp[gelu_tanh]", "lm_head[tied]"))
