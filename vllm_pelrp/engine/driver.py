"""The one driver of the relevance backward, for every model the engine runs.

A ``BlockModel`` is an embedding block, a list of layers (``layer.TransformerLayer``: norms,
attention, MLP) and a ``Head`` (the final norm, and the LM head where there is one). The model
files describe weights (``spec.py``, ``additive.py``); ``backward.rotary_model`` and
``additive.additive_model`` turn a description into blocks.

The driver keeps the input of every layer (the residual stream) and walks the layers from last
to first. For each layer it takes that layer's forward cache (kept by the forward when all of
them fit a budget), or recomputes it from the saved input, and applies the blocks' rules for all
targets (seed rows) at once, or ``row_chunk`` rows at a time. Peak memory beyond the weights is
the residual stream plus one layer's working set: no T×T tensor (the attention rules run fused).
Between slices of the work it calls ``checkpoint``, which may block (the fair scheduler) or raise
(cancellation). The recompute of the next layer can run on another thread
(``recompute_executor``), since it needs no relevance.

One result type for every family, ``RelevanceResult``. Conservation, per target row::

    target = Σ token + Σ positional + Σ token_type + Σ_l softmax_absorbed[l]
             + Σ_l bias_absorbed[l] + embedding_bias_absorbed + head_bias_absorbed
"""

from __future__ import annotations

from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .attention import Positions, Rotary
from .blocks import Norm, Sinks, tensor_bytes
from .layer import LayerCache, TransformerLayer
from ..vocabulary import MODES

# Starting from token ids, the forward's per-layer caches are kept if all of them fit in this
# budget (short inputs); beyond it the backward recomputes each layer from its saved input.
DEFAULT_CACHE_BUDGET_BYTES = 512 * 2**20


# ---- targets ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogitSeeds:
    """Targets of the backward: row b is Σₖ weights[b,k] · logit[positions[b,k], token_ids[b,k]].

    Padding entries have weight 0. All three tensors are (B, K)."""

    positions: Tensor
    token_ids: Tensor
    weights: Tensor
    max_position: int = -1  # the largest target position, known on the host (-1: none)
    max_token_id: int = -1  # the largest target token id, known on the host (-1: unknown)

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[tuple[int, int]]],
                  device: torch.device | str | None = None) -> "LogitSeeds":
        """Build from, per row, a list of (position, token_id) pairs (each with weight 1), on
        ``device`` (one copy of the pairs; nothing read back)."""
        if not rows or any(len(row) == 0 for row in rows):
            raise ValueError("every target row needs at least one (position, token_id) pair")
        if any(int(p) < 0 or int(t) < 0 for row in rows for p, t in row):
            raise ValueError("target positions and token ids must not be negative")
        width = max(len(row) for row in rows)
        padding = [[(0, 0)] * (width - len(row)) for row in rows]
        pairs = [list(row) + pad for row, pad in zip(rows, padding)]
        positions = torch.tensor([[int(p) for p, _ in row] for row in pairs], dtype=torch.long,
                                 device=device)
        token_ids = torch.tensor([[int(t) for _, t in row] for row in pairs], dtype=torch.long,
                                 device=device)
        weights = torch.tensor([[1.0] * len(row) + [0.0] * len(pad)
                                for row, pad in zip(rows, padding)], device=device)
        return cls(positions, token_ids, weights,
                   max(int(p) for row in rows for p, _ in row),
                   max(int(t) for row in rows for _, t in row))

    @property
    def num_rows(self) -> int:
        return self.positions.shape[0]


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


# ---- the result ---------------------------------------------------------------------------------
@dataclass
class RelevanceResult:
    """Raw relevance, fp32, one row per seed (see the module docstring for the conservation).

    ``token`` (B, T); ``positional_cos`` / ``positional_sin`` (B, L, T): RoPE's shares per layer
    ((B, 0, T) for a model without rotary positions); ``target_logit`` (B,): the target's value;
    ``softmax_absorbed`` (B, L): what the softmax rules drop; ``bias_absorbed`` (B, L): what the
    layers' biases keep (None: a model without biases); ``position_embedding`` (B, T): an
    additive position table's relevance, ``position_kind`` what the table is (``learned`` or
    ``absolute``); ``token_type`` (B, T): the token-type embedding's (BERT);
    ``embedding_bias_absorbed`` / ``head_bias_absorbed`` (B,): what the embedding's norm and
    the head (final norm, pooler, classifier) keep; ``pixel`` (B, C, H, W): an image's pixels'
    relevance (their sum over a patch is that patch's ``token`` relevance)."""

    token: Tensor
    positional_cos: Tensor
    positional_sin: Tensor
    target_logit: Tensor
    softmax_absorbed: Tensor
    bias_absorbed: Tensor | None = None
    position_embedding: Tensor | None = None
    position_kind: str | None = None
    token_type: Tensor | None = None
    embedding_bias_absorbed: Tensor | None = None
    head_bias_absorbed: Tensor | None = None
    pixel: Tensor | None = None

    @property
    def positional(self) -> Tensor:
        """Per position: Σ over layers of the cos and sin parts, plus an additive position
        table's relevance, (B, T)."""
        rotary = (self.positional_cos + self.positional_sin).sum(1)
        return rotary if self.position_embedding is None else rotary + self.position_embedding

    @property
    def input_relevance(self) -> Tensor:
        """Σ over positions of token + positional + token-type relevance, (B,)."""
        total = self.token.sum(-1) + self.positional.sum(-1)
        return total if self.token_type is None else total + self.token_type.sum(-1)

    @property
    def absorbed(self) -> Tensor:
        """All that the softmax rules and the biases keep, (B,)."""
        total = self.softmax_absorbed.sum(-1)
        for part in (self.bias_absorbed, self.embedding_bias_absorbed, self.head_bias_absorbed):
            if part is not None:
                total = total + (part.sum(-1) if part.dim() == 2 else part)
        return total

    def row(self, index: int) -> "RelevanceResult":
        """Row ``index`` as a one-row result."""
        return RelevanceResult(**{name: value[index:index + 1] if isinstance(value, Tensor)
                                  else value for name, value in vars(self).items()})


# ---- the head -----------------------------------------------------------------------------------
class Head:
    """After the last layer: the final norm (None: none, BERT) and the LM head (None: an
    encoder, whose targets come as ``HiddenSeed``s at the final hidden states)."""

    def __init__(self, final_norm: Norm | None = None, lm_head: Tensor | None = None) -> None:
        self.final_norm, self.lm_head = final_norm, lm_head

    def final_hidden(self, last_output: Tensor) -> tuple[Tensor, Tensor | None]:
        """HF's ``last_hidden_state`` (after the final norm) and the norm's 1/rms or 1/σ."""
        if self.final_norm is None:
            return last_output, None
        return self.final_norm.forward(last_output)

    def logits(self, last_output: Tensor) -> Tensor:
        """LM logits (T, V), fp32, from the last layer's output."""
        if self.lm_head is None:
            raise ValueError("this model has no LM head")
        return (self.final_hidden(last_output)[0] @ self.lm_head.T).float()

    def seed(self, last_output: Tensor, seed: LogitSeeds | HiddenSeed | Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
        """The seed gradient at the last layer's output (B, T, hidden) fp32, the target values
        (B,) and what the head's biases keep (B,)."""
        hidden, inv = self.final_hidden(last_output)
        device = last_output.device
        head_bias = None
        if isinstance(seed, LogitSeeds):
            grad, target = self._logit_gradient(hidden, seed)
        else:
            if isinstance(seed, HiddenSeed):
                seed, head_bias = seed.gradient, seed.head_bias
            grad = torch.as_tensor(seed, device=device).float()
            if grad.dim() != 3 or grad.shape[1:] != hidden.shape:
                raise ValueError(f"a seed gradient must be (B, {hidden.shape[0]}, "
                                 f"{hidden.shape[1]}), got {tuple(grad.shape)}")
            target = (grad * hidden.float()).flatten(1).sum(-1)
        kept = torch.zeros(grad.shape[0], device=device)
        if head_bias is not None:
            head_bias = torch.as_tensor(head_bias, device=device).float().reshape(-1)
            kept += head_bias
            target = target + head_bias
        if self.final_norm is not None:
            grad = self.final_norm.backward(grad, inv, kept)
        return grad, target, kept

    def _logit_gradient(self, hidden: Tensor, seeds: LogitSeeds) -> tuple[Tensor, Tensor]:
        if self.lm_head is None:
            raise ValueError("logit targets need an LM head; this model has none (give a "
                             "HiddenSeed or a seed gradient at the final hidden states)")
        length, vocab = hidden.shape[0], self.lm_head.shape[0]
        if seeds.max_position >= length:
            raise ValueError(f"a target position lies outside the input's {length} tokens")
        if seeds.max_token_id >= vocab:
            raise ValueError(f"target token ids must lie in [0, {vocab})")
        device = hidden.device
        positions = seeds.positions.to(device)
        seed_weights = seeds.weights.to(device).float()
        rows_of_head = self.lm_head[seeds.token_ids.to(device)].float()  # (B, K, hidden)
        logits = (hidden[positions].float() * rows_of_head).sum(-1)  # (B, K)
        grad = torch.zeros(seeds.num_rows, *hidden.shape, device=device)
        grad.scatter_add_(1, positions[..., None].expand_as(rows_of_head),
                          rows_of_head * seed_weights[..., None])
        return grad, (logits * seed_weights).sum(-1)


# ---- the model ----------------------------------------------------------------------------------
@dataclass
class BlockModel:
    """Blocks to run: ``embedding`` (``embeddings.py``), ``layers``, ``head``. ``reduce`` sums a
    tensor across tensor-parallel ranks (identity on one). ``has_biases``: whether any layer
    has a bias (else the result's ``bias_absorbed`` is None)."""

    embedding: Any
    layers: list[TransformerLayer]
    head: Head
    dtype: torch.dtype
    device: torch.device
    reduce: Callable[[Tensor], Tensor]
    has_biases: bool = False

    @property
    def rotaries(self) -> list[Rotary]:
        return [layer.attention.rotary for layer in self.layers
                if layer.attention.rotary is not None]

    def positions(self, positions: Tensor) -> Positions:
        """The layers' view of one input's positions (its RoPE tables made once)."""
        return Positions(positions.to(self.device), self.dtype, self.rotaries)


@dataclass
class ForwardPass:
    """What a plain forward leaves: every layer's input, the last layer's output, the final
    hidden states (after the head's final norm: HF's ``last_hidden_state``), the embedding's
    cache (an additive embedding's parts) and, when they fit the budget, each layer's backward
    cache (so the backward need not recompute; it frees each as it goes)."""

    layer_inputs: list[Tensor]
    last_output: Tensor
    final_hidden: Tensor
    embedding: Any = None
    layer_caches: list[LayerCache | None] | None = None
    positions: Tensor | None = None


@torch.no_grad()
def run_forward(model: BlockModel, input_ids: Tensor, positions: Tensor | None = None, *,
                token_type_ids: Tensor | None = None, embedding_positions: Tensor | None = None,
                cache_budget_bytes: int = 0, checkpoint: Callable[[], None] | None = None
                ) -> ForwardPass:
    """Plain forward of one sequence (token ids; an image for a patch embedding). ``positions`` (T,): the attention's (RoPE) positions,
    default 0…T−1; ``embedding_positions``: the rows of an additive position table (default:
    the embedding's own). Keeps the per-layer backward caches only if all of them together fit
    ``cache_budget_bytes`` (judged after the first layer). ``checkpoint`` is called after each
    layer."""
    hidden, embedding_cache = model.embedding.forward(
        torch.as_tensor(input_ids, device=model.device), embedding_positions, token_type_ids)
    if positions is None:
        positions = torch.arange(hidden.shape[0], device=model.device)
    context = model.positions(positions)
    layer_inputs: list[Tensor] = []
    caches: list[LayerCache | None] | None = [] if cache_budget_bytes > 0 else None
    for layer in model.layers:
        layer_inputs.append(hidden)
        hidden, cache = layer.forward(hidden, context, keep_cache=caches is not None)
        if caches is not None:
            if not caches and tensor_bytes(cache) * len(model.layers) > cache_budget_bytes:
                caches = None
            else:
                caches.append(cache)
        if checkpoint is not None:
            checkpoint()
    final_hidden, _ = model.head.final_hidden(hidden)
    return ForwardPass(layer_inputs, hidden, final_hidden, embedding_cache, caches,
                       context.positions)


@torch.no_grad()
def relevance(
    model: BlockModel,
    layer_inputs: Sequence[Tensor],
    positions: Tensor,
    seed: LogitSeeds | HiddenSeed | Tensor,
    mode: str = "pa-lrp",
    checkpoint: Callable[[], None] | None = None,
    *,
    forward: ForwardPass | None = None,
    recompute_executor: Executor | None = None,
    row_chunk: int | None = None,
) -> RelevanceResult:
    """PA-LRP relevance from the saved residual stream: ``layer_inputs[l]`` is layer l's input
    (T, hidden), ``positions`` (T,) the attention's positions, ``seed`` the targets (logits
    through the head, or a gradient at the final hidden states). ``forward`` (a ``run_forward``
    of the same input) lends its layer caches and the embedding's parts (an additive
    embedding's relevance needs them).

    ``recompute_executor``: recompute layer l−1's forward there while layer l's backward runs
    here (one more layer cache alive at a time; the same result bit for bit). Not for tensor
    parallelism: the recompute's all-reduces would interleave with the backward's.

    ``checkpoint`` is called after each layer and, with ``row_chunk``, after each chunk of at
    most that many rows within a layer (rows are independent: the same result). It may block
    (to let other work run) or raise (to stop)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    num_layers = len(model.layers)
    if len(layer_inputs) != num_layers:
        raise ValueError(f"expected {num_layers} layer inputs, got {len(layer_inputs)}")
    length = layer_inputs[0].shape[0]
    if positions.shape != (length,):
        raise ValueError(f"positions must have shape ({length},), got {tuple(positions.shape)}")
    if isinstance(seed, LogitSeeds) and seed.max_position >= length:
        raise ValueError(f"a target position lies outside the input's {length} tokens")
    context = model.positions(positions)
    device = model.device
    rows = seed.num_rows if isinstance(seed, (LogitSeeds, HiddenSeed)) else seed.shape[0]
    rotary = bool(model.rotaries)
    positional = torch.zeros(rows, num_layers if rotary else 0, length, 2, device=device)
    absorbed = torch.zeros(rows, num_layers, device=device)
    sharded = torch.zeros(rows, num_layers, device=device)
    replicated = torch.zeros(rows, num_layers, device=device)
    caches = forward.layer_caches if forward is not None else None

    @torch.no_grad()  # grad mode is per thread: the executor's thread needs it too
    def recompute(index: int) -> tuple[Tensor | None, LayerCache]:
        # only the last layer's output is needed (for the seeds); every other layer's is the
        # next layer's saved input, which the backward does not read
        return model.layers[index].forward(layer_inputs[index], context, keep_cache=True,
                                           output_needed=index == num_layers - 1)

    grad = target = head_kept = None
    pending: Future | None = None
    try:
        for index in reversed(range(num_layers)):
            layer = model.layers[index]
            cached = caches is not None and caches[index] is not None
            if cached:
                output, cache = forward.last_output, caches[index]
                caches[index] = None  # free as we go
            elif pending is not None:
                output, cache = pending.result()
            else:
                output, cache = recompute(index)
            pending = None
            if not cached and recompute_executor is not None and index > 0 and not (
                    caches is not None and caches[index - 1] is not None):
                pending = recompute_executor.submit(recompute, index - 1)
            if grad is None:
                grad, target, head_kept = model.head.seed(output, seed)
            chunk = row_chunk if row_chunk and row_chunk < rows else rows
            for start in range(0, rows, chunk):
                part = slice(start, start + chunk)
                sinks = Sinks(absorbed[part, index], sharded[part, index],
                              replicated[part, index],
                              positional[part, index] if rotary else None)
                backward = layer.backward(cache, grad[part], context, mode, sinks)
                if chunk == rows:
                    grad = backward
                else:
                    grad[part] = backward
                    if checkpoint is not None and start + chunk < rows:
                        checkpoint()
            del cache, output
            if checkpoint is not None:
                checkpoint()
    finally:
        if pending is not None and not pending.cancel():  # stopped early (checkpoint raised)
            pending.exception()  # wait for the recompute; the loop's own error is the one raised
    embedding_cache = forward.embedding if forward is not None else None
    inputs = model.embedding.relevance(grad, layer_inputs[0], embedding_cache, mode)
    positional = model.reduce(positional)
    bias = model.reduce(sharded) + replicated if model.has_biases else None
    return RelevanceResult(
        token=inputs.token, positional_cos=positional[..., 0],
        positional_sin=positional[..., 1], target_logit=target,
        softmax_absorbed=model.reduce(absorbed), bias_absorbed=bias,
        position_embedding=inputs.position, position_kind=model.embedding.position_kind,
        token_type=inputs.token_type, embedding_bias_absorbed=inputs.kept,
        head_bias_absorbed=head_kept, pixel=inputs.pixel)
