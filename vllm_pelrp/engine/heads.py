"""Encoder targets as seeds of the additive engine (``additive.py``): math only, no model loading,
no HTTP, no vLLM.

A target of an encoder is a function of its final hidden states (HF's ``last_hidden_state``,
(T, hidden)). Each function here returns a ``HiddenSeed``: the modified gradient at those hidden
states (B, T, hidden) for B target rows, and what the head's own biases keep (B,), so that
``additive_relevance(weights, ids, seed)`` conserves the target's value.

- Pooling as sentence-transformers computes it for one text (attention mask all ones): ``mean``
  over the tokens, ``cls`` (the first token) or ``max`` (per dimension); then optionally
  normalised. Mean and CLS are linear; max is winner-take-all (the ε-rule on a max).
- ``{"dimension": k}``: dimension k of the pooled embedding before normalisation.
- ``{"similarity": other}``: cosine(a, b) of two texts' pooled embeddings (normalisation does not
  change it). Rule: 1/‖a‖ and 1/‖b‖ held constant, the uniform rule on the dot product: each
  side gets half, so each side's relevance sums to ½·cos minus what softmax and biases absorb.
- ``{"label": i}``: a BertForSequenceClassification logit, W_c·tanh(W_p·h_CLS + b_p) + b_c: tanh
  by the identity rule, both linears by the ε-rule (their biases keep their share).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .additive import AdditiveWeights, HiddenSeed
from .rules import bias_relevance, tanh_identity_rule
from .spec import UnsupportedModelError
from ..vocabulary import ENCODER_TARGETS

POOLINGS = ("mean", "cls", "max")
TARGET_HELP = "{'dimension': k}, {'similarity': other_text} or {'label': i}"


class HeadTargetError(ValueError):
    """An encoder target that does not exist on this model (its message names what does);
    ``param`` as the pipeline's ``ExplainInputError``."""

    param = "target"


@dataclass(frozen=True)
class Pooling:
    """How a text's hidden states become one embedding: ``mode`` in ``POOLINGS``, then an
    optional L2 normalisation (from a sentence-transformers directory:
    ``Pooling(config.pooling, config.normalize)`` of ``sentence_models.read_sentence_config``)."""

    mode: str = "mean"
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.mode not in POOLINGS:
            raise UnsupportedModelError(f"pooling {self.mode!r} is not supported; supported: "
                                  f"{', '.join(POOLINGS)}")


def pool(hidden: Tensor, pooling: Pooling) -> Tensor:
    """Pooled embedding (hidden,) of one text's final hidden states (T, hidden), fp32, before
    normalisation."""
    hidden = hidden.float()
    if pooling.mode == "mean":
        return hidden.mean(0)
    if pooling.mode == "cls":
        return hidden[0]
    return hidden.max(0).values


def normalized(embedding: Tensor, pooling: Pooling) -> Tensor:
    """The embedding the model outputs: pooled, then L2-normalised if the pooling says so."""
    return torch.nn.functional.normalize(embedding, dim=-1) if pooling.normalize else embedding


def pooling_backward(hidden: Tensor, pooling: Pooling, grad_pooled: Tensor) -> Tensor:
    """∂ at the pooled embedding (B, hidden) → ∂ at the hidden states (B, T, hidden): mean:
    ∂/T at every token; cls: ∂ at token 0; max: ∂ at each dimension's argmax token."""
    rows, length = grad_pooled.shape[0], hidden.shape[0]
    grad_pooled = grad_pooled.float()
    if pooling.mode == "mean":
        return (grad_pooled / length)[:, None, :].expand(rows, length, -1).clone()
    grad = torch.zeros(rows, *hidden.shape, device=grad_pooled.device)
    if pooling.mode == "cls":
        grad[:, 0] = grad_pooled
        return grad
    winners = hidden.float().max(0).indices  # (hidden,)
    grad.scatter_(1, winners[None, None, :].expand(rows, 1, -1), grad_pooled[:, None, :])
    return grad


def _whole_numbers(value: Any, name: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise HeadTargetError(f"{name} must be a whole number (or a non-empty list of them), "
                              f"got {value!r}")
    return values


def dimension_seed(hidden: Tensor, dimension: int | Sequence[int], pooling: Pooling) -> HiddenSeed:
    """{"dimension": k}: target e_k · pool(h), one row per k; ∂pool = e_k (mean: e_k/T per token)."""
    size = hidden.shape[-1]
    dimensions = _whole_numbers(dimension, "dimension")
    for k in dimensions:
        if not 0 <= k < size:
            raise HeadTargetError(f"dimension {k} is out of range: the embedding has {size} "
                                  f"dimensions, allowed 0 to {size - 1}")
    grad_pooled = torch.zeros(len(dimensions), size, device=hidden.device)
    grad_pooled[torch.arange(len(dimensions)), torch.tensor(dimensions)] = 1.0
    return HiddenSeed(pooling_backward(hidden, pooling, grad_pooled))


@dataclass(frozen=True)
class SimilaritySeeds:
    """Both sides of a cosine target: each side's seed conserves ½·cosine."""

    first: HiddenSeed
    second: HiddenSeed
    cosine: Tensor  # () fp32


def similarity_seeds(hidden_a: Tensor, hidden_b: Tensor, pooling: Pooling) -> SimilaritySeeds:
    """{"similarity": b}: cos = ⟨a, b⟩/(‖a‖‖b‖), norms held: ∂a = ½·b/(‖a‖‖b‖), ∂b = ½·a/(‖a‖‖b‖)."""
    a, b = pool(hidden_a, pooling), pool(hidden_b, pooling)
    norms = a.norm() * b.norm()
    if float(norms) == 0.0:
        raise HeadTargetError("a text's pooled embedding is zero: its cosine is undefined")
    scale = 0.5 / norms
    return SimilaritySeeds(
        HiddenSeed(pooling_backward(hidden_a, pooling, (scale * b)[None])),
        HiddenSeed(pooling_backward(hidden_b, pooling, (scale * a)[None])),
        (a * b).sum() / norms,
    )


@dataclass(frozen=True)
class ClassifierHead:
    """BertForSequenceClassification's head: logits = W_c·tanh(W_p·h_CLS + b_p) + b_c."""

    pooler: Tensor  # (hidden, hidden)
    pooler_bias: Tensor | None
    classifier: Tensor  # (num_labels, hidden)
    classifier_bias: Tensor | None
    id2label: Mapping[int, str] | None = None

    @classmethod
    def of(cls, weights: AdditiveWeights, id2label: Mapping[int, str] | None = None
           ) -> "ClassifierHead":
        if weights.pooler is None or weights.classifier is None:
            raise HeadTargetError("this model has no sequence-classification head: "
                                  "label targets need one (BertForSequenceClassification)")
        return cls(weights.pooler, weights.pooler_bias, weights.classifier,
                   weights.classifier_bias, id2label)

    @property
    def num_labels(self) -> int:
        return self.classifier.shape[0]

    def allowed(self) -> str:
        allowed = f"0 to {self.num_labels - 1}"
        if self.id2label:
            names = ", ".join(f"{i}: {self.id2label[i]!r}" for i in sorted(self.id2label))
            allowed += f" ({names})"
        return allowed

    def index(self, label: int | str) -> int:
        """A label's row: its index, or its name in ``id2label``."""
        if isinstance(label, str):
            by_name = {name: int(i) for i, name in (self.id2label or {}).items()}
            if label not in by_name:
                raise HeadTargetError(f"unknown label {label!r}; allowed: {self.allowed()}")
            return by_name[label]
        if isinstance(label, bool) or not isinstance(label, int):
            raise HeadTargetError(f"label must be a whole number or a label name, got {label!r}")
        if not 0 <= label < self.num_labels:
            raise HeadTargetError(f"label {label} is out of range: the classifier has "
                                  f"{self.num_labels} labels, allowed {self.allowed()}")
        return label


def label_seed(hidden: Tensor, label: int | str | Sequence[int | str], head: ClassifierHead
               ) -> HiddenSeed:
    """{"label": i}: logit_i; ∂z = W_c[i] ⊙ tanh(z)/z at z = W_p·h_CLS + b_p, ∂h_CLS = ∂z·W_p;
    the biases keep Σ b_p ⊙ ∂z + b_c[i]."""
    labels = list(label) if isinstance(label, (list, tuple)) else [label]
    if not labels:
        raise HeadTargetError(f"no label given; allowed: {head.allowed()}")
    rows = torch.tensor([head.index(item) for item in labels], device=hidden.device)
    cls = hidden[0].float()
    pre = cls @ head.pooler.float().T
    if head.pooler_bias is not None:
        pre = pre + head.pooler_bias.float()
    grad_pooled = head.classifier.float()[rows]  # (B, hidden)
    grad_pre = tanh_identity_rule(grad_pooled, pre[None])
    kept = torch.zeros(len(labels), device=hidden.device)
    if head.pooler_bias is not None:
        kept += bias_relevance(grad_pre, head.pooler_bias)
    if head.classifier_bias is not None:
        kept += head.classifier_bias.float()[rows]
    grad = torch.zeros(len(labels), *hidden.shape, device=hidden.device)
    grad[:, 0] = grad_pre @ head.pooler.float()
    return HiddenSeed(grad, kept)


def parse_encoder_target(target: Any) -> tuple[str, Any]:
    """Check an encoder target's shape: exactly one of ``ENCODER_TARGETS`` → (kind, value)."""
    if not isinstance(target, Mapping) or len(target) != 1 or \
            next(iter(target)) not in ENCODER_TARGETS:
        raise HeadTargetError(f"unknown encoder target {target!r}; allowed: {TARGET_HELP}")
    kind, value = next(iter(target.items()))
    return kind, value
