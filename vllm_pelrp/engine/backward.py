"""Layer-wise PA-LRP backward over a ``ModelWeights`` description.

The backward starts from the saved input of every decoder layer (the residual stream), and
walks the layers from last to first. For each layer it recomputes that layer's forward from its
saved input and applies the rules of ``rules.py`` by hand, for all targets (seeds) at once. Peak
memory beyond the weights is the saved residual stream plus one layer's working set: the
attention rules run through a fused attention backward (``kernels/attention_lrp.py``) that
never materialises the T×T probabilities. The recompute skips each layer's down projection
(only the layer's output needs it, and that is the next layer's saved input), and it can run
one layer ahead on another thread (``recompute_executor``), since it needs no relevance.

Modes:
- ``pa-lrp``: the RoPE products follow the uniform rule: half of the relevance of q̃ and k̃
  goes to that position's cos/sin (the positional relevance), half into q and k.
- ``attnlrp``: cos/sin are constants; all relevance flows to tokens.
- ``cp-lrp``: attention probabilities are constants; A·V is linear in V, nothing reaches q/k.
"""

from __future__ import annotations

from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Callable, Sequence

import math

import torch
from torch import Tensor

from ..kernels import (
    apply_rope,
    rope_attention_factor,
    rope_cos_sin,
    rope_inv_freq,
    rope_lrp_backward,
)
from ..kernels.attention_lrp import attention_forward_for_lrp, attention_lrp_backward
from ..kernels.attention_lrp_reference import attention_lrp_backward_reference
from .blocks import (
    GatedMLPCache,
    MoECache,
    attention_softmax_loss,
    linear,
    linear_backward,
    mlp_block,
    rms_norm,
    rms_norm_backward,
    tensor_bytes,
)
from .rules import linear_rule
from .spec import DecoderSpec, LayerWeights, ModelWeights, RopeSpec
from ..vocabulary import MODES  # noqa: F401  (re-exported)

# "fused": the attention rules through PyTorch's fused (flash) attention backward, no T×T
# tensor; "reference": the rules applied one by one on explicit score blocks (for the tests).
ATTENTION_BACKWARD = "fused"
# Starting from token ids, the forward's per-layer caches are kept if all of them fit in this
# budget (short inputs); beyond it the backward recomputes each layer from its saved input.
DEFAULT_CACHE_BUDGET_BYTES = 512 * 2**20


@dataclass(frozen=True)
class LogitSeeds:
    """Targets of the backward: row b is Σₖ weights[b,k] · logit[positions[b,k], token_ids[b,k]].

    Padding entries have weight 0. All three tensors are (B, K).
    """

    positions: Tensor
    token_ids: Tensor
    weights: Tensor
    max_position: int = -1  # the largest target position, known on the host (-1: none)

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[tuple[int, int]]],
                  device: torch.device | str | None = None) -> "LogitSeeds":
        """Build from, per row, a list of (position, token_id) pairs (each with weight 1), on
        ``device`` (one copy of the pairs; nothing read back)."""
        if not rows or any(len(row) == 0 for row in rows):
            raise ValueError("every target row needs at least one (position, token_id) pair")
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
                   max(int(p) for row in rows for p, _ in row))

    @property
    def num_rows(self) -> int:
        return self.positions.shape[0]


@dataclass
class RelevanceResult:
    """Raw relevance, fp32, one row per seed: ``token`` (B, T), ``positional_cos/sin`` (B, L, T)."""

    token: Tensor
    positional_cos: Tensor
    positional_sin: Tensor
    target_logit: Tensor
    softmax_absorbed: Tensor  # (B, L): relevance the softmax rule drops, Σ R(probs) − Σ R(scores)
    bias_absorbed: Tensor | None = None  # (B, L): relevance the biases keep (ε-rule); None: no biases
    # Models whose positions are an additive table (engine/additive.py; cos/sin are then (B, 0, T)):
    position_embedding: Tensor | None = None  # (B, T): Σ_d R(P[t]), the table's relevance
    position_kind: str | None = None  # "learned" or "absolute": what the table is
    token_type: Tensor | None = None  # (B, T): the token-type embedding's relevance (BERT)

    @property
    def positional(self) -> Tensor:
        """Per position: Σ over layers of the cos and sin parts, plus an additive position
        table's relevance, (B, T)."""
        rotary = (self.positional_cos + self.positional_sin).sum(1)
        return rotary if self.position_embedding is None else rotary + self.position_embedding


@dataclass
class _Rope:
    """One layer kind's RoPE tables: cos/sin (T, rotary dim), already times ``attention_factor``
    (LongRoPE, YaRN); the head dims past the rotary dim pass through."""

    positions: Tensor
    inv_freq: Tensor
    cos: Tensor
    sin: Tensor
    neox_style: bool
    attention_factor: float = 1.0


@dataclass
class _LayerCache:
    """Forward quantities of one layer that its backward needs."""

    inv_rms_attn: Tensor
    queries: Tensor  # (T, Hq, D) before RoPE (after the q norm, if any)
    keys: Tensor  # (T, Hkv, D) before RoPE
    rotated_queries: Tensor  # the attention's queries: after RoPE, times the query factor
    rotated_keys: Tensor
    values: Tensor
    attention_output: Tensor  # (T, Hq, D)
    attention_logsumexp: Tensor | None  # per query row, kept by the CPU flash kernel
    inv_rms_mlp: Tensor
    mlp: GatedMLPCache | MoECache  # the MLP block's (``blocks.mlp_block``)
    inv_rms_q: Tensor | None = None  # per-head q/k norms (T, H, 1)
    inv_rms_k: Tensor | None = None
    inv_rms_attention_output: Tensor | None = None  # sandwich norms (T, 1)
    inv_rms_mlp_output: Tensor | None = None

    @property
    def num_heads(self) -> int:
        """Query heads on this rank."""
        return self.queries.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]


def _query_factor(spec: DecoderSpec) -> float:
    """The attention kernels scale by 1/√D; another query scale multiplies the queries."""
    return spec.attention_scale * math.sqrt(spec.head_dim)


def make_rope(spec: DecoderSpec, positions: Tensor, dtype: torch.dtype,
              rope: RopeSpec | None = None) -> _Rope:
    rope = rope or RopeSpec(spec.rope_theta, spec.rope_scaling)
    seq_len = None
    if (rope.scaling or {}).get("rope_type") == "longrope":  # short or long factors by length
        seq_len = spec.rope_table_length or int(positions.max()) + 1
    inv_freq = rope_inv_freq(spec.head_dim, rope.theta, rope.scaling, device=positions.device,
                             rotary_dim=spec.rotated_dims, seq_len=seq_len)
    factor = rope_attention_factor(rope.scaling)
    cos, sin = rope_cos_sin(positions, inv_freq, neox_style=spec.neox_style, dtype=dtype,
                            attention_factor=factor)
    return _Rope(positions, inv_freq, cos, sin, spec.neox_style, factor)


def make_ropes(spec: DecoderSpec, positions: Tensor, dtype: torch.dtype) -> list[_Rope]:
    """Each layer's RoPE tables (layers of one kind share them: local and global θ)."""
    tables: dict[str, _Rope] = {}
    ropes = []
    for index in range(spec.num_layers):
        kind = spec.layer_rope(index)
        if repr(kind) not in tables:
            tables[repr(kind)] = make_rope(spec, positions, dtype, kind)
        ropes.append(tables[repr(kind)])
    return ropes


def _head_norm(spec: DecoderSpec, x: Tensor, gamma: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Per-head q/k RMSNorm over head_dim (Qwen3, Gemma 3), or nothing."""
    if gamma is None:
        return x, None
    return rms_norm(spec, x, gamma)


def layer_forward(
    weights: ModelWeights, layer: LayerWeights, x: Tensor, rope: _Rope, keep_cache: bool,
    output_needed: bool = True, window: int | None = None,
) -> tuple[Tensor | None, _LayerCache | None]:
    """One decoder layer, x (T, hidden) → y (T, hidden), optionally keeping what backward needs.

    ``output_needed=False`` (with ``keep_cache``) skips the down projection, which only y needs:
    the backward of a layer whose output is already known (the next layer's saved input) runs
    on the cache alone, so its recompute runs six of the layer's seven matrix products.
    ``window``: the layer's sliding window (``spec.layer_window``), None for full attention.
    """
    spec = weights.spec
    length = x.shape[0]
    normed, inv_rms_attn = rms_norm(spec, x, layer.attention_norm)
    queries = linear(normed, layer.q_proj, layer.q_bias).view(length, -1, spec.head_dim)
    keys = linear(normed, layer.k_proj, layer.k_bias).view(length, -1, spec.head_dim)
    values = linear(normed, layer.v_proj, layer.v_bias).view(length, -1, spec.head_dim)
    queries, inv_rms_q = _head_norm(spec, queries, layer.q_norm)
    keys, inv_rms_k = _head_norm(spec, keys, layer.k_norm)
    rotated_queries = apply_rope(queries, rope.cos, rope.sin, rope.neox_style)
    rotated_keys = apply_rope(keys, rope.cos, rope.sin, rope.neox_style)
    factor = _query_factor(spec)
    if factor != 1.0:
        rotated_queries = rotated_queries * factor
    attended, logsumexp = attention_forward_for_lrp(rotated_queries, rotated_keys, values,
                                                    sliding_window=window)
    attention_output = attended
    attended = weights.reduce(attended.reshape(length, -1) @ layer.o_proj.T)
    inv_rms_attention_output = inv_rms_mlp_output = None
    if layer.attention_output_norm is not None:
        attended, inv_rms_attention_output = rms_norm(spec, attended, layer.attention_output_norm)
    hidden = x + attended
    normed_mlp, inv_rms_mlp = rms_norm(spec, hidden, layer.mlp_norm)
    mlp_needed = output_needed or not keep_cache or layer.mlp_output_norm is not None
    mlp, mlp_cache = mlp_block(spec, layer).forward(normed_mlp, mlp_needed)
    if mlp_needed:
        mlp = weights.reduce(mlp)
        if layer.mlp_output_norm is not None:  # its 1/rms is needed even without the output
            mlp, inv_rms_mlp_output = rms_norm(spec, mlp, layer.mlp_output_norm)
        output = hidden + mlp if output_needed or not keep_cache else None
    else:
        output = None
    if not keep_cache:
        return output, None
    cache = _LayerCache(
        inv_rms_attn, queries, keys, rotated_queries, rotated_keys, values,
        attention_output, logsumexp, inv_rms_mlp, mlp_cache,
        inv_rms_q, inv_rms_k, inv_rms_attention_output, inv_rms_mlp_output,
    )
    return output, cache


def _attention_backward(
    cache: _LayerCache, grad_attended: Tensor, mode: str, absorbed: Tensor, window: int | None
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """∂ at the attention output (B, T, Hq, D) → ∂ at q̃ (B,T,Hq,D), k̃ (B,T,Hkv,D), v.

    Adds into ``absorbed`` (B,) what the (non-conservative) softmax rule drops.
    The grads are fp32: (B, T, Hq, D) for q̃ and (B, T, Hkv, D) for k̃ and v.
    """
    value_share = 1.0 if mode == "cp-lrp" else 0.5
    if ATTENTION_BACKWARD == "reference":
        grad_queries, grad_keys, grad_values = attention_lrp_backward_reference(
            cache.rotated_queries, cache.rotated_keys, cache.values, grad_attended, value_share,
            sliding_window=window,
        )
    else:
        grad_queries, grad_keys, grad_values = attention_lrp_backward(
            cache.rotated_queries, cache.rotated_keys, cache.values, grad_attended, value_share,
            sliding_window=window, output=cache.attention_output,
            logsumexp=cache.attention_logsumexp,
        )
    if grad_queries is not None:
        absorbed += attention_softmax_loss(cache.rotated_queries, cache.rotated_keys,
                                           cache.values, grad_queries, grad_keys, grad_values)
    return grad_queries, grad_keys, grad_values


def _rope_backward(
    grad_rotated: Tensor, pre_rope: Tensor, rope: _Rope, mode: str, positional: Tensor
) -> Tensor:
    """RoPE rule per target row; pa-lrp adds the cos/sin shares into ``positional`` (B, T, 2).
    Only the rotated dims have a positional share; the others pass their gradient through."""
    input_share = 0.5 if mode == "pa-lrp" else 1.0
    grads = []
    for row in range(grad_rotated.shape[0]):
        grad, _ = rope_lrp_backward(
            grad_rotated[row], pre_rope, rope.positions, rope.inv_freq,
            input_share=input_share, neox_style=rope.neox_style, positional_out=positional[row],
            attention_factor=rope.attention_factor,
        )
        grads.append(grad)
    return torch.stack(grads)


def layer_backward(
    weights: ModelWeights,
    layer: LayerWeights,
    cache: _LayerCache,
    grad_output: Tensor,
    rope: _Rope,
    mode: str,
    positional: Tensor,
    absorbed: Tensor,
    window: int | None = None,
    bias_kept: Tensor | None = None,
) -> Tensor:
    """Modified gradient at the layer output (B, T, hidden) fp32 → at its input, fp32.

    Adds the softmax rule's loss into ``absorbed`` (B,), what the biases keep into
    ``bias_kept`` (B,), and, in pa-lrp, the cos/sin relevance into ``positional`` (B, T, 2).
    """
    spec = weights.spec
    rows, length = grad_output.shape[:2]
    # MLP: y = h + [norm](mlp(h)), the layer's MLP block (gated, or a mixture of experts)
    grad_mlp = grad_output
    if layer.mlp_output_norm is not None:
        grad_mlp = rms_norm_backward(spec, grad_mlp, cache.inv_rms_mlp_output, layer.mlp_output_norm)
    grad_normed = mlp_block(spec, layer).backward(cache.mlp, grad_mlp, mode, absorbed)
    grad_normed = weights.reduce(grad_normed)
    grad_hidden = grad_output + rms_norm_backward(spec, grad_normed, cache.inv_rms_mlp,
                                                  layer.mlp_norm)
    # attention: h = x + [norm](o_proj(attention(rope(q), rope(k), v)))
    grad_attention = grad_hidden
    if layer.attention_output_norm is not None:
        grad_attention = rms_norm_backward(spec, grad_attention, cache.inv_rms_attention_output,
                                           layer.attention_output_norm)
    grad_attended = linear_rule(grad_attention, layer.o_proj).float()
    grad_attended = grad_attended.view(rows, length, cache.num_heads, spec.head_dim)
    grad_rot_q, grad_rot_k, grad_values = _attention_backward(
        cache, grad_attended, mode, absorbed, window
    )
    grad_normed = linear_backward(grad_values.reshape(rows, length, -1), layer.v_proj,
                                  layer.v_bias, bias_kept)
    if grad_rot_q is not None:
        factor = _query_factor(spec)
        if factor != 1.0:  # the attention's queries were q̃ · factor
            grad_rot_q = grad_rot_q * factor
        grad_queries = _rope_backward(grad_rot_q, cache.queries, rope, mode, positional)
        grad_keys = _rope_backward(grad_rot_k, cache.keys, rope, mode, positional)
        if layer.q_norm is not None:
            grad_queries = rms_norm_backward(spec, grad_queries, cache.inv_rms_q, layer.q_norm)
            grad_keys = rms_norm_backward(spec, grad_keys, cache.inv_rms_k, layer.k_norm)
        grad_normed += linear_backward(grad_queries.reshape(rows, length, -1), layer.q_proj,
                                       layer.q_bias, bias_kept)
        grad_normed += linear_backward(grad_keys.reshape(rows, length, -1), layer.k_proj,
                                       layer.k_bias, bias_kept)
    grad_normed = weights.reduce(grad_normed)
    return grad_hidden + rms_norm_backward(spec, grad_normed, cache.inv_rms_attn,
                                           layer.attention_norm)


def _seed_gradient(
    weights: ModelWeights, final_hidden: Tensor, seeds: LogitSeeds
) -> tuple[Tensor, Tensor]:
    """Gradient at the last layer's output for each seed row, and the target logits (B,)."""
    normed, inv_rms = rms_norm(weights.spec, final_hidden, weights.final_norm)
    device = final_hidden.device
    positions = seeds.positions.to(device)
    token_ids = seeds.token_ids.to(device)
    seed_weights = seeds.weights.to(device).float()
    rows_of_head = weights.lm_head[token_ids].float()  # (B, K, hidden)
    logits = (normed[positions].float() * rows_of_head).sum(-1)  # (B, K)
    target_logit = (logits * seed_weights).sum(-1)
    grad_normed = torch.zeros(seeds.num_rows, *final_hidden.shape, device=device)
    grad_normed.scatter_add_(
        1, positions[..., None].expand_as(rows_of_head), rows_of_head * seed_weights[..., None]
    )
    grad = rms_norm_backward(weights.spec, grad_normed, inv_rms, weights.final_norm)
    return grad, target_logit


def embed(weights: ModelWeights, input_ids: Tensor) -> Tensor:
    """Layer 0's input: the token embeddings, times the spec's embedding scale (Gemma: √hidden,
    in the weights' dtype, as HF and vLLM compute it)."""
    embedded = weights.embed_tokens[input_ids.to(weights.device)]
    if weights.spec.embed_scale != 1.0:
        embedded = embedded * torch.tensor(weights.spec.embed_scale, dtype=embedded.dtype)
    return embedded


@dataclass
class ForwardPass:
    """What a plain forward leaves: every layer's input, the last layer's output, and, when
    they fit the budget, each layer's backward cache (so the backward need not recompute)."""

    layer_inputs: list[Tensor]
    final_hidden: Tensor
    layer_caches: list[_LayerCache] | None = None


def _cache_bytes(cache: _LayerCache) -> int:
    return tensor_bytes(cache)


@torch.no_grad()
def run_forward(
    weights: ModelWeights, input_ids: Tensor, positions: Tensor | None = None,
    cache_budget_bytes: int = 0, checkpoint: Callable[[], None] | None = None,
) -> ForwardPass:
    """Plain forward. Keeps the per-layer backward caches only if all of them together fit
    in ``cache_budget_bytes`` (judged after the first layer); otherwise the backward
    recomputes each layer from its input, and memory stays at the residual stream.
    ``checkpoint`` is called after each layer, as in ``relevance_from_layer_inputs``."""
    if positions is None:
        positions = torch.arange(input_ids.shape[-1], device=weights.device)
    spec = weights.spec
    ropes = make_ropes(spec, positions.to(weights.device), weights.dtype)
    hidden = embed(weights, input_ids)
    layer_inputs: list[Tensor] = []
    caches: list[_LayerCache] | None = [] if cache_budget_bytes > 0 else None
    for index, layer in enumerate(weights.layers):
        layer_inputs.append(hidden)
        hidden, cache = layer_forward(weights, layer, hidden, ropes[index],
                                      keep_cache=caches is not None,
                                      window=spec.layer_window(index))
        if caches is not None:
            if len(caches) == 0 and _cache_bytes(cache) * len(weights.layers) > cache_budget_bytes:
                caches = None
            else:
                caches.append(cache)
        if checkpoint is not None:
            checkpoint()
    return ForwardPass(layer_inputs, hidden, caches)


def forward_layer_inputs(
    weights: ModelWeights, input_ids: Tensor, positions: Tensor | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> tuple[list[Tensor], Tensor]:
    """Plain forward: the input of every decoder layer, and the last layer's output."""
    forward = run_forward(weights, input_ids, positions, checkpoint=checkpoint)
    return forward.layer_inputs, forward.final_hidden


def final_logits(weights: ModelWeights, final_hidden: Tensor) -> Tensor:
    """Output logits (T, V) from the last layer's output."""
    normed, _ = rms_norm(weights.spec, final_hidden, weights.final_norm)
    return (normed @ weights.lm_head.T).float()


@torch.no_grad()
def argmax_next_token(
    weights: ModelWeights, layer_inputs: Sequence[Tensor], positions: Tensor
) -> int:
    """The model's argmax token after the last position, from the saved layer inputs."""
    spec = weights.spec
    last = spec.num_layers - 1
    rope = make_rope(spec, positions.to(weights.device), weights.dtype, spec.layer_rope(last))
    final_hidden, _ = layer_forward(weights, weights.layers[-1], layer_inputs[-1], rope,
                                    keep_cache=False, window=spec.layer_window(last))
    return int(final_logits(weights, final_hidden[-1:])[0].argmax())


@torch.no_grad()
def relevance_from_layer_inputs(
    weights: ModelWeights,
    layer_inputs: Sequence[Tensor] | Tensor,
    positions: Tensor,
    seeds: LogitSeeds,
    mode: str = "pa-lrp",
    checkpoint: Callable[[], None] | None = None,
    *,
    forward: ForwardPass | None = None,
    recompute_executor: Executor | None = None,
    row_chunk: int | None = None,
) -> RelevanceResult:
    """The engine's core entry point: PA-LRP relevance from the saved residual stream.

    ``layer_inputs[l]`` is the input of decoder layer l, (T, hidden); ``layer_inputs[0]`` is the
    token embedding, whose relevance is the token relevance. ``positions`` (T,) are the RoPE
    positions. Returns one relevance row per seed row. ``forward`` (from ``run_forward`` on the
    same input) lets the backward reuse its caches instead of recomputing each layer.

    ``recompute_executor``: recompute layer l−1's forward there while layer l's backward runs
    here (a two-stage pipeline; one more layer cache alive at a time). The recompute needs no
    relevance, so the result is the same bit for bit; on another core the backward is faster.
    Not for tensor parallelism: the recompute's all-reduces would interleave with the backward's.

    ``checkpoint`` is called between slices of the work: after each layer and, with
    ``row_chunk``, after each chunk of at most that many target rows within a layer (rows are
    independent, so the result is the same). A caller may block in it (to let other work run)
    or raise to stop the backward.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    num_layers = len(weights.layers)
    if len(layer_inputs) != num_layers:
        raise ValueError(f"expected {num_layers} layer inputs, got {len(layer_inputs)}")
    length = layer_inputs[0].shape[0]
    if positions.shape != (length,):
        raise ValueError(f"positions must have shape ({length},), got {tuple(positions.shape)}")
    if seeds.max_position >= length:
        raise ValueError("a target position lies beyond the input")
    spec = weights.spec
    ropes = make_ropes(spec, positions.to(weights.device), weights.dtype)
    rows = seeds.num_rows
    positional = torch.zeros(rows, num_layers, length, 2, device=weights.device)
    absorbed = torch.zeros(rows, num_layers, device=weights.device)
    bias_kept = torch.zeros(rows, num_layers, device=weights.device) if spec.qkv_bias else None
    cached = forward is not None and forward.layer_caches is not None

    @torch.no_grad()  # grad mode is per thread: the executor's thread needs it too
    def recompute(index: int) -> tuple[Tensor | None, _LayerCache]:
        # only the last layer's output is needed (for the seeds); every other layer's is the
        # next layer's saved input, which the backward does not read
        return layer_forward(weights, weights.layers[index], layer_inputs[index], ropes[index],
                             keep_cache=True, output_needed=index == num_layers - 1,
                             window=spec.layer_window(index))

    grad = target_logit = None
    pending: Future | None = None
    try:
        for index in reversed(range(num_layers)):
            layer = weights.layers[index]
            if cached:
                output, cache = forward.final_hidden, forward.layer_caches[index]
                forward.layer_caches[index] = None  # free as we go
            elif pending is not None:
                output, cache = pending.result()
            else:
                output, cache = recompute(index)
            pending = None
            if not cached and recompute_executor is not None and index > 0:
                pending = recompute_executor.submit(recompute, index - 1)
            if grad is None:
                grad, target_logit = _seed_gradient(weights, output, seeds)
            chunk = row_chunk if row_chunk and row_chunk < rows else rows
            for start in range(0, rows, chunk):
                part = slice(start, start + chunk)
                kept = bias_kept[part, index] if bias_kept is not None else None
                backward = layer_backward(weights, layer, cache, grad[part], ropes[index], mode,
                                          positional[part, index], absorbed[part, index],
                                          spec.layer_window(index), kept)
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
    token = (layer_inputs[0].float() * grad).sum(-1)
    positional = weights.reduce(positional)
    absorbed = weights.reduce(absorbed)
    if bias_kept is not None:
        bias_kept = weights.reduce(bias_kept)
    return RelevanceResult(token, positional[..., 0], positional[..., 1], target_logit, absorbed,
                           bias_kept)


def relevance_from_input_ids(
    weights: ModelWeights,
    input_ids: Tensor,
    seeds: LogitSeeds,
    mode: str = "pa-lrp",
    checkpoint: Callable[[], None] | None = None,
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
) -> RelevanceResult:
    """From token ids: plain forward (keeping layer caches within budget), then the backward."""
    positions = torch.arange(input_ids.shape[-1], device=weights.device)
    forward = run_forward(weights, input_ids, positions, cache_budget_bytes)
    return relevance_from_layer_inputs(
        weights, forward.layer_inputs, positions, seeds, mode, checkpoint, forward=forward
    )
