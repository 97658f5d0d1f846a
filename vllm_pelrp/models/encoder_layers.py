"""What the image model files share (``vit.py``, ``clip.py``, ``siglip.py``): their pre-LayerNorm
encoder layers, read from a Hugging Face state dict by each file's own parameter names, a
LayerNorm by name, and the Hugging Face names of a state served by vLLM (``hf_names``). The
blocks are the engine's (``engine/layer.py``: pre placement)."""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from ..engine.attention import Attention
from ..engine.blocks import LayerNorm, PlainMLP
from ..engine.layer import TransformerLayer
from ..engine.spec import UnsupportedModelError

# Hugging Face hidden_act → the engine's activation
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh"}
# the parts of a layer, by role: q, k, v, o (the attention's projections), norm1 and norm2 (the
# LayerNorms before the attention and before the MLP), fc1 and fc2 (the MLP)
ROLES = ("q", "k", "v", "o", "norm1", "norm2", "fc1", "fc2")


def activation_of(config: Any) -> str:
    if config.hidden_act not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {config.hidden_act!r}; supported: "
                                    f"{', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[config.hidden_act]


def layer_norm(state: Mapping[str, Tensor], name: str, eps: float) -> LayerNorm:
    """The LayerNorm whose parameters are ``name``.weight and ``name``.bias."""
    return LayerNorm(state[f"{name}.weight"], state.get(f"{name}.bias"), eps)


def pre_norm_layers(state: Mapping[str, Tensor], layers: str, names: Mapping[str, str],
                    config: Any, causal: bool = False) -> list[TransformerLayer]:
    """``config.num_hidden_layers`` pre-LayerNorm layers (attention with biases, a plain MLP);
    layer i's parameters are ``layers.format(i)`` + "." + ``names[role]`` + ".weight" / ".bias"."""
    head_dim = config.hidden_size // config.num_attention_heads
    eps, act = config.layer_norm_eps, activation_of(config)
    built = []
    for index in range(config.num_hidden_layers):
        at = layers.format(index)
        weight = {role: state[f"{at}.{names[role]}.weight"] for role in ROLES}
        bias = {role: state.get(f"{at}.{names[role]}.bias") for role in ROLES}
        attention = Attention(weight["q"], weight["k"], weight["v"], weight["o"], head_dim,
                              q_bias=bias["q"], k_bias=bias["k"], v_bias=bias["v"],
                              o_bias=bias["o"], causal=causal)
        mlp = PlainMLP(weight["fc1"], bias["fc1"], weight["fc2"], bias["fc2"], act)
        built.append(TransformerLayer(LayerNorm(weight["norm1"], bias["norm1"], eps), attention,
                                      LayerNorm(weight["norm2"], bias["norm2"], eps), mlp))
    return built


def hf_names(served: Mapping[str, Tensor], tables: Mapping[str, int]) -> dict[str, Tensor]:
    """A state dict as vLLM's CLIP and SigLIP modules hold it, under Hugging Face's names: each
    fused ``qkv_proj`` split into ``q_proj``, ``k_proj`` and ``v_proj`` (equal thirds: these
    models have no grouped keys), and each table named in ``tables`` (parameter name → rows) cut
    to its rows (vLLM pads vocabulary-parallel tables). One rank only."""
    state: dict[str, Tensor] = {}
    for name, tensor in served.items():
        if ".qkv_proj." in name:
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3)):
                state[name.replace("qkv_proj", part)] = piece
        else:
            state[name] = tensor[:tables[name]] if name in tables else tensor
    return state


def pair(value: Any) -> tuple[int, int]:
    """An image size as (height, width)."""
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value), int(value))


def identity(tensor: Tensor) -> Tensor:
    """One rank: nothing to sum."""
    return tensor
