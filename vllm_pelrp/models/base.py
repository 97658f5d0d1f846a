"""What a model file declares, and the shared code that turns a declaration into engine weights.

A model file (``llama.py``, ``qwen2.py``, …) builds one ``Architecture``:
- ``spec``: its Hugging Face config → the engine's ``DecoderSpec`` (which shared blocks it uses);
- ``hf_layer`` / ``vllm_layer``: per engine field of ``LayerWeights``, the parameter name in a
  decoder layer of the Hugging Face and of the vLLM module; a tuple of fields names one packed
  vLLM tensor (``qkv_proj``: q, k, v rows; ``gate_up_proj``: gate, up rows);
- ``decoder``: where the decoder layers sit in vLLM's module (the recorder hooks their inputs:
  layer 0 gets the (scaled) embeddings, layer l > 0 gets ``hidden_states + residual``).

Shared name tables for the LLaMA-style layout live here; a model file adds what it has more.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

from torch import Tensor

from ..engine.spec import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    SUPPORTED_ROPE_TYPES,
    DecoderSpec,
    LayerWeights,
    ModelWeights,
    MoEWeights,
    RopeSpec,
    UnsupportedModelError,
)

Names = Mapping[str | tuple[str, ...], str]

# LLaMA's decoder layer, by engine field (HF and vLLM share every name but the packed ones).
LLAMA_HF_LAYER: dict[str | tuple[str, ...], str] = {
    "attention_norm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
LLAMA_VLLM_LAYER: dict[str | tuple[str, ...], str] = {
    "attention_norm": "input_layernorm.weight",
    ("q_proj", "k_proj", "v_proj"): "self_attn.qkv_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    ("gate_proj", "up_proj"): "mlp.gate_up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
# the dense MLP's fields: a mixture-of-experts layer has none (``weights_from_state``'s ``experts``)
DENSE_MLP = ("gate_proj", "up_proj", "down_proj")
# q/k/v biases (Qwen2)
QKV_BIAS_HF = {"q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
               "v_bias": "self_attn.v_proj.bias"}
QKV_BIAS_VLLM = {("q_bias", "k_bias", "v_bias"): "self_attn.qkv_proj.bias"}
# per-head q/k RMSNorm (Qwen3, Gemma 3): the same names in HF and vLLM
QK_NORM = {"q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}


@dataclass(frozen=True)
class Architecture:
    """One architecture's declaration (see the module docstring)."""

    kind: ClassVar[str] = "decoder"  # additive-position models: ``additive_base``
    names: tuple[str, ...]  # Hugging Face ``architectures`` names
    spec: Callable[[Any, int], DecoderSpec]  # (config, tensor_parallel_size) → spec
    hf_layer: Names
    vllm_layer: Names
    decoder: str = "model"  # vLLM: ``<decoder>.layers``, ``<decoder>.embed_tokens``, ``<decoder>.norm``
    blocks: tuple[str, ...] = field(default=())  # the shared blocks it uses, for the docs
    # configs that name no architectures: their ``model_type`` → one of ``names``
    model_types: Mapping[str, str] = field(default_factory=dict)

    def weights_from_hf(self, model: Any) -> ModelWeights:
        """Views of a Hugging Face model's parameters (no copies)."""
        state = {name: p.detach() for name, p in model.named_parameters()}
        spec = self.spec(model.config, 1)
        return weights_from_state(state, spec, self.hf_layer, prefix="model.")

    def weights_from_vllm(self, state: Mapping[str, Tensor], spec: DecoderSpec,
                          all_reduce: Callable[[Tensor], Tensor] | None = None) -> ModelWeights:
        """From vLLM's parameters by name (this rank's shards; the vocabulary gathered)."""
        return weights_from_state(state, spec, self.vllm_layer, prefix=self.decoder + ".",
                                  all_reduce=all_reduce)


def _rows(spec: DecoderSpec, name: str) -> int:
    """Rows of one part of a packed vLLM tensor, for this rank's head counts."""
    if name.startswith("q_"):
        return spec.num_heads * spec.head_dim
    if name.startswith(("k_", "v_")):
        return spec.num_kv_heads * spec.head_dim
    return spec.intermediate_size  # gate, up


def layer_from_state(state: Mapping[str, Tensor], at: str, names: Mapping[Any, str],
                     layer_type: type, rows: Callable[[str], int], shapes: str,
                     transposed: bool = False) -> Any:
    """One ``layer_type`` of weights from the parameters named ``at + name``: a packed tensor
    (several fields to one name) is split into row views of ``rows(field)`` rows each, (in, out)
    weights are transposed as views if ``transposed``; nothing is copied. ``shapes`` says what
    the rows were expected from, for the error."""
    parts: dict[str, Tensor] = {}
    for fields, name in names.items():
        if at + name not in state:
            raise UnsupportedModelError(f"the checkpoint has no parameter {at + name}")
        tensor = state[at + name]
        if transposed and tensor.dim() == 2:
            tensor = tensor.T
        if isinstance(fields, str):
            parts[fields] = tensor
            continue
        sizes = [rows(f) for f in fields]
        if tensor.shape[0] != sum(sizes):
            raise ValueError(f"{at + name} has {tensor.shape[0]} rows; expected "
                             f"{' + '.join(map(str, sizes))} for {shapes}")
        parts.update(zip(fields, tensor.split(sizes)))
    missing = [f.name for f in dataclasses.fields(layer_type)
               if f.name not in parts and f.default is not None]
    if missing:
        raise ValueError(f"no weights named for {', '.join(missing)}")
    return layer_type(**parts)


def weights_from_state(
    state: Mapping[str, Tensor], spec: DecoderSpec, layer_names: Names, prefix: str,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    experts: Callable[[Mapping[str, Tensor], str], MoEWeights] | None = None,
) -> ModelWeights:
    """``ModelWeights`` from parameters by name: ``{prefix}layers.{i}.<layer name>``,
    ``{prefix}embed_tokens.weight``, ``{prefix}norm.weight`` and ``lm_head.weight`` (absent:
    tied to the embeddings). Packed tensors are split into row views; nothing is copied.
    ``experts(state, layer prefix)`` reads a mixture-of-experts layer's MLP
    (``spec.layer_has_moe``; ``moe_base.py``) in place of the dense MLP's names."""
    shapes = (f"{spec.num_heads} heads / {spec.num_kv_heads} kv heads of dim {spec.head_dim} "
              f"and intermediate size {spec.intermediate_size}")
    moe_names = {k: v for k, v in layer_names.items() if not set(
        (k,) if isinstance(k, str) else k) & set(DENSE_MLP)}
    layers = []
    for index in range(spec.num_layers):
        at, moe = f"{prefix}layers.{index}.", spec.layer_has_moe(index)
        layer = layer_from_state(state, at, moe_names if moe else layer_names, LayerWeights,
                                 lambda field: _rows(spec, field), shapes)
        if moe:
            if experts is None:
                raise UnsupportedModelError("mixture-of-experts layers need an experts reader")
            layer.moe = experts(state, at)
        layers.append(layer)
    embed = state[prefix + "embed_tokens.weight"]
    return ModelWeights(spec=spec, embed_tokens=embed, layers=layers,
                        final_norm=state[prefix + "norm.weight"],
                        lm_head=state.get("lm_head.weight", embed), all_reduce=all_reduce)


# ---- config → spec: the shared readers -------------------------------------------------------
def rope_settings(params: Any) -> RopeSpec:
    """θ and scaling from one HF rope dict (transformers 5 ``rope_parameters``), or from a
    transformers 4 config's ``rope_theta`` / ``rope_scaling``."""
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(getattr(params, "rope_theta", None) or 10000.0)
        scaling = dict(getattr(params, "rope_scaling", None) or {})
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling {rope_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    scaling.pop("partial_rotary_factor", None)  # the spec's rotary_dim (``rotary_dim``)
    if rope_type == "default":
        return RopeSpec(theta, None)
    return RopeSpec(theta, {"rope_type": rope_type, **scaling})


def global_rope(config: Any) -> RopeSpec:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and FULL_ATTENTION in params:  # one dict per layer type
        rope = rope_settings(params[FULL_ATTENTION])
    else:
        rope = rope_settings(params if isinstance(params, dict) else config)
    scaling = rope.scaling
    if scaling and scaling["rope_type"] in ("longrope", "yarn"):
        # what transformers reads from the config itself: the pretraining length, and the
        # factor (max_position_embeddings / that length) when the rope dict has none
        scaling = dict(scaling)
        if scaling.get("original_max_position_embeddings") is None:
            scaling["original_max_position_embeddings"] = getattr(
                config, "original_max_position_embeddings", None)
        original = scaling["original_max_position_embeddings"]
        if not original:
            raise UnsupportedModelError(
                f"{scaling['rope_type']} rope scaling without original_max_position_embeddings")
        if scaling.get("factor") is None:
            scaling["factor"] = config.max_position_embeddings / original
        rope = RopeSpec(rope.theta, scaling)
    return rope


def rotary_dim(config: Any, head_dim: int) -> int | None:
    """Rotated dims of each head, ``int(head_dim · partial_rotary_factor)`` as transformers and
    vLLM compute them; None when the whole head rotates."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and FULL_ATTENTION in params:
        params = params[FULL_ATTENTION]
    factor = (params or {}).get("partial_rotary_factor") if isinstance(params, dict) else None
    if factor is None:
        factor = getattr(config, "partial_rotary_factor", None)
    if factor is None or float(factor) == 1.0:
        return None
    dim = int(head_dim * float(factor))
    if not 0 < dim <= head_dim or dim % 2:
        raise UnsupportedModelError(
            f"partial_rotary_factor {factor} gives {dim} rotary dims of a {head_dim}-dim head")
    return dim


def layer_types(config: Any) -> tuple[str, ...] | None:
    types = getattr(config, "layer_types", None)
    if types is None:
        return None
    types = tuple(types)[: config.num_hidden_layers]
    unknown = sorted(set(types) - {FULL_ATTENTION, SLIDING_ATTENTION})
    if unknown:
        raise UnsupportedModelError(f"layer types {unknown} are not supported")
    return types


def decoder_spec(config: Any, tensor_parallel_size: int, *, activation_field: str = "hidden_act",
                 **overrides: Any) -> DecoderSpec:
    """The fields every rotary decoder config has, per tensor-parallel rank; ``overrides`` set
    what a model file knows better."""
    activation = getattr(config, activation_field, "silu")
    activations = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
    if activation not in activations:
        raise UnsupportedModelError(
            f"{activation_field}={activation!r} is not supported; supported: "
            f"{', '.join(activations)}")
    for flag in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, flag, None):
            raise UnsupportedModelError(f"{flag}={getattr(config, flag)} is not supported")
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    tp = tensor_parallel_size
    if num_heads % tp or num_kv_heads % tp:
        raise UnsupportedModelError(
            f"{num_heads} heads / {num_kv_heads} kv heads do not split over {tp} ranks")
    rope = global_rope(config)
    fields: dict[str, Any] = dict(
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=num_heads // tp,
        num_kv_heads=num_kv_heads // tp,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size // tp,
        vocab_size=config.vocab_size,
        rms_norm_eps=float(config.rms_norm_eps),
        rope_theta=rope.theta,
        rope_scaling=rope.scaling,
        # Qwen configs keep a window that applies only with use_sliding_window
        sliding_window=(getattr(config, "sliding_window", None)
                        if getattr(config, "use_sliding_window", True) else None),
        layer_types=layer_types(config),
        activation=activations[activation],
        rotary_dim=rotary_dim(config, head_dim),
    )
    fields.update(overrides)
    return DecoderSpec(**fields)
