"""What a model file of the additive-position family declares (BERT, RoBERTa, GPT-2), and the
shared code that turns a declaration into the additive engine's weights (``engine/additive.py``).

The counterpart of ``base.Architecture`` (rotary decoders): an ``AdditiveArchitecture`` has
- ``spec``: its Hugging Face config → the engine's ``AdditiveSpec``;
- ``hf`` / ``vllm``: ``AdditiveNames``, the parameter names of each layout by engine field (a
  tuple of fields names one packed tensor: vLLM's ``qkv_proj``, GPT-2's ``c_attn``: q, k, v
  rows); GPT-2's Hugging Face Conv1D weights are stored (in, out) and enter as ``.T`` views.
Both classes carry ``kind`` ("decoder" / "additive"), so a caller of ``architecture_for`` can
tell which engine explains the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Mapping

from torch import Tensor

from ..engine.additive import (
    ADDITIVE_FIELDS,
    ADDITIVE_LAYER_FIELDS,
    AdditiveLayerWeights,
    AdditiveSpec,
    AdditiveWeights,
)
from ..engine.spec import UnsupportedModelError
from .base import layer_from_state

LayerNames = Mapping[str | tuple[str, ...], str]


@dataclass(frozen=True)
class AdditiveNames:
    """Parameter names of one layout (Hugging Face or vLLM) by engine field.

    ``top``: ``AdditiveWeights`` field → full name; ``layer``: ``AdditiveLayerWeights`` field (or
    a tuple of fields: one tensor packed by rows) → name inside layer i, whose prefix is
    ``layers.format(i=i)``; ``transposed``: the 2-D layer weights are stored (in, out) (HF's
    Conv1D); ``optional``: top fields a checkpoint may lack (then None); ``tied``: a field that
    defaults to another field's tensor when absent (GPT-2's lm_head → the word embeddings).
    """

    top: Mapping[str, str]
    layer: LayerNames
    layers: str
    transposed: bool = False
    optional: frozenset[str] = frozenset()
    tied: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [f for f in self.top if f not in ADDITIVE_FIELDS]
        unknown += [f for fs in self.layer for f in ((fs,) if isinstance(fs, str) else fs)
                    if f not in ADDITIVE_LAYER_FIELDS]
        if unknown:
            raise ValueError(f"no engine fields named {', '.join(unknown)}")

    def prefixed(self, prefix: str, **extra_top: str) -> "AdditiveNames":
        """The same backbone under ``prefix`` (``bert.``), plus top fields named in full
        (a classifier beside the backbone)."""
        top = {name: prefix + path for name, path in self.top.items()}
        return replace(self, top={**top, **extra_top}, layers=prefix + self.layers)

    def with_optional(self, *fields: str) -> "AdditiveNames":
        return replace(self, optional=self.optional | frozenset(fields))


def additive_weights_from_state(
    state: Mapping[str, Tensor], spec: AdditiveSpec, names: AdditiveNames,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> AdditiveWeights:
    """``AdditiveWeights`` from parameters by name; packed tensors are split into row views,
    (in, out) weights transposed as views: nothing is copied."""
    layers = [layer_from_state(state, names.layers.format(i=index), names.layer,
                               AdditiveLayerWeights,
                               lambda field: spec.num_heads * spec.head_dim,  # q, k, v alike
                               f"{spec.num_heads} heads of dim {spec.head_dim}", names.transposed)
              for index in range(spec.num_layers)]
    top: dict[str, Tensor | None] = {}
    for name, path in names.top.items():
        if path in state:
            top[name] = state[path]
        elif name in names.tied and names.tied[name] in names.top:
            top[name] = state.get(names.top[names.tied[name]])
        elif name in names.optional:
            top[name] = None
        else:
            raise UnsupportedModelError(f"the checkpoint has no parameter {path}")
    if spec.num_labels and (top.get("classifier") is None or top.get("pooler") is None):
        raise UnsupportedModelError("a sequence classifier needs its pooler and classifier "
                                    "weights")
    return AdditiveWeights(spec=spec, layers=layers, all_reduce=all_reduce, **top)


@dataclass(frozen=True)
class AdditiveArchitecture:
    """One additive-position architecture's declaration (see the module docstring)."""

    kind: ClassVar[str] = "additive"
    names: tuple[str, ...]  # Hugging Face ``architectures`` names
    spec: Callable[[Any, int], AdditiveSpec]  # (config, tensor_parallel_size) → spec
    hf: AdditiveNames
    vllm: AdditiveNames
    blocks: tuple[str, ...] = ()  # the shared blocks it uses, for the docs
    # configs that name no architectures: their ``model_type`` → one of ``names``
    model_types: Mapping[str, str] = field(default_factory=dict)

    @property
    def decoder(self) -> str:
        """Where a rotary decoder keeps its layers (``base.Architecture.decoder``): callers of the
        rotary-decoder path (the vLLM recorder) reach this and get the registry's error."""
        raise UnsupportedModelError(
            f"{self.names[0]} is an additive-position model: the rotary-decoder path does not "
            "explain it (vllm_pelrp.engine.additive does)")

    def weights_from_hf(self, model: Any) -> AdditiveWeights:
        """Views of a Hugging Face model's parameters (no copies)."""
        state = {name: p.detach() for name, p in model.named_parameters()}
        return additive_weights_from_state(state, self.spec(model.config, 1), self.hf)

    def weights_from_vllm(self, state: Mapping[str, Tensor], spec: AdditiveSpec,
                          all_reduce: Callable[[Tensor], Tensor] | None = None
                          ) -> AdditiveWeights:
        """From vLLM's parameters by name (this rank's shards; the vocabulary gathered)."""
        return additive_weights_from_state(state, spec, self.vllm, all_reduce=all_reduce)


def split_heads(tensor_parallel_size: int, heads: int, intermediate: int) -> tuple[int, int]:
    """Per-rank head count and MLP width; ``UnsupportedModelError`` if they do not split."""
    tp = tensor_parallel_size
    if heads % tp or intermediate % tp:
        raise UnsupportedModelError(
            f"{heads} heads / intermediate size {intermediate} do not split over {tp} ranks")
    return heads // tp, intermediate // tp


GELU_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                    "gelu_fast": "gelu_tanh"}


def activation_of(config: Any, name: str) -> str:
    """The engine's activation for a config's activation field (erf GELU or GELU-tanh)."""
    value = getattr(config, name, "gelu")
    if value not in GELU_ACTIVATIONS:
        raise UnsupportedModelError(f"{name}={value!r} is not supported; supported: "
                                    f"{', '.join(GELU_ACTIVATIONS)}")
    return GELU_ACTIVATIONS[value]
