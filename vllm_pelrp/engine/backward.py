"""PA-LRP for rotary decoders (LLaMA, Mistral, Qwen, Gemma 3, Phi-3, the mixtures of experts): the
blocks of a ``ModelWeights`` description (``rotary_model``) and the engine's entry points for
them, all through the one driver (``driver.py``).

The backward starts from the saved input of every decoder layer (the residual stream: a
recording of the served model, or a forward from the token ids), and walks the layers from last
to first, recomputing each layer's forward from its saved input (``driver.relevance``).

Modes:
- ``pa-lrp``: the RoPE products follow the uniform rule: half of the relevance of q̃ and k̃
  goes to that position's cos/sin (the positional relevance), half into q and k.
- ``attnlrp``: cos/sin are constants; all relevance flows to tokens.
- ``cp-lrp``: attention probabilities are constants; A·V is linear in V, nothing reaches q/k.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .attention import Attention, Rotary
from .blocks import GatedMLP, MixtureOfExperts, RMSNorm
from .driver import (
    DEFAULT_CACHE_BUDGET_BYTES,
    BlockModel,
    ForwardPass,
    Head,
    LogitSeeds,
    RelevanceResult,
    relevance,
    run_forward as run_block_forward,
)
from .embeddings import TokenEmbedding
from .layer import TransformerLayer
from .spec import DecoderSpec, LayerWeights, ModelWeights
from ..vocabulary import MODES  # noqa: F401  (re-exported)

__all__ = [
    "DEFAULT_CACHE_BUDGET_BYTES", "ForwardPass", "LogitSeeds", "MODES", "RelevanceResult",
    "argmax_next_token", "final_logits", "forward_layer_inputs", "relevance_from_input_ids",
    "relevance_from_layer_inputs", "rotary_model", "run_forward",
]


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def _norm(spec: DecoderSpec, gamma: Tensor | None) -> RMSNorm | None:
    if gamma is None:
        return None
    return RMSNorm(gamma, spec.rms_norm_eps, spec.norm_offset, spec.norm_scale_in_float)


def _layer(weights: ModelWeights, index: int, layer: LayerWeights) -> TransformerLayer:
    spec = weights.spec
    rotary = Rotary(spec.head_dim, spec.rotated_dims, spec.layer_rope(index), spec.neox_style,
                    spec.rope_table_length)
    attention = Attention(
        layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj, spec.head_dim,
        q_bias=layer.q_bias, k_bias=layer.k_bias, v_bias=layer.v_bias,
        q_norm=_norm(spec, layer.q_norm), k_norm=_norm(spec, layer.k_norm), rotary=rotary,
        causal=True, window=spec.layer_window(index), scale=spec.attention_scale)
    if layer.moe is not None:
        mlp = MixtureOfExperts(spec.moe, layer.moe, spec.activation)
    else:
        mlp = GatedMLP(layer, spec.activation)
    return TransformerLayer(
        _norm(spec, layer.attention_norm), attention, _norm(spec, layer.mlp_norm), mlp,
        attention_output_norm=_norm(spec, layer.attention_output_norm),
        mlp_output_norm=_norm(spec, layer.mlp_output_norm),
        reduce=weights.all_reduce or _identity)


def rotary_model(weights: ModelWeights) -> BlockModel:
    """The blocks of a rotary pre-norm decoder: token embedding × scale, pre-norm layers (with
    sandwich norms where the weights have them) of RMSNorm, attention with RoPE, a gated MLP or
    a mixture of experts, and the final RMSNorm with the LM head. Views of the weights, nothing
    copied."""
    spec = weights.spec
    return BlockModel(
        embedding=TokenEmbedding(weights.embed_tokens, spec.embed_scale),
        layers=[_layer(weights, index, layer) for index, layer in enumerate(weights.layers)],
        head=Head(_norm(spec, weights.final_norm), weights.lm_head),
        dtype=weights.dtype, device=weights.device, reduce=weights.all_reduce or _identity,
        has_biases=spec.qkv_bias)


def run_forward(
    weights: ModelWeights, input_ids: Tensor, positions: Tensor | None = None,
    cache_budget_bytes: int = 0, checkpoint: Callable[[], None] | None = None,
) -> ForwardPass:
    """Plain forward. Keeps the per-layer backward caches only if all of them together fit
    in ``cache_budget_bytes`` (judged after the first layer); otherwise the backward
    recomputes each layer from its input, and memory stays at the residual stream.
    ``checkpoint`` is called after each layer."""
    return run_block_forward(rotary_model(weights), input_ids, positions,
                             cache_budget_bytes=cache_budget_bytes, checkpoint=checkpoint)


def forward_layer_inputs(
    weights: ModelWeights, input_ids: Tensor, positions: Tensor | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> tuple[list[Tensor], Tensor]:
    """Plain forward: the input of every decoder layer, and the last layer's output."""
    forward = run_forward(weights, input_ids, positions, checkpoint=checkpoint)
    return forward.layer_inputs, forward.last_output


def final_logits(weights: ModelWeights, last_output: Tensor) -> Tensor:
    """Output logits (T, V) from the last layer's output (the final norm, then the LM head)."""
    return Head(_norm(weights.spec, weights.final_norm), weights.lm_head).logits(last_output)


@torch.no_grad()
def argmax_next_token(
    weights: ModelWeights, layer_inputs: Sequence[Tensor], positions: Tensor
) -> int:
    """The model's argmax token after the last position, from the saved layer inputs."""
    model = rotary_model(weights)
    last, _ = model.layers[-1].forward(layer_inputs[-1], model.positions(positions),
                                       keep_cache=False)
    return int(model.head.logits(last[-1:])[0].argmax())


def relevance_from_layer_inputs(
    weights: ModelWeights, layer_inputs: Sequence[Tensor] | Tensor, positions: Tensor,
    seeds: LogitSeeds, mode: str = "pa-lrp", checkpoint: Callable[[], None] | None = None,
    **options,
) -> RelevanceResult:
    """The engine's core entry point for a rotary decoder: PA-LRP relevance from the saved
    residual stream. ``layer_inputs[l]`` is the input of decoder layer l, (T, hidden);
    ``layer_inputs[0]`` is the token embedding, whose relevance is the token relevance.
    ``positions`` (T,) are the RoPE positions. ``options`` (``forward``,
    ``recompute_executor``, ``row_chunk``) and ``checkpoint``: as in ``driver.relevance``."""
    return relevance(rotary_model(weights), layer_inputs, positions, seeds, mode, checkpoint,
                     **options)


def relevance_from_input_ids(
    weights: ModelWeights,
    input_ids: Tensor,
    seeds: LogitSeeds,
    mode: str = "pa-lrp",
    checkpoint: Callable[[], None] | None = None,
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
) -> RelevanceResult:
    """From token ids: plain forward (keeping layer caches within budget), then the backward."""
    model = rotary_model(weights)
    forward = run_block_forward(model, input_ids, cache_budget_bytes=cache_budget_bytes)
    return relevance(model, forward.layer_inputs, forward.positions, seeds, mode, checkpoint,
                     forward=forward)
