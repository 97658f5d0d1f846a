"""ViT image classifiers and encoders (``ViTForImageClassification``, ``ViTModel``; the
non-distilled DeiT checkpoints use them), built from the engine's blocks.

A patch embedding (``engine.embeddings.PatchEmbedding``: the class token, the patches through
the projection, the learned position table added), pre-LayerNorm encoder layers (LayerNorm,
bidirectional attention with biases and no positional rule, a plain GELU MLP), the final
LayerNorm; the head's targets are seeds at its output (``vit_seed``): a class logit
(``{"label": i}``, the classifier on the class token) or a dimension of the class token's
final state (``{"dimension": k}``). Offline only for now: the model is not in the serving
registry (``models.MODEL_FILES``) and has no vLLM weight names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..engine.attention import Attention
from ..engine.blocks import LayerNorm, PlainMLP
from ..engine.driver import BlockModel, Head, HiddenSeed
from ..engine.embeddings import PatchEmbedding
from ..engine.layer import TransformerLayer
from ..engine.spec import UnsupportedModelError

ARCHITECTURES = ("ViTForImageClassification", "ViTModel")
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
TARGET_HELP = "{'label': i} (a classifier's logit) or {'dimension': k} (of the class token)"


@dataclass
class VisionModel:
    """A ViT's blocks, and its classifier (num_labels, hidden) and bias where it has one."""

    blocks: BlockModel
    classifier: Tensor | None = None
    classifier_bias: Tensor | None = None
    label_names: dict[int, str] | None = None

    @property
    def embedding(self) -> PatchEmbedding:
        return self.blocks.embedding


def _pair(value: Any) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value), int(value))


def vit_from_hf(model: Any) -> VisionModel:
    """The blocks of a Hugging Face ``ViTForImageClassification`` or ``ViTModel`` (transformers
    5's module names), as views of its weights."""
    config = model.config
    if config.hidden_act not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {config.hidden_act!r}; supported: "
                                    f"{', '.join(ACTIVATIONS)}")
    backbone = getattr(model, "vit", model)
    state = {name: tensor.detach() for name, tensor in backbone.state_dict().items()}
    eps = config.layer_norm_eps
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    embedding = PatchEmbedding(
        state["embeddings.patch_embeddings.projection.weight"],
        state.get("embeddings.patch_embeddings.projection.bias"),
        state["embeddings.cls_token"], state["embeddings.position_embeddings"][0],
        _pair(config.image_size))

    def norm(prefix: str) -> LayerNorm:
        return LayerNorm(state[f"{prefix}.weight"], state.get(f"{prefix}.bias"), eps)

    layers = []
    for index in range(config.num_hidden_layers):
        prefix = f"layers.{index}"

        def weight(name: str) -> Tensor:
            return state[f"{prefix}.{name}.weight"]

        def bias(name: str) -> Tensor | None:
            return state.get(f"{prefix}.{name}.bias")

        attention = Attention(
            weight("attention.q_proj"), weight("attention.k_proj"), weight("attention.v_proj"),
            weight("attention.o_proj"), head_dim, q_bias=bias("attention.q_proj"),
            k_bias=bias("attention.k_proj"), v_bias=bias("attention.v_proj"),
            o_bias=bias("attention.o_proj"), causal=False)
        mlp = PlainMLP(weight("mlp.fc1"), bias("mlp.fc1"), weight("mlp.fc2"), bias("mlp.fc2"),
                       ACTIVATIONS[config.hidden_act])
        layers.append(TransformerLayer(norm(f"{prefix}.layernorm_before"), attention,
                                       norm(f"{prefix}.layernorm_after"), mlp))
    projection = state["embeddings.patch_embeddings.projection.weight"]
    blocks = BlockModel(embedding, layers, Head(norm("layernorm")), projection.dtype,
                        projection.device, lambda tensor: tensor, has_biases=True)
    classifier = getattr(model, "classifier", None)
    return VisionModel(
        blocks,
        None if classifier is None else classifier.weight.detach(),
        None if classifier is None or classifier.bias is None else classifier.bias.detach(),
        {int(i): name for i, name in (getattr(config, "id2label", None) or {}).items()})


def vit_seed(vision: VisionModel, final_hidden: Tensor, target: dict[str, int]) -> HiddenSeed:
    """The seed of ``target`` at the final hidden states (1 + N, hidden): ``{"label": i}``
    (W_c[i] at the class token; the classifier's bias keeps b_c[i]) or ``{"dimension": k}``."""
    if not isinstance(target, dict) or len(target) != 1:
        raise ValueError(f"unknown image target {target!r}; allowed: {TARGET_HELP}")
    (kind, index), = target.items()
    gradient = torch.zeros(1, *final_hidden.shape, device=final_hidden.device)
    if kind == "label":
        if vision.classifier is None:
            raise ValueError("this model has no classifier; {'label': i} needs "
                             "ViTForImageClassification (a ViTModel allows {'dimension': k})")
        labels = vision.classifier.shape[0]
        if not 0 <= int(index) < labels:
            raise ValueError(f"label {index} is out of range: allowed 0 to {labels - 1}")
        gradient[0, 0] = vision.classifier[int(index)].float()
        bias = None if vision.classifier_bias is None else \
            vision.classifier_bias[int(index)].float().reshape(1)
        return HiddenSeed(gradient, bias)
    if kind == "dimension":
        if not 0 <= int(index) < final_hidden.shape[1]:
            raise ValueError(f"dimension {index} is out of range: allowed 0 to "
                             f"{final_hidden.shape[1] - 1}")
        gradient[0, 0, int(index)] = 1.0
        return HiddenSeed(gradient)
    raise ValueError(f"unknown image target {target!r}; allowed: {TARGET_HELP}")


def classifier_logits(vision: VisionModel, final_hidden: Tensor) -> Tensor:
    """ViTForImageClassification's logits (num_labels,), fp32, from the final hidden states."""
    if vision.classifier is None:
        raise ValueError("this model has no classifier")
    logits = final_hidden[0] @ vision.classifier.T
    return (logits if vision.classifier_bias is None else logits + vision.classifier_bias).float()
