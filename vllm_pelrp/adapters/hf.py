"""Adapter: Hugging Face ``LlamaForCausalLM`` (and its config) → engine ``ModelWeights``."""

from __future__ import annotations

from typing import Any

from ..engine.spec import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_ROPE_TYPES,
    LayerWeights,
    LlamaSpec,
    ModelWeights,
    UnsupportedModelError,
)


def rope_settings(config: Any) -> tuple[float, dict | None]:
    """(theta, scaling) from a transformers 5 ``rope_parameters`` or a 4.x ``rope_theta/rope_scaling``."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(getattr(config, "rope_theta", 10000.0))
        scaling = dict(getattr(config, "rope_scaling", None) or {})
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **scaling}


def check_architecture(config: Any) -> None:
    """Raise ``UnsupportedModelError`` naming the supported architectures for anything else."""
    architectures = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    if architectures:
        unsupported = [a for a in architectures if a not in SUPPORTED_ARCHITECTURES]
        if not unsupported:
            return
        name = ", ".join(unsupported)
    elif model_type in ("llama", "mistral"):
        return
    else:
        name = f"model_type {model_type!r}"
    raise UnsupportedModelError(
        f"architecture {name} is not supported by the PA-LRP engine; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (the LLaMA family: Llama 2, "
        "Llama 3/3.1/3.2, TinyLlama, SmolLM, Mistral)"
    )


def spec_from_config(config: Any, tensor_parallel_size: int = 1) -> LlamaSpec:
    """Engine spec from a HF LLaMA/Mistral config; head counts are per tensor-parallel rank."""
    check_architecture(config)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {config.hidden_act!r}: only 'silu' is supported")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise UnsupportedModelError(f"{flag}=True is not supported (LLaMA layers have no biases)")
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    if num_heads % tensor_parallel_size or num_kv_heads % tensor_parallel_size:
        raise UnsupportedModelError(
            f"{num_heads} heads / {num_kv_heads} kv heads do not split over {tensor_parallel_size} ranks"
        )
    theta, scaling = rope_settings(config)
    return LlamaSpec(
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=num_heads // tensor_parallel_size,
        num_kv_heads=num_kv_heads // tensor_parallel_size,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size // tensor_parallel_size,
        vocab_size=config.vocab_size,
        rms_norm_eps=float(config.rms_norm_eps),
        rope_theta=theta,
        rope_scaling=scaling,
        neox_style=True,
        sliding_window=getattr(config, "sliding_window", None),
    )


def weights_from_hf(model: Any) -> ModelWeights:
    """Views of a HF ``LlamaForCausalLM``'s parameters (no copies)."""
    spec = spec_from_config(model.config)
    decoder = model.model
    layers = [
        LayerWeights(
            input_norm=block.input_layernorm.weight.detach(),
            q_proj=block.self_attn.q_proj.weight.detach(),
            k_proj=block.self_attn.k_proj.weight.detach(),
            v_proj=block.self_attn.v_proj.weight.detach(),
            o_proj=block.self_attn.o_proj.weight.detach(),
            post_attention_norm=block.post_attention_layernorm.weight.detach(),
            gate_proj=block.mlp.gate_proj.weight.detach(),
            up_proj=block.mlp.up_proj.weight.detach(),
            down_proj=block.mlp.down_proj.weight.detach(),
        )
        for block in decoder.layers
    ]
    return ModelWeights(
        spec=spec,
        embed_tokens=decoder.embed_tokens.weight.detach(),
        layers=layers,
        final_norm=decoder.norm.weight.detach(),
        lm_head=model.lm_head.weight.detach(),
    )
