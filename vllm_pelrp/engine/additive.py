"""PA-LRP for models whose positions enter as an additive table: BERT-family encoders (post-LN,
bidirectional) and GPT-2-family decoders (pre-LN, causal).

Each position's input is the sum x_t = E[token_t] + P[pos_t] (+ T[type_t]) of the word embedding,
a position embedding (a trained table: BERT ``position_embeddings``, GPT-2 ``wpe``, RoBERTa's with
its offset; or a fixed sinusoidal table: ``position_kind="absolute"``) and, in BERT, a token-type
embedding. The ε-rule on that sum is exact in gradient×input form: with g the modified gradient
at x, R(E) = E ⊙ g, R(P) = P ⊙ g, R(T) = T ⊙ g.

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
gradient; a bias keeps Σ b ⊙ ∂z); attention by AttnLRP (uniform rule on A·V and Q·Kᵀ, the
softmax's own gradient; ``rules.py``), applied on explicit per-head T×T probabilities.

Conservation (every mode, every target row b)::

    target = Σ token + Σ positional + Σ token_type + Σ_l softmax_absorbed[l] + Σ_l bias_absorbed[l]
             + embedding_bias_absorbed + head_bias_absorbed

``bias_absorbed[l]``: the biases of layer l (q, k, v, o, MLP up/down and both LayerNorm β);
``embedding_bias_absorbed``: the embedding LayerNorm's β (BERT; 0 for GPT-2);
``head_bias_absorbed``: what sits after the last layer: GPT-2's ln_f β, and the head biases a
``HiddenSeed`` carries (pooler and classifier, ``heads.py``).

Tensor parallelism: like ``ModelWeights``, ``AdditiveWeights.all_reduce`` sums across ranks;
each rank holds a slice of heads (column-parallel q/k/v, row-parallel o) and of the MLP (up
rows, down columns). The forward sums the row-parallel outputs before their (replicated) bias;
the backward sums the partial gradients of the replicated residual stream, and at the end the
per-rank parts of what the softmax and the sharded biases (q, k, v, up) absorbed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..kernels.attention_lrp import attention_forward_for_lrp, attention_lrp_backward
from .backward import MODES, LogitSeeds
from .blocks import (
    attention_softmax_loss,
    gelu,
    gelu_backward,
    layer_norm,
    layer_norm_backward,
    linear,
    linear_backward,
)
from .rules import additive_embedding_rule
from .spec import UnsupportedModelError

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


@dataclass(frozen=True)
class HiddenSeed:
    """A target given at the final hidden states (HF's ``last_hidden_state``): the seed gradient
    (B, T, hidden) and what the head's own biases keep (B,) (None: no head biases). Row b's
    target is Σ final_hidden ⊙ gradient[b] + head_bias[b]."""

    gradient: Tensor
    head_bias: Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.gradient.shape[0]


@dataclass
class AdditiveRelevance:
    """Relevance of one input for B target rows, fp32 (see the module docstring for the modes
    and the conservation).

    ``token`` (B, T); ``positional`` (B, T): Σ_d R(P[t]) (0 outside pa-lrp); ``token_type``
    (B, T): Σ_d R(T[type_t]) in pa-lrp, 0 in the other modes, None for a model without token
    types; ``target`` (B,); ``softmax_absorbed`` and ``bias_absorbed`` (B, L);
    ``embedding_bias_absorbed`` and ``head_bias_absorbed`` (B,).
    """

    token: Tensor
    positional: Tensor
    token_type: Tensor | None
    target: Tensor
    softmax_absorbed: Tensor
    bias_absorbed: Tensor
    embedding_bias_absorbed: Tensor
    head_bias_absorbed: Tensor

    @property
    def input_relevance(self) -> Tensor:
        """Σ over positions of token + positional + token-type relevance, (B,)."""
        total = self.token.sum(-1) + self.positional.sum(-1)
        return total if self.token_type is None else total + self.token_type.sum(-1)

    @property
    def absorbed(self) -> Tensor:
        """All that the softmax rule and the biases keep, (B,)."""
        return (self.softmax_absorbed.sum(-1) + self.bias_absorbed.sum(-1)
                + self.embedding_bias_absorbed + self.head_bias_absorbed)


# ---- the input: word + position (+ token type) --------------------------------------------------
def sinusoidal_positions(num_positions: int, dim: int, base: float = 10000.0,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """Fixed absolute table (Vaswani et al.): P[t, 2i] = sin(t/base^(2i/d)), P[t, 2i+1] = cos(…)."""
    positions = torch.arange(num_positions, dtype=torch.float64)[:, None]
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(positions * inv_freq)
    table[:, 1::2] = torch.cos(positions * inv_freq)[:, : dim // 2]
    return table.to(dtype)


@dataclass
class EmbeddingParts:
    """The addends of the first layer's input, each (T, hidden); ``token_type`` None without."""

    word: Tensor
    position: Tensor
    token_type: Tensor | None

    def total(self) -> Tensor:
        """x = E + T + P in HF's order (BERT adds the token type first)."""
        total = self.word if self.token_type is None else self.word + self.token_type
        return total + self.position


def default_positions(spec: AdditiveSpec, length: int, device=None) -> Tensor:
    """Table rows of positions 0…T−1: ``arange(T) + position_offset``."""
    return torch.arange(length, device=device) + spec.position_offset


def embedding_parts(weights: AdditiveWeights, input_ids: Tensor,
                    token_type_ids: Tensor | None = None,
                    positions: Tensor | None = None) -> EmbeddingParts:
    """Look up the addends; ``positions`` (T,) are table rows (default: ``default_positions``)."""
    spec = weights.spec
    device = weights.device
    input_ids = torch.as_tensor(input_ids, device=device)
    if input_ids.dim() != 1 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be one non-empty sequence (T,), got shape "
                         f"{tuple(input_ids.shape)}")
    length = input_ids.shape[0]
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= spec.vocab_size:
        raise ValueError(f"token ids must lie in [0, {spec.vocab_size})")
    positions = (default_positions(spec, length, device) if positions is None
                 else torch.as_tensor(positions, device=device))
    if positions.shape != (length,):
        raise ValueError(f"positions must have shape ({length},), got {tuple(positions.shape)}")
    table = weights.position_embeddings
    if table is None:
        if spec.position_kind != "absolute":
            raise ValueError("learned positions need the position table in the weights")
        table = sinusoidal_positions(int(positions.max()) + 1, spec.hidden_size,
                                     dtype=weights.dtype).to(device)
    elif int(positions.max()) >= table.shape[0] or int(positions.min()) < 0:
        usable = table.shape[0] - spec.position_offset
        raise ValueError(f"{length} tokens exceed the model's {usable} positions")
    token_type = None
    if weights.token_type_embeddings is not None:
        if token_type_ids is None:
            token_type_ids = torch.zeros(length, dtype=torch.long, device=device)
        token_type_ids = torch.as_tensor(token_type_ids, device=device)
        if token_type_ids.shape != (length,):
            raise ValueError(f"token_type_ids must have shape ({length},), got "
                             f"{tuple(token_type_ids.shape)}")
        types = weights.token_type_embeddings.shape[0]
        if int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= types:
            raise ValueError(f"token type ids must lie in [0, {types})")
        token_type = weights.token_type_embeddings[token_type_ids]
    elif token_type_ids is not None and bool((torch.as_tensor(token_type_ids) != 0).any()):
        raise ValueError("this model has no token-type embedding; token_type_ids must be 0")
    return EmbeddingParts(weights.word_embeddings[input_ids], table[positions], token_type)


# ---- one layer ---------------------------------------------------------------------------------
@dataclass
class _LayerCache:
    """Forward quantities of one layer that its backward needs."""

    queries: Tensor  # (T, H, D)
    keys: Tensor
    values: Tensor
    attention_output: Tensor  # (T, H, D), and its per-row log-sum-exp (None off the CPU)
    attention_logsumexp: Tensor | None
    inv_std_attention: Tensor  # (T, 1) of the attention LayerNorm (before: pre; after: post)
    up: Tensor  # MLP pre-activation (T, I)
    inv_std_mlp: Tensor


def layer_forward(weights: AdditiveWeights, index: int, x: Tensor
                  ) -> tuple[Tensor, _LayerCache]:
    """One layer, x (T, hidden) → y (T, hidden) and what its backward needs.

    post (BERT): h = LN₁(x + O·attn(x)); y = LN₂(h + W₂·act(W₁h + b₁) + b₂).
    pre (GPT-2): h = x + O·attn(LN₁(x)); y = h + W₂·act(W₁·LN₂(h) + b₁) + b₂.
    """
    spec = weights.spec
    layer = weights.layers[index]
    eps = spec.layer_norm_eps
    length = x.shape[0]
    pre = spec.norm_placement == "pre"
    if pre:
        attention_in, inv_std_attention = layer_norm(x, layer.attention_norm,
                                                     layer.attention_norm_bias, eps)
    else:
        attention_in = x
    queries = linear(attention_in, layer.q_proj, layer.q_bias).view(length, -1, spec.head_dim)
    keys = linear(attention_in, layer.k_proj, layer.k_bias).view(length, -1, spec.head_dim)
    values = linear(attention_in, layer.v_proj, layer.v_bias).view(length, -1, spec.head_dim)
    # the fused kernel (no T×T tensor), causal (GPT-2) or bidirectional (BERT)
    attention_output, logsumexp = attention_forward_for_lrp(
        queries, keys, values, causal=spec.causal, scale=spec.layer_scale(index))
    attention_output = attention_output.to(values.dtype)
    attended = weights.reduce(linear(attention_output.reshape(length, -1), layer.o_proj))
    if layer.o_bias is not None:
        attended = attended + layer.o_bias
    if pre:
        hidden = x + attended
        mlp_in, inv_std_mlp = layer_norm(hidden, layer.mlp_norm, layer.mlp_norm_bias, eps)
    else:
        hidden, inv_std_attention = layer_norm(x + attended, layer.attention_norm,
                                               layer.attention_norm_bias, eps)
        mlp_in = hidden
    up = linear(mlp_in, layer.up_proj, layer.up_bias)
    mlp = weights.reduce(linear(gelu(up, spec.activation == "gelu_tanh"), layer.down_proj))
    if layer.down_bias is not None:
        mlp = mlp + layer.down_bias
    if pre:
        output = hidden + mlp
    else:
        output, inv_std_mlp = layer_norm(hidden + mlp, layer.mlp_norm, layer.mlp_norm_bias, eps)
    return output, _LayerCache(queries, keys, values, attention_output, logsumexp,
                               inv_std_attention, up, inv_std_mlp)


def _attention_backward(cache: _LayerCache, grad_attended: Tensor, scale: float, causal: bool,
                        value_share: float, absorbed: Tensor
                        ) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """∂ at the attention output (B, T, H, D) → ∂ at q, k, v (B, T, H, D each, fp32) through the
    fused attention-LRP backward (``kernels/attention_lrp.py``: AttnLRP's rules as constant
    factors on the plain backward, no T×T tensor); adds the softmax rule's loss into
    ``absorbed`` (B,)."""
    grad_queries, grad_keys, grad_values = attention_lrp_backward(
        cache.queries, cache.keys, cache.values, grad_attended, value_share, causal=causal,
        scale=scale, output=cache.attention_output, logsumexp=cache.attention_logsumexp)
    if grad_queries is not None:
        absorbed += attention_softmax_loss(cache.queries, cache.keys, cache.values,
                                           grad_queries, grad_keys, grad_values)
    return grad_queries, grad_keys, grad_values


def layer_backward(weights: AdditiveWeights, index: int, cache: _LayerCache, grad_output: Tensor,
                   mode: str, absorbed: Tensor, sharded_bias: Tensor, replicated_bias: Tensor
                   ) -> Tensor:
    """Modified gradient at the layer output (B, T, hidden) → at its input, fp32.

    Adds the softmax rule's loss into ``absorbed`` (B,), what the sharded biases (q, k, v, up)
    keep into ``sharded_bias`` and what the replicated ones (o, down, LayerNorm β) keep into
    ``replicated_bias`` (B,).
    """
    spec = weights.spec
    layer = weights.layers[index]
    pre = spec.norm_placement == "pre"
    rows, length = grad_output.shape[:2]
    # MLP (pre: y = h + m; post: y = LN₂(h + m)), m = W₂·act(W₁·in + b₁) + b₂
    grad_sum = grad_output if pre else layer_norm_backward(
        grad_output, cache.inv_std_mlp, layer.mlp_norm, layer.mlp_norm_bias, replicated_bias)
    grad_act = linear_backward(grad_sum, layer.down_proj, layer.down_bias, replicated_bias)
    grad_up = gelu_backward(grad_act, cache.up, spec.activation == "gelu_tanh")
    grad_mlp_in = weights.reduce(linear_backward(grad_up, layer.up_proj, layer.up_bias,
                                                 sharded_bias))
    if pre:
        grad_hidden = grad_sum + layer_norm_backward(grad_mlp_in, cache.inv_std_mlp,
                                                     layer.mlp_norm, layer.mlp_norm_bias,
                                                     replicated_bias)
        grad_attention_sum = grad_hidden
    else:
        grad_hidden = grad_sum + grad_mlp_in
        grad_attention_sum = layer_norm_backward(grad_hidden, cache.inv_std_attention,
                                                 layer.attention_norm, layer.attention_norm_bias,
                                                 replicated_bias)
    # attention (pre: h = x + a; post: h = LN₁(x + a)), a = O·attn(q, k, v) + b_o
    grad_attended = linear_backward(grad_attention_sum, layer.o_proj, layer.o_bias,
                                    replicated_bias)
    grad_attended = grad_attended.view(rows, length, -1, spec.head_dim)
    value_share = 1.0 if mode == "cp-lrp" else 0.5
    grad_q, grad_k, grad_v = _attention_backward(cache, grad_attended, spec.layer_scale(index),
                                                 spec.causal, value_share, absorbed)
    grad_in = linear_backward(grad_v.reshape(rows, length, -1), layer.v_proj, layer.v_bias,
                              sharded_bias)
    if grad_q is not None:
        grad_in += linear_backward(grad_q.reshape(rows, length, -1), layer.q_proj, layer.q_bias,
                                   sharded_bias)
        grad_in += linear_backward(grad_k.reshape(rows, length, -1), layer.k_proj, layer.k_bias,
                                   sharded_bias)
    grad_in = weights.reduce(grad_in)
    if pre:
        grad_in = layer_norm_backward(grad_in, cache.inv_std_attention, layer.attention_norm,
                                      layer.attention_norm_bias, replicated_bias)
    return grad_attention_sum + grad_in


# ---- forward over the model ----------------------------------------------------------------------
@dataclass
class AdditiveForward:
    """What a forward leaves: the input's addends, the first layer's input, every layer's cache,
    the last layer's output and the final hidden states (HF's ``last_hidden_state``: after ln_f
    for GPT-2)."""

    parts: EmbeddingParts
    layer_input: Tensor
    embedding_inv_std: Tensor | None
    caches: list[_LayerCache]
    last_layer_output: Tensor
    final_hidden: Tensor
    final_inv_std: Tensor | None


@torch.no_grad()
def run_forward(weights: AdditiveWeights, input_ids: Tensor, token_type_ids: Tensor | None = None,
                positions: Tensor | None = None) -> AdditiveForward:
    """Plain forward of one sequence, keeping each layer's backward cache."""
    spec = weights.spec
    parts = embedding_parts(weights, input_ids, token_type_ids, positions)
    hidden = parts.total()
    embedding_inv_std = None
    if spec.norm_placement == "post":
        if weights.embedding_norm is None:
            raise UnsupportedModelError("a post-LN model needs its embedding LayerNorm")
        hidden, embedding_inv_std = layer_norm(hidden, weights.embedding_norm,
                                               weights.embedding_norm_bias, spec.layer_norm_eps)
    layer_input = hidden
    caches = []
    for index in range(spec.num_layers):
        hidden, cache = layer_forward(weights, index, hidden)
        caches.append(cache)
    final_hidden, final_inv_std = hidden, None
    if weights.final_norm is not None:
        final_hidden, final_inv_std = layer_norm(hidden, weights.final_norm,
                                                 weights.final_norm_bias, spec.layer_norm_eps)
    return AdditiveForward(parts, layer_input, embedding_inv_std, caches, hidden, final_hidden,
                           final_inv_std)


def encoder_forward(weights: AdditiveWeights, input_ids: Tensor,
                    token_type_ids: Tensor | None = None,
                    positions: Tensor | None = None) -> Tensor:
    """Final hidden states (T, hidden) of one sequence (HF's ``last_hidden_state``)."""
    return run_forward(weights, input_ids, token_type_ids, positions).final_hidden


def lm_logits(weights: AdditiveWeights, final_hidden: Tensor) -> Tensor:
    """LM logits (T, V) from the final hidden states (GPT-2: tied to the word embeddings)."""
    if weights.lm_head is None:
        raise ValueError("this model has no LM head")
    return (final_hidden @ weights.lm_head.T).float()


# ---- backward over the model -------------------------------------------------------------------
def _logit_seed_gradient(weights: AdditiveWeights, final_hidden: Tensor, seeds: LogitSeeds
                         ) -> tuple[Tensor, Tensor]:
    """Seed gradient at the final hidden states for each row of LM logits, and the targets."""
    if weights.lm_head is None:
        raise ValueError("logit targets need an LM head; this model has none (give a "
                         "HiddenSeed or a seed gradient at the final hidden states)")
    device = final_hidden.device
    positions = seeds.positions.to(device)
    length = final_hidden.shape[0]
    if positions.numel() and (int(positions.max()) >= length or int(positions.min()) < 0):
        raise ValueError(f"a target position lies outside the input's {length} tokens")
    token_ids = seeds.token_ids.to(device)
    if token_ids.numel() and (int(token_ids.max()) >= weights.lm_head.shape[0]
                              or int(token_ids.min()) < 0):
        raise ValueError(f"target token ids must lie in [0, {weights.lm_head.shape[0]})")
    seed_weights = seeds.weights.to(device).float()
    rows_of_head = weights.lm_head[token_ids].float()  # (B, K, hidden)
    logits = (final_hidden[positions].float() * rows_of_head).sum(-1)
    target = (logits * seed_weights).sum(-1)
    grad = torch.zeros(seeds.num_rows, *final_hidden.shape, device=device)
    grad.scatter_add_(1, positions[..., None].expand_as(rows_of_head),
                      rows_of_head * seed_weights[..., None])
    return grad, target


def relevance_from_forward(weights: AdditiveWeights, forward: AdditiveForward,
                           seed: LogitSeeds | HiddenSeed | Tensor, mode: str = "pa-lrp",
                           checkpoint: Callable[[], None] | None = None,
                           row_chunk: int | None = None) -> AdditiveRelevance:
    """The backward from a ``run_forward`` of the same input: see ``additive_relevance``.

    As in the rotary engine, the target rows go through the layers ``row_chunk`` at a time
    (rows are independent: the result is the same; the gradients alive are one chunk's), and
    ``checkpoint`` is called after each chunk's pass through a layer: it may raise to cancel the
    job, or hand the worker to a waiting explanation (``serving/scheduler.py``)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    spec = weights.spec
    device = weights.device
    final_hidden = forward.final_hidden
    head_bias = None
    if isinstance(seed, LogitSeeds):
        grad, target = _logit_seed_gradient(weights, final_hidden, seed)
    else:
        if isinstance(seed, HiddenSeed):
            seed, head_bias = seed.gradient, seed.head_bias
        grad = torch.as_tensor(seed, device=device).float()
        if grad.dim() != 3 or grad.shape[1:] != final_hidden.shape:
            raise ValueError(f"a seed gradient must be (B, {final_hidden.shape[0]}, "
                             f"{final_hidden.shape[1]}), got {tuple(grad.shape)}")
        target = (grad * final_hidden.float()).flatten(1).sum(-1)
    rows = grad.shape[0]
    head_kept = torch.zeros(rows, device=device)
    if head_bias is not None:
        head_bias = torch.as_tensor(head_bias, device=device).float().reshape(rows)
        head_kept += head_bias
        target = target + head_bias
    if weights.final_norm is not None:  # pre-LN: back through ln_f; its β is the head's
        grad = layer_norm_backward(grad, forward.final_inv_std, weights.final_norm,
                                   weights.final_norm_bias, head_kept)
    absorbed = torch.zeros(rows, spec.num_layers, device=device)
    sharded = torch.zeros(rows, spec.num_layers, device=device)
    replicated = torch.zeros(rows, spec.num_layers, device=device)
    step = rows if not row_chunk else max(1, int(row_chunk))
    chunks = []
    for start in range(0, rows, step):
        part = slice(start, start + step)
        chunk = grad[part]
        for index in reversed(range(spec.num_layers)):
            chunk = layer_backward(weights, index, forward.caches[index], chunk, mode,
                                   absorbed[part, index], sharded[part, index],
                                   replicated[part, index])
            if checkpoint is not None:
                checkpoint()
        chunks.append(chunk)
    grad = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    embedding_kept = torch.zeros(rows, device=device)
    if spec.norm_placement == "post":
        grad = layer_norm_backward(grad, forward.embedding_inv_std, weights.embedding_norm,
                                   weights.embedding_norm_bias, embedding_kept)
    parts = forward.parts
    word, position, token_type = additive_embedding_rule(grad, parts.word, parts.position,
                                                         parts.token_type)
    if mode != "pa-lrp":  # all of R(x_t) is the token's
        word = word + position if token_type is None else word + position + token_type
        position = torch.zeros_like(word)
        token_type = None if token_type is None else torch.zeros_like(word)
    return AdditiveRelevance(
        token=word, positional=position, token_type=token_type, target=target,
        softmax_absorbed=weights.reduce(absorbed),
        bias_absorbed=weights.reduce(sharded) + replicated,
        embedding_bias_absorbed=embedding_kept, head_bias_absorbed=head_kept,
    )


@torch.no_grad()
def additive_relevance(weights: AdditiveWeights, input_ids: Tensor,
                       seed: LogitSeeds | HiddenSeed | Tensor, mode: str = "pa-lrp",
                       token_type_ids: Tensor | None = None, positions: Tensor | None = None,
                       forward: AdditiveForward | None = None,
                       row_chunk: int | None = None) -> AdditiveRelevance:
    """PA-LRP relevance of one sequence ``input_ids`` (T,) for B target rows.

    ``seed``: ``LogitSeeds`` (LM logits through ln_f and the LM head, GPT-2), a ``HiddenSeed``
    (a head's seed gradient at the final hidden states and its biases' share, ``heads.py``) or a
    plain seed gradient (B, T, hidden) at the final hidden states. ``token_type_ids`` (T,)
    (default 0), ``positions`` (T,): rows of the position table (default ``arange(T)`` plus the
    spec's offset). ``forward``: a ``run_forward`` of the same input, reused. ``row_chunk``:
    rows per pass through the layers (``relevance_from_forward``).
    """
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
    "AdditiveSpec", "AdditiveLayerWeights", "AdditiveWeights", "AdditiveRelevance",
    "AdditiveForward", "HiddenSeed", "EmbeddingParts", "LogitSeeds", "MODES",
    "additive_relevance", "relevance_from_forward", "run_forward", "encoder_forward",
    "lm_logits", "sequence_classification_logits", "sinusoidal_positions", "embedding_parts",
    "default_positions",
]
