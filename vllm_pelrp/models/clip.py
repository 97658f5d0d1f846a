"""CLIP (``CLIPModel``: both towers; ``CLIPVisionModel``: the image tower alone), built from the
engine's blocks, and its image–text similarity as a target explained on both sides.

- Image tower: a patch embedding (class embedding, bias-free patch projection, learned position
  table) followed by ``pre_layrnorm``; pre-LayerNorm layers (bidirectional attention with
  biases, a quick-GELU MLP); ``post_layernorm``, then ``visual_projection`` of the class token
  (``image_pooling`` "cls", CLIP's own) or of every token's mean ("mean", vLLM's MEAN pooling).
- Text tower: token + learned position embeddings; the same layers with causal attention;
  ``final_layer_norm``; the state at the first end-of-text token (the largest id for the legacy
  ``eos_token_id`` 2), then ``text_projection``.
- Target ``similarity``: cos(a, b) of the projected embeddings. As the text encoders'
  similarity: 1/‖a‖ and 1/‖b‖ held constant, the uniform rule on the dot product, so each side
  explains half the cosine (``clip_similarity_seeds``). The logit scale is left out (a
  constant factor).

Served: ``clip_from_served`` reads vLLM's ``CLIPEmbeddingModel`` (``serving/image_worker.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..engine.driver import BlockModel, ForwardPass, Head, HiddenSeed
from ..engine.embeddings import AdditiveEmbedding, PatchEmbedding
from .encoder_layers import hf_names, identity, layer_norm, pair, pre_norm_layers

ARCHITECTURES = ("CLIPModel", "CLIPVisionModel")


@dataclass
class CLIPBlocks:
    """Both towers' blocks (``text`` None for ``CLIPVisionModel``) and the projections."""

    vision: BlockModel
    text: BlockModel | None = None
    visual_projection: Tensor | None = None
    text_projection: Tensor | None = None
    eos_token_id: int | None = None
    # the image embedding: "cls", the class token's final state (CLIP's own, vLLM's CLS
    # pooling), or "mean", every token's mean, the class token included (vLLM's MEAN pooling)
    image_pooling: str = "cls"


# CLIP's layer parameter names, by role (``encoder_layers.ROLES``)
LAYER_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.out_proj", "norm1": "layer_norm1", "norm2": "layer_norm2",
               "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def clip_from_hf(model: Any) -> CLIPBlocks:
    """The blocks of a Hugging Face ``CLIPModel`` or ``CLIPVisionModel`` (views of its weights)."""
    return clip_from_state({name: t.detach() for name, t in model.state_dict().items()},
                           model.config)


def clip_from_served(served: dict[str, Tensor], config: Any, image_pooling: str = "cls"
                     ) -> CLIPBlocks:
    """The blocks of vLLM's ``CLIPEmbeddingModel`` (``served_state``: its parameters by vLLM's
    names, the linear weights as loaded), on one rank, pooling the image as vLLM is told."""
    text = config.text_config
    blocks = clip_from_state(hf_names(served, {
        "text_model.embeddings.token_embedding.weight": text.vocab_size,
        "text_model.embeddings.position_embedding.weight": text.max_position_embeddings}), config)
    blocks.image_pooling = image_pooling
    return blocks


def clip_from_state(state: dict[str, Tensor], config: Any) -> CLIPBlocks:
    """The blocks of a ``CLIPModel`` or ``CLIPVisionModel`` state dict (Hugging Face's names)."""
    vision_config = getattr(config, "vision_config", config)
    eps = vision_config.layer_norm_eps
    # CLIPModel keeps the tower under vision_model.; transformers 5's CLIPVisionModel does not
    prefix = "vision_model." if "vision_model.pre_layrnorm.weight" in state else ""
    embedding = PatchEmbedding(
        state[f"{prefix}embeddings.patch_embedding.weight"],
        state.get(f"{prefix}embeddings.patch_embedding.bias"),
        state[f"{prefix}embeddings.class_embedding"],
        state[f"{prefix}embeddings.position_embedding.weight"],
        pair(vision_config.image_size), norm=layer_norm(state, f"{prefix}pre_layrnorm", eps))
    weight = state[f"{prefix}embeddings.patch_embedding.weight"]
    vision = BlockModel(
        embedding, pre_norm_layers(state, prefix + "encoder.layers.{}", LAYER_NAMES,
                                   vision_config),
        Head(layer_norm(state, f"{prefix}post_layernorm", eps)), weight.dtype, weight.device,
        identity, has_biases=True)
    if not hasattr(config, "text_config"):
        return CLIPBlocks(vision)
    text_config = config.text_config
    prefix = "text_model."
    words = state[f"{prefix}embeddings.token_embedding.weight"]
    text = BlockModel(
        AdditiveEmbedding(words, state[f"{prefix}embeddings.position_embedding.weight"]),
        pre_norm_layers(state, prefix + "encoder.layers.{}", LAYER_NAMES, text_config,
                        causal=True),
        Head(layer_norm(state, f"{prefix}final_layer_norm", text_config.layer_norm_eps)),
        words.dtype, words.device, identity, has_biases=True)
    return CLIPBlocks(vision, text, state["visual_projection.weight"],
                      state["text_projection.weight"], text_config.eos_token_id)


def text_pool_position(clip: CLIPBlocks, input_ids: Tensor) -> int:
    """The token whose final state is the text's embedding: the first end-of-text token (the
    largest id when ``eos_token_id`` is the legacy 2), as Hugging Face pools."""
    ids = torch.as_tensor(input_ids)
    if clip.eos_token_id == 2:
        return int(ids.argmax())
    found = (ids == clip.eos_token_id).nonzero()
    if len(found) == 0:
        raise ValueError(f"the text has no end-of-text token (id {clip.eos_token_id}): "
                         "tokenize it with the model's tokenizer")
    return int(found[0, 0])


def image_pooling_weights(clip: CLIPBlocks, image_forward: ForwardPass) -> Tensor:
    """Each token's weight in the pooled image state (T,): 1 at the class token ("cls"), or
    1/T everywhere ("mean")."""
    hidden = image_forward.final_hidden
    if clip.image_pooling == "mean":
        return torch.full((hidden.shape[0],), 1.0 / hidden.shape[0], device=hidden.device)
    weights = torch.zeros(hidden.shape[0], device=hidden.device)
    weights[0] = 1.0
    return weights


def image_embedding(clip: CLIPBlocks, image_forward: ForwardPass) -> Tensor:
    """The projected image embedding (projection dim,), fp32, before normalisation."""
    pooled = image_pooling_weights(clip, image_forward) @ image_forward.final_hidden.float()
    return pooled @ clip.visual_projection.T.float()


def text_embedding(clip: CLIPBlocks, text_forward: ForwardPass, input_ids: Tensor) -> Tensor:
    """The projected text embedding (projection dim,), fp32, before normalisation."""
    position = text_pool_position(clip, input_ids)
    return (text_forward.final_hidden[position] @ clip.text_projection.T).float()


@dataclass(frozen=True)
class SimilaritySeeds:
    """The image side's and the text side's seeds, and the cosine they explain half each."""

    image: HiddenSeed
    text: HiddenSeed
    cosine: float


def clip_similarity_seeds(clip: CLIPBlocks, image_forward: ForwardPass,
                          text_forward: ForwardPass, input_ids: Tensor) -> SimilaritySeeds:
    """Seeds of cos(a, b), a = P_v·h_image[0], b = P_t·h_text[eos], at each side's final
    hidden states: with c = 1/(‖a‖‖b‖) held, ∂a = ½ c b and ∂b = ½ c a (uniform rule on a·b),
    then back through the (bias-free) projections."""
    a, b = image_embedding(clip, image_forward), text_embedding(clip, text_forward, input_ids)
    norm = float(a.norm() * b.norm())
    if norm == 0.0:
        raise ValueError("an embedding of norm 0: its cosine is undefined")
    c = 1.0 / norm
    image_hidden, text_hidden = image_forward.final_hidden, text_forward.final_hidden
    image_grad = (image_pooling_weights(clip, image_forward)[:, None]
                  * (0.5 * c * (b @ clip.visual_projection.float())))[None]
    text_grad = torch.zeros(1, *text_hidden.shape, device=text_hidden.device)
    text_grad[0, text_pool_position(clip, input_ids)] = 0.5 * c * (
        a @ clip.text_projection.float())
    return SimilaritySeeds(HiddenSeed(image_grad), HiddenSeed(text_grad), float(c * (a @ b)))
