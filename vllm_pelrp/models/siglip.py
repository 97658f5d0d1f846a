"""SigLIP (``SiglipModel``: both towers; ``SiglipVisionModel``: the image tower alone), built from
the engine's blocks, and its image–text similarity explained on both sides.

- Image tower: a patch embedding without a class token (projection with bias, learned position
  table), pre-LayerNorm layers (bidirectional attention with biases, a GELU-tanh MLP),
  ``post_layernorm``, then the attention-pooling head (``AttentionPoolingHead``: a learned
  probe attends over the patches, then a residual MLP).
- Text tower: token + learned position embeddings, the same layers (bidirectional),
  ``final_layer_norm``, the last token's state through ``head`` (a linear with bias).
- Target ``similarity``: cos(a, b) of the two embeddings, norms held, the uniform rule on the
  dot product: half the cosine to each side (as CLIP, ``clip.py``). The logit scale and bias
  are left out.

Served: ``siglip_from_served`` reads vLLM's ``SiglipEmbeddingModel`` (``serving/image_worker.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..engine.blocks import LayerNorm, activation, activation_backward, linear, linear_backward
from ..engine.driver import BlockModel, ForwardPass, Head, HiddenSeed
from ..engine.embeddings import AdditiveEmbedding, PatchEmbedding
from ..engine.rules import attention_score_rule, attention_value_rule, softmax_rule
from .clip import LAYER_NAMES
from .encoder_layers import activation_of, hf_names, identity, layer_norm, pair, pre_norm_layers

ARCHITECTURES = ("SiglipModel", "SiglipVisionModel")


class AttentionPoolingHead:
    """SigLIP's multihead attention pooling: y = r + fc2(act(fc1(LN(r)))), r = O·attn(probe,
    X, X) + b_o, with q = probe·W_qᵀ + b_q and k, v from the final hidden states X (T, hidden).
    Rules as the layers': the uniform rule on A·V and on q·kᵀ, the softmax's gradient, LayerNorm
    and the activation by the identity rule, the linears by the ε-rule. The probe is a
    parameter: its share of q·kᵀ, like the biases' shares and what the softmax drops, stays in
    the head (``backward``'s second value)."""

    def __init__(self, state: dict[str, Tensor], prefix: str, heads: int, eps: float,
                 activation_name: str) -> None:
        self.probe = state[f"{prefix}probe"].reshape(-1)
        weight, bias = state[f"{prefix}attention.in_proj_weight"], \
            state[f"{prefix}attention.in_proj_bias"]
        self.q, self.k, self.v = weight.chunk(3)
        self.q_bias, self.k_bias, self.v_bias = bias.chunk(3)
        self.o, self.o_bias = state[f"{prefix}attention.out_proj.weight"], \
            state[f"{prefix}attention.out_proj.bias"]
        self.norm = LayerNorm(state[f"{prefix}layernorm.weight"],
                              state[f"{prefix}layernorm.bias"], eps)
        self.fc1, self.fc1_bias = state[f"{prefix}mlp.fc1.weight"], state[f"{prefix}mlp.fc1.bias"]
        self.fc2, self.fc2_bias = state[f"{prefix}mlp.fc2.weight"], state[f"{prefix}mlp.fc2.bias"]
        self.heads, self.activation = heads, activation_name

    def _split(self, x: Tensor) -> Tensor:  # (T, hidden) → (heads, T, d)
        return x.view(x.shape[0], self.heads, -1).transpose(0, 1)

    def forward(self, hidden: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The pooled embedding (hidden,) of the final hidden states (T, hidden)."""
        query = self._split(linear(self.probe[None], self.q, self.q_bias))  # (h, 1, d)
        keys = self._split(linear(hidden, self.k, self.k_bias))
        values = self._split(linear(hidden, self.v, self.v_bias))
        scale = 1.0 / math.sqrt(query.shape[-1])
        probs = torch.softmax((scale * query @ keys.transpose(1, 2)).float(), -1)  # (h, 1, T)
        attended = (probs.to(values.dtype) @ values).transpose(0, 1).reshape(1, -1)
        residual = linear(attended, self.o, self.o_bias)
        normed, inv_std = self.norm.forward(residual)
        up = linear(normed, self.fc1, self.fc1_bias)
        pooled = residual + linear(activation(self.activation, up), self.fc2, self.fc2_bias)
        return pooled[0], dict(query=query, keys=keys, values=values, probs=probs, up=up,
                               inv_std=inv_std, scale=torch.tensor(scale))

    def backward(self, hidden: Tensor, grad_pooled: Tensor, mode: str) -> Tensor:
        """∂ at the pooled embedding (hidden,) → ∂ at the final hidden states (1, T, hidden)."""
        _, cache = self.forward(hidden)
        grad_y = grad_pooled.float().reshape(1, 1, -1)
        grad_act = linear_backward(grad_y, self.fc2, self.fc2_bias, None)
        grad_up = activation_backward(self.activation, grad_act, cache["up"])
        grad_normed = linear_backward(grad_up, self.fc1, self.fc1_bias, None)
        grad_residual = grad_y + self.norm.backward(grad_normed, cache["inv_std"])
        grad_attended = linear_backward(grad_residual, self.o, self.o_bias, None)  # (1,1,H)
        grad_attended = grad_attended.view(1, self.heads, 1, -1)  # (B, h, 1, d)
        share = 1.0 if mode == "cp-lrp" else 0.5
        grad_keys, grad_values = [], []
        for head in range(self.heads):
            probs = cache["probs"][head:head + 1]  # (1, 1, T)
            grad_probs, grad_value = attention_value_rule(
                grad_attended[:, head:head + 1], probs, cache["values"][head].float(), share)
            grad_values.append(grad_value)
            if grad_probs is None:
                grad_keys.append(torch.zeros_like(grad_value))
                continue
            grad_scores = softmax_rule(grad_probs, probs)
            _, grad_key = attention_score_rule(grad_scores, cache["query"][head:head + 1].float(),
                                               cache["keys"][head].float(),
                                               float(cache["scale"]))
            grad_keys.append(grad_key)
        # per head (B, T, d) → (B, T, hidden), head-major as ``_split``
        return (linear_backward(torch.cat(grad_keys, -1), self.k, self.k_bias, None)
                + linear_backward(torch.cat(grad_values, -1), self.v, self.v_bias, None))


@dataclass
class SiglipBlocks:
    """Both towers' blocks (``text`` None for ``SiglipVisionModel``), the image tower's pooling
    head and the text tower's ``head`` (hidden, hidden) with its bias."""

    vision: BlockModel
    pooling: AttentionPoolingHead
    text: BlockModel | None = None
    text_head: Tensor | None = None
    text_head_bias: Tensor | None = None


def siglip_from_hf(model: Any) -> SiglipBlocks:
    """The blocks of a Hugging Face ``SiglipModel`` or ``SiglipVisionModel``."""
    return siglip_from_state({name: t.detach() for name, t in model.state_dict().items()},
                             model.config)


def siglip_from_served(served: dict[str, Tensor], config: Any) -> SiglipBlocks:
    """The blocks of vLLM's ``SiglipEmbeddingModel`` (``served_state``: its parameters by vLLM's
    names, the linear weights as loaded), on one rank."""
    text = config.text_config
    return siglip_from_state(hf_names(served, {
        "text_model.embeddings.token_embedding.weight": text.vocab_size,
        "text_model.embeddings.position_embedding.weight": text.max_position_embeddings}), config)


def siglip_from_state(state: dict[str, Tensor], config: Any) -> SiglipBlocks:
    """The blocks of a ``SiglipModel`` or ``SiglipVisionModel`` state dict (Hugging Face's
    names)."""
    vision_config = getattr(config, "vision_config", config)
    eps = vision_config.layer_norm_eps
    prefix = "vision_model." if "vision_model.post_layernorm.weight" in state else ""
    weight = state[f"{prefix}embeddings.patch_embedding.weight"]
    embedding = PatchEmbedding(weight, state.get(f"{prefix}embeddings.patch_embedding.bias"),
                               None, state[f"{prefix}embeddings.position_embedding.weight"],
                               pair(vision_config.image_size))
    vision = BlockModel(
        embedding, pre_norm_layers(state, prefix + "encoder.layers.{}", LAYER_NAMES,
                                   vision_config),
        Head(layer_norm(state, f"{prefix}post_layernorm", eps)), weight.dtype, weight.device,
        identity, has_biases=True)
    pooling = AttentionPoolingHead(state, f"{prefix}head.", vision_config.num_attention_heads,
                                   eps, activation_of(vision_config))
    if not hasattr(config, "text_config"):
        return SiglipBlocks(vision, pooling)
    text_config = config.text_config
    words = state["text_model.embeddings.token_embedding.weight"]
    text = BlockModel(
        AdditiveEmbedding(words, state["text_model.embeddings.position_embedding.weight"]),
        pre_norm_layers(state, "text_model.encoder.layers.{}", LAYER_NAMES, text_config),
        Head(layer_norm(state, "text_model.final_layer_norm", text_config.layer_norm_eps)),
        words.dtype, words.device, identity, has_biases=True)
    return SiglipBlocks(vision, pooling, text, state["text_model.head.weight"],
                        state["text_model.head.bias"])


def image_embedding(siglip: SiglipBlocks, image_forward: ForwardPass) -> Tensor:
    """The pooled image embedding (hidden,), fp32, before normalisation."""
    return siglip.pooling.forward(image_forward.final_hidden)[0].float()


def text_embedding(siglip: SiglipBlocks, text_forward: ForwardPass) -> Tensor:
    """The text embedding (hidden,), fp32: the last token's final state through ``head``."""
    return linear(text_forward.final_hidden[-1], siglip.text_head, siglip.text_head_bias).float()


@dataclass(frozen=True)
class SimilaritySeeds:
    image: HiddenSeed
    text: HiddenSeed
    cosine: float


def siglip_similarity_seeds(siglip: SiglipBlocks, image_forward: ForwardPass,
                            text_forward: ForwardPass, mode: str = "pa-lrp") -> SimilaritySeeds:
    """Seeds of cos(a, b) at each side's final hidden states: ∂a = ½ c b, ∂b = ½ c a with
    c = 1/(‖a‖‖b‖) held; the image side back through the pooling head (``mode``'s attention
    rule), the text side through ``head``. Each seed's ``head_bias`` is what its head keeps, so
    each side's target is half the cosine."""
    a, b = image_embedding(siglip, image_forward), text_embedding(siglip, text_forward)
    norm = float(a.norm() * b.norm())
    if norm == 0.0:
        raise ValueError("an embedding of norm 0: its cosine is undefined")
    c = 1.0 / norm
    cosine = float(c * (a @ b))
    image_hidden = image_forward.final_hidden
    image_grad = siglip.pooling.backward(image_hidden, 0.5 * c * b, mode)
    image_kept = 0.5 * cosine - float((image_grad * image_hidden.float()).sum())
    text_hidden = text_forward.final_hidden
    text_grad = torch.zeros(1, *text_hidden.shape, device=text_hidden.device)
    grad_b = 0.5 * c * a
    text_grad[0, -1] = grad_b @ siglip.text_head.float()
    text_kept = float(grad_b @ siglip.text_head_bias.float())
    return SimilaritySeeds(HiddenSeed(image_grad, torch.tensor([image_kept])),
                           HiddenSeed(text_grad, torch.tensor([text_kept])), cosine)
