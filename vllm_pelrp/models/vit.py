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
final state (``{"dimension": k}``: CLS pooling) or of the patch tokens' mean
(``{"mean_dimension": k}``: mean pooling, as BEiT's and MAE's poolers). Offline only for now: the model is not in the serving
registry (``models.MODEL_FILES``) and has no vLLM weight names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..engine.driver import BlockModel, Head, HiddenSeed
from ..engine.embeddings import PatchEmbedding
from .encoder_layers import identity, layer_norm, pair, pre_norm_layers

ARCHITECTURES = ("ViTForImageClassification", "ViTModel", "DeiTForImageClassificationWithTeacher",
                 "DeiTForImageClassification", "DeiTModel")
# ViT's and DeiT's layer parameter names (transformers 5), by role (``encoder_layers.ROLES``)
LAYER_NAMES = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
               "o": "attention.o_proj", "norm1": "layernorm_before", "norm2": "layernorm_after",
               "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
TARGET_HELP = ("{'label': i} (a classifier's logit), {'dimension': k} (of the class token) or "
               "{'mean_dimension': k} (of the patch tokens' mean)")


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


def vit_from_hf(model: Any) -> VisionModel:
    """The blocks of a Hugging Face ViT or DeiT (``ARCHITECTURES``; transformers 5's module
    names), as views of its weights."""
    config = model.config
    backbone = getattr(model, "vit", None) or getattr(model, "deit", None) or model
    state = {name: tensor.detach() for name, tensor in backbone.state_dict().items()}
    embedding = PatchEmbedding(
        state["embeddings.patch_embeddings.projection.weight"],
        state.get("embeddings.patch_embeddings.projection.bias"),
        state["embeddings.cls_token"], state["embeddings.position_embeddings"][0],
        pair(config.image_size), distillation_token=state.get("embeddings.distillation_token"))
    projection = state["embeddings.patch_embeddings.projection.weight"]
    blocks = BlockModel(embedding, pre_norm_layers(state, "layers.{}", LAYER_NAMES, config),
                        Head(layer_norm(state, "layernorm", config.layer_norm_eps)),
                        projection.dtype, projection.device, identity, has_biases=True)
    heads = [(0, getattr(model, "classifier", None) or getattr(model, "cls_classifier", None)),
             (1, getattr(model, "distillation_classifier", None))]
    classifiers = [Classifier(token, head.weight.detach(),
                              None if head.bias is None else head.bias.detach())
                   for token, head in heads if isinstance(head, torch.nn.Linear)]
    return VisionModel(
        blocks, classifiers,
        {int(i): name for i, name in (getattr(config, "id2label", None) or {}).items()})


def vit_seed(vision: VisionModel, final_hidden: Tensor, target: dict[str, int]) -> HiddenSeed:
    """The seed of ``target`` at the final hidden states (prefix + N, hidden): ``{"label": i}``
    (W_c[i] at the class token, DeiT's teacher head half of each classifier's row at its
    token; the biases keep their share), ``{"dimension": k}`` (of the class token) or
    ``{"mean_dimension": k}`` (of the patch tokens' mean: 1/N at each patch)."""
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
    if kind in ("dimension", "mean_dimension"):
        if not 0 <= int(index) < final_hidden.shape[1]:
            raise ValueError(f"dimension {index} is out of range: allowed 0 to "
                             f"{final_hidden.shape[1] - 1}")
        if kind == "dimension":
            gradient[0, 0, int(index)] = 1.0
        else:  # the mean over the patch tokens (the prefix tokens left out)
            prefix = vision.blocks.embedding.prefix
            gradient[0, prefix:, int(index)] = 1.0 / (final_hidden.shape[0] - prefix)
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
