"""ViT and DeiT image classifiers and encoders (``ViTForImageClassification``, ``ViTModel``; the
non-distilled DeiT checkpoints use them; ``DeiTForImageClassificationWithTeacher``,
``DeiTForImageClassification``, ``DeiTModel``, whose embeddings add a distillation token after
the class token), built from the engine's blocks.

A patch embedding (``engine.embeddings.PatchEmbedding``: the class token, the patches through
the projection, the learned position table added), pre-LayerNorm encoder layers (LayerNorm,
bidirectional attention with biases and no positional rule, a plain GELU MLP), the final
LayerNorm; the head's targets are seeds at its output (``vit_seed``): a class logit
(``{"label": i}``: the classifier on the class token; with the teacher, DeiT's mean of that and
the distillation classifier on the distillation token) or a dimension of the class token's
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

ARCHITECTURES = ("ViTForImageClassification", "ViTModel", "DeiTForImageClassificationWithTeacher",
                 "DeiTForImageClassification", "DeiTModel")
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
TARGET_HELP = "{'label': i} (a classifier's logit) or {'dimension': k} (of the class token)"


@dataclass
class Classifier:
    """A linear classifier on one token's final state: (num_labels, hidden) and its bias."""

    token: int
    weight: Tensor
    bias: Tensor | None = None


@dataclass
class VisionModel:
    """A ViT's blocks, and its classifiers (none for an encoder; DeiT with the teacher: two,
    whose logits are averaged)."""

    blocks: BlockModel
    classifiers: list[Classifier]
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
    backbone = getattr(model, "vit", None) or getattr(model, "deit", None) or model
    state = {name: tensor.detach() for name, tensor in backbone.state_dict().items()}
    eps = config.layer_norm_eps
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    embedding = PatchEmbedding(
        state["embeddings.patch_embeddings.projection.weight"],
        state.get("embeddings.patch_embeddings.projection.bias"),
        state["embeddings.cls_token"], state["embeddings.position_embeddings"][0],
        _pair(config.image_size), distillation_token=state.get("embeddings.distillation_token"))

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
    heads = [(0, getattr(model, "classifier", None) or getattr(model, "cls_classifier", None)),
             (1, getattr(model, "distillation_classifier", None))]
    classifiers = [Classifier(token, head.weight.detach(),
                              None if head.bias is None else head.bias.detach())
                   for token, head in heads if isinstance(head, torch.nn.Linear)]
    return VisionModel(
        blocks, classifiers,
        {int(i): name for i, name in (getattr(config, "id2label", None) or {}).items()})


def vit_seed(vision: VisionModel, final_hidden: Tensor, target: dict[str, int]) -> HiddenSeed:
    """The seed of ``target`` at the final hidden states (1 + N, hidden): ``{"label": i}``
    (W_c[i] at the class token; the classifier's bias keeps b_c[i]) or ``{"dimension": k}``."""
    if not isinstance(target, dict) or len(target) != 1:
        raise ValueError(f"unknown image target {target!r}; allowed: {TARGET_HELP}")
    (kind, index), = target.items()
    gradient = torch.zeros(1, *final_hidden.shape, device=final_hidden.device)
    if kind == "label":
        if not vision.classifiers:
            raise ValueError("this model has no classifier; {'label': i} needs "
                             "ViTForImageClassification (a ViTModel allows {'dimension': k})")
        labels = vision.classifiers[0].weight.shape[0]
        if not 0 <= int(index) < labels:
            raise ValueError(f"label {index} is out of range: allowed 0 to {labels - 1}")
        share = 1.0 / len(vision.classifiers)  # DeiT with the teacher: the mean of two
        bias = torch.zeros(1, device=final_hidden.device)
        for classifier in vision.classifiers:
            gradient[0, classifier.token] += share * classifier.weight[int(index)].float()
            if classifier.bias is not None:
                bias += share * classifier.bias[int(index)].float()
        return HiddenSeed(gradient, bias)
    if kind == "dimension":
        if not 0 <= int(index) < final_hidden.shape[1]:
            raise ValueError(f"dimension {index} is out of range: allowed 0 to "
                             f"{final_hidden.shape[1] - 1}")
        gradient[0, 0, int(index)] = 1.0
        return HiddenSeed(gradient)
    raise ValueError(f"unknown image target {target!r}; allowed: {TARGET_HELP}")


def classifier_logits(vision: VisionModel, final_hidden: Tensor) -> Tensor:
    """The classifier's logits (num_labels,), fp32, from the final hidden states (DeiT with the
    teacher: the mean of its two classifiers')."""
    if not vision.classifiers:
        raise ValueError("this model has no classifier")
    logits = [final_hidden[c.token] @ c.weight.T + (0 if c.bias is None else c.bias)
              for c in vision.classifiers]
    return (sum(logits) / len(logits)).float()
