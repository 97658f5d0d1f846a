"""PA-LRP for models whose positions enter as an additive table: BERT-family encoders (post-LN,
bidirectional) and GPT-2-family decoders (pre-LN, causal): the description of their weights
(``AdditiveSpec``, ``AdditiveWeights``), its blocks (``additive_model``) and the entry points,
all through the one driver (``driver.py``).

Each position's input is the sum x_t = E[token_t] + P[pos_t] (+ T[type_t]) of the word embedding,
a position embedding (a trained table: BERT ``position_embeddings``, GPT-2 ``wpe``, RoBERTa's with
its offset; or a fixed sinusoidal table: ``position_kind="absolute"``) and, in BERT, a token-type
embedding (``embeddings.AdditiveEmbedding``).

Modes (``MODES``):
- ``pa-lrp``: the sum is split: token relevance Σ_d E ⊙ g, positional Σ_d P ⊙ g, token-type
  Σ_d T ⊙ g (booked apart);
- ``attnlrp``: all of R(x_t) = Σ_d x ⊙ g is the token's (positional and token-type 0);
- ``cp-lrp``: attention probabilities held constant (nothing through q/k); all to the token.
The backward is the same in ``pa-lrp`` and ``attnlrp`` (only the split at the input differs), so
pa-lrp's token + positional + token_type equals attnlrp's token at every position.

The other rules follow LXT 2.1 (``lxt.efficient.models.bert`` / ``gpt2``), so ``attnlrp`` equals
LXT's explanation: LayerNorm by the identity rule with σ held and the mean flowing (its β keeps
Σ β ⊙ ∂y); GELU (erf or tanh) by the identity rule; linear layers by the ε-rule (= the plain
gradient; a bias keeps Σ b ⊙ ∂z); attention by AttnLRP through the fused kernels (no T×T).

Conservation (every mode, every target row b)::

    target = Σ token + Σ position_embedding + Σ token_type + Σ_l softmax_absorbed[l]
             + Σ_l bias_absorbed[l] + embedding_bias_absorbed + head_bias_absorbed

``bias_absorbed[l]``: the biases of layer l (q, k, v, o, MLP up/down and both LayerNorm β);
``embedding_bias_absorbed``: the embedding LayerNorm's β (BERT; 0 for GPT-2);
``head_bias_absorbed``: what sits after the last layer: GPT-2's ln_f β, and the head biases a
``HiddenSeed`` carries (pooler and classifier, ``heads.py``).

Tensor parallelism: like ``ModelWeights``, ``AdditiveWeights.all_reduce`` sums across ranks;
each rank holds a slice of heads (column-parallel q/k/v, row-parallel o) and of the MLP (up
rows, down columns).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .attention import Attention
from .blocks import LayerNorm, PlainMLP, linear
from .driver import (
    DEFAULT_CACHE_BUDGET_BYTES,
    BlockModel,
    ForwardPass,
    Head,
    HiddenSeed,
    LogitSeeds,
    RelevanceResult,
    relevance,
    run_forward as run_block_forward,
)
from .embeddings import AdditiveEmbedding, sinusoidal_positions
from .layer import TransformerLayer
from .spec import UnsupportedModelError
from ..vocabulary import MODES

NORM_PLACEMENTS = ("post", "pre")
ADDITIVE_ACTIVATIONS = ("gelu", "gelu_tanh")
POSITION_KINDS = ("learned", "absolute")


@dataclass(frozen=True)
class AdditiveSpec:
    """Shapes and constants of an additive-position transformer (per tensor-parallel rank for
    heads and the MLP).

    ``norm_placement``: ``"post"`` (BERT: LayerNorm on the embedding sum and after each residual
    add) or ``"pre"`` (GPT-2: LayerNorm before attention and MLP, ``ln_f`` after the last layer).
    ``position_kind``: ``"learned"`` (a trained table) or ``"absolute"`` (a fixed sinusoidal
    table; computed from the spec when the weights hold none). Position t reads row
    ``t + position_offset`` of the table (RoBERTa: padding_idx + 1). ``type_vocab_size`` 0: no
    token-type embedding. ``num_labels``: rows of a sequence-classification head (0: none).
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    layer_norm_eps: float
    causal: bool
    norm_placement: str
    activation: str = "gelu"
    position_kind: str = "learned"
    position_offset: int = 0
    type_vocab_size: int = 0
    attention_scale: float | None = None  # None: 1/√head_dim
    scale_by_inverse_layer: bool = False  # GPT-2's scale_attn_by_inverse_layer_idx: / (l + 1)
    num_labels: int = 0

    def __post_init__(self) -> None:
        for name, value, allowed in (("norm_placement", self.norm_placement, NORM_PLACEMENTS),
                                     ("activation", self.activation, ADDITIVE_ACTIVATIONS),
                                     ("position_kind", self.position_kind, POSITION_KINDS)):
            if value not in allowed:
                raise UnsupportedModelError(f"{name} {value!r}; supported: {', '.join(allowed)}")

    def layer_scale(self, index: int) -> float:
        """The attention's score scale in layer ``index``."""
        scale = self.attention_scale if self.attention_scale is not None else self.head_dim ** -0.5
        return scale / (index + 1) if self.scale_by_inverse_layer else scale


@dataclass
class AdditiveLayerWeights:
    """One layer; projection weights are (out_features, in_features) as in nn.Linear (GPT-2's
    Conv1D weights enter as ``.T`` views). ``attention_norm`` / ``mlp_norm``: the LayerNorm
    after the attention / MLP residual add (post-LN, BERT) or before the attention / MLP (pre-LN,
    GPT-2's ln_1 / ln_2)."""

    q_proj: Tensor
    k_proj: Tensor
    v_proj: Tensor
    o_proj: Tensor
    attention_norm: Tensor
    up_proj: Tensor
    down_proj: Tensor
    mlp_norm: Tensor
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    v_bias: Tensor | None = None
    o_bias: Tensor | None = None
    attention_norm_bias: Tensor | None = None
    up_bias: Tensor | None = None
    down_bias: Tensor | None = None
    mlp_norm_bias: Tensor | None = None


ADDITIVE_LAYER_FIELDS = tuple(AdditiveLayerWeights.__dataclass_fields__)


@dataclass
class AdditiveWeights:
    """Everything the additive engine needs: views of the source tensors, nothing copied.

    ``position_embeddings`` None: a sinusoidal table computed from the spec (``absolute`` only).
    ``embedding_norm``: BERT's embedding LayerNorm; ``final_norm`` and ``lm_head``: GPT-2's
    ln_f and (tied) LM head; ``pooler`` and ``classifier``: BertForSequenceClassification's head.
    """

    spec: AdditiveSpec
    word_embeddings: Tensor
    position_embeddings: Tensor | None
    layers: list[AdditiveLayerWeights]
    token_type_embeddings: Tensor | None = None
    embedding_norm: Tensor | None = None
    embedding_norm_bias: Tensor | None = None
    final_norm: Tensor | None = None
    final_norm_bias: Tensor | None = None
    lm_head: Tensor | None = None
    pooler: Tensor | None = None
    pooler_bias: Tensor | None = None
    classifier: Tensor | None = None
    classifier_bias: Tensor | None = None
    all_reduce: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.word_embeddings.dtype

    @property
    def device(self) -> torch.device:
        return self.word_embeddings.device

    def reduce(self, tensor: Tensor) -> Tensor:
        return self.all_reduce(tensor) if self.all_reduce is not None else tensor


ADDITIVE_FIELDS = tuple(f for f in AdditiveWeights.__dataclass_fields__
                        if f not in ("spec", "layers", "all_reduce"))


# ---- the blocks ---------------------------------------------------------------------------------
def _identity(tensor: Tensor) -> Tensor:
    return tensor


def additive_embedding(weights: AdditiveWeights) -> AdditiveEmbedding:
    spec = weights.spec
    norm = None
    if spec.norm_placement == "post":
        if weights.embedding_norm is None:
            raise UnsupportedModelError("a post-LN model needs its embedding LayerNorm")
        norm = LayerNorm(weights.embedding_norm, weights.embedding_norm_bias,
                         spec.layer_norm_eps)
    return AdditiveEmbedding(weights.word_embeddings, weights.position_embeddings,
                             kind=spec.position_kind, position_offset=spec.position_offset,
                             token_type=weights.token_type_embeddings, norm=norm)


def additive_model(weights: AdditiveWeights) -> BlockModel:
    """The blocks of an additive-position model: word + position (+ type) embeddings (with
    BERT's LayerNorm), layers of LayerNorm, attention without a positional rule (causal or
    bidirectional, GPT-2's per-layer scale), a plain GELU MLP with biases, placed post-norm
    (BERT) or pre-norm (GPT-2), and the head: GPT-2's ln_f and tied LM head. Views of the
    weights, nothing copied."""
    spec = weights.spec
    eps = spec.layer_norm_eps
    reduce = weights.all_reduce or _identity
    layers = []
    for index, layer in enumerate(weights.layers):
        attention = Attention(layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj,
                              spec.head_dim, q_bias=layer.q_bias, k_bias=layer.k_bias,
                              v_bias=layer.v_bias, o_bias=layer.o_bias, causal=spec.causal,
                              scale=spec.layer_scale(index))
        mlp = PlainMLP(layer.up_proj, layer.up_bias, layer.down_proj, layer.down_bias,
                       spec.activation)
        layers.append(TransformerLayer(
            LayerNorm(layer.attention_norm, layer.attention_norm_bias, eps), attention,
            LayerNorm(layer.mlp_norm, layer.mlp_norm_bias, eps), mlp,
            placement=spec.norm_placement, reduce=reduce))
    final_norm = None
    if weights.final_norm is not None:
        final_norm = LayerNorm(weights.final_norm, weights.final_norm_bias, eps)
    return BlockModel(additive_embedding(weights), layers, Head(final_norm, weights.lm_head),
                      weights.dtype, weights.device, reduce, has_biases=True)


# ---- entry points ---------------------------------------------------------------------------------
def run_forward(weights: AdditiveWeights, input_ids: Tensor, token_type_ids: Tensor | None = None,
                positions: Tensor | None = None,
                cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
                checkpoint: Callable[[], None] | None = None) -> ForwardPass:
    """Plain forward of one sequence (``positions``: rows of the position table), keeping each
    layer's backward cache when all of them fit ``cache_budget_bytes``. Its ``final_hidden``
    is HF's ``last_hidden_state`` (after ln_f for GPT-2)."""
    return run_block_forward(additive_model(weights), input_ids, token_type_ids=token_type_ids,
                             embedding_positions=positions,
                             cache_budget_bytes=cache_budget_bytes, checkpoint=checkpoint)


def encoder_forward(weights: AdditiveWeights, input_ids: Tensor,
                    token_type_ids: Tensor | None = None,
                    positions: Tensor | None = None) -> Tensor:
    """Final hidden states (T, hidden) of one sequence (HF's ``last_hidden_state``)."""
    return run_forward(weights, input_ids, token_type_ids, positions, 0).final_hidden


def lm_logits(weights: AdditiveWeights, final_hidden: Tensor) -> Tensor:
    """LM logits (T, V) from the final hidden states (GPT-2: tied to the word embeddings)."""
    if weights.lm_head is None:
        raise ValueError("this model has no LM head")
    return (final_hidden @ weights.lm_head.T).float()


def relevance_from_forward(weights: AdditiveWeights, forward: ForwardPass,
                           seed: LogitSeeds | HiddenSeed | Tensor, mode: str = "pa-lrp",
                           checkpoint: Callable[[], None] | None = None,
                           row_chunk: int | None = None,
                           recompute_executor=None) -> RelevanceResult:
    """The backward from a ``run_forward`` of the same input (``driver.relevance``: its layer
    caches are used once, then freed; a second backward recomputes them)."""
    return relevance(additive_model(weights), forward.layer_inputs, forward.positions, seed,
                     mode, checkpoint, forward=forward, row_chunk=row_chunk,
                     recompute_executor=recompute_executor)


@torch.no_grad()
def additive_relevance(weights: AdditiveWeights, input_ids: Tensor,
                       seed: LogitSeeds | HiddenSeed | Tensor, mode: str = "pa-lrp",
                       token_type_ids: Tensor | None = None, positions: Tensor | None = None,
                       forward: ForwardPass | None = None,
                       row_chunk: int | None = None) -> RelevanceResult:
    """PA-LRP relevance of one sequence ``input_ids`` (T,) for B target rows.

    ``seed``: ``LogitSeeds`` (LM logits through ln_f and the LM head, GPT-2), a ``HiddenSeed``
    (a head's seed gradient at the final hidden states and its biases' share, ``heads.py``) or a
    plain seed gradient (B, T, hidden) at the final hidden states. ``token_type_ids`` (T,)
    (default 0), ``positions`` (T,): rows of the position table (default ``arange(T)`` plus the
    spec's offset). ``forward``: a ``run_forward`` of the same input, reused. ``row_chunk``:
    rows per slice of a layer."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    if forward is None:
        forward = run_forward(weights, input_ids, token_type_ids, positions)
    return relevance_from_forward(weights, forward, seed, mode, row_chunk=row_chunk)


def sequence_classification_logits(weights: AdditiveWeights, final_hidden: Tensor) -> Tensor:
    """BertForSequenceClassification: classifier(tanh(pooler(h_CLS))), (num_labels,)."""
    if weights.pooler is None or weights.classifier is None:
        raise ValueError("this model has no sequence-classification head")
    pooled = torch.tanh(linear(final_hidden[0], weights.pooler, weights.pooler_bias))
    return linear(pooled, weights.classifier, weights.classifier_bias).float()


__all__ = [
    "AdditiveSpec", "AdditiveLayerWeights", "AdditiveWeights", "ForwardPass", "HiddenSeed",
    "LogitSeeds", "MODES", "RelevanceResult", "additive_model",
    "additive_relevance", "relevance_from_forward", "run_forward", "encoder_forward",
    "lm_logits", "sequence_classification_logits", "sinusoidal_positions",
]
