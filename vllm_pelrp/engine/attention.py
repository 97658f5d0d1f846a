"""The attention block and its positional rule, for every model the engine runs.

``Attention``: q, k, v projections (with or without bias), optional per-head q/k RMSNorm, an
optional positional rule (``Rotary``: RoPE on all of each head or its first ``rotary_dim``
dims; None: the positions entered at the embedding, BERT and GPT-2), causal or bidirectional,
an optional sliding window, any score scale, and the o projection (with or without bias).
Grouped queries share a key/value head.

The rules (AttnLRP; ``rules.py``) run through the fused attention-LRP backward
(``kernels/attention_lrp.py``): the uniform rule on A·V and on Q·Kᵀ and the softmax's own
gradient, as constant factors on PyTorch's flash backward, so no T×T tensor is formed. What the
softmax rule drops is booked from the uniform rules' conservation (``attention_softmax_loss``).
Modes: ``pa-lrp`` gives half of each RoPE product's relevance to that position's cos/sin (the
positional relevance), ``attnlrp`` holds cos/sin constant, ``cp-lrp`` holds the probabilities
constant (nothing reaches q and k).
"""

from __future__ import annotations

from dataclasses import dataclass

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
from .blocks import RMSNorm, Sinks, linear, linear_backward
from .spec import RopeSpec

# "fused": the attention rules through PyTorch's fused (flash) attention backward, no T×T
# tensor; "reference": the rules applied one by one on explicit score blocks (for the tests).
ATTENTION_BACKWARD = "fused"


def attention_softmax_loss(queries: Tensor, keys: Tensor, values: Tensor, grad_queries: Tensor,
                           grad_keys: Tensor, grad_values: Tensor) -> Tensor:
    """Σ R(probs) − Σ R(scores) per row (B,), from the uniform rules' conservation:
    Σ R(probs) = Σ v ⊙ ∂v (A·V) and Σ R(scores) = Σ q ⊙ ∂q + k ⊙ ∂k (QKᵀ, any scale), so no
    pass over the T×T probabilities is needed. Inputs (T, H, D), gradients (B, T, H, D)."""
    return ((grad_values * values.float()).sum((1, 2, 3))
            - (grad_queries * queries.float()).sum((1, 2, 3))
            - (grad_keys * keys.float()).sum((1, 2, 3)))


@dataclass
class RopeTables:
    """One input's RoPE tables for one kind of layer: cos/sin (T, rotary dim), already times
    ``attention_factor`` (LongRoPE, YaRN); the head dims past the rotary dim pass through."""

    positions: Tensor
    inv_freq: Tensor
    cos: Tensor
    sin: Tensor
    neox_style: bool
    attention_factor: float = 1.0


@dataclass(frozen=True)
class Rotary:
    """RoPE on the first ``rotary_dim`` dims of each head (all of them: ``rotary_dim`` =
    ``head_dim``): θ and the HF scaling dict (default, llama3, linear, LongRoPE, YaRN).
    ``table_length``: the length LongRoPE picks its short or long factors by (None: each
    input's own, as HF)."""

    head_dim: int
    rotary_dim: int
    rope: RopeSpec
    neox_style: bool = True
    table_length: int | None = None

    @property
    def key(self) -> str:
        """Layers with equal keys share their tables."""
        return repr(self)

    def tables(self, positions: Tensor, dtype: torch.dtype) -> RopeTables:
        seq_len = None
        if (self.rope.scaling or {}).get("rope_type") == "longrope":  # short or long factors
            seq_len = self.table_length or int(positions.max()) + 1
        inv_freq = rope_inv_freq(self.head_dim, self.rope.theta, self.rope.scaling,
                                 device=positions.device, rotary_dim=self.rotary_dim,
                                 seq_len=seq_len)
        factor = rope_attention_factor(self.rope.scaling)
        cos, sin = rope_cos_sin(positions, inv_freq, neox_style=self.neox_style, dtype=dtype,
                                attention_factor=factor)
        return RopeTables(positions, inv_freq, cos, sin, self.neox_style, factor)

    def forward(self, x: Tensor, tables: RopeTables) -> Tensor:
        return apply_rope(x, tables.cos, tables.sin, tables.neox_style)

    def backward(self, grad_rotated: Tensor, pre_rope: Tensor, tables: RopeTables, mode: str,
                 positional: Tensor | None) -> Tensor:
        """RoPE rule per target row (the Triton kernel on a GPU); pa-lrp adds the cos/sin
        shares into ``positional`` (B, T, 2). Only the rotated dims have a positional share."""
        input_share = 0.5 if mode == "pa-lrp" else 1.0
        grads = []
        for row in range(grad_rotated.shape[0]):
            grad, _ = rope_lrp_backward(
                grad_rotated[row], pre_rope, tables.positions, tables.inv_freq,
                input_share=input_share, neox_style=tables.neox_style,
                positional_out=None if positional is None else positional[row],
                attention_factor=tables.attention_factor,
            )
            grads.append(grad)
        return torch.stack(grads)


class Positions:
    """One input's positions and, per kind of rotary layer, its RoPE tables (made once, before
    any layer runs, so the layers may run on two threads)."""

    def __init__(self, positions: Tensor, dtype: torch.dtype, rotaries: list[Rotary]) -> None:
        self.positions = positions
        self._tables: dict[str, RopeTables] = {}
        for rotary in rotaries:
            if rotary.key not in self._tables:
                self._tables[rotary.key] = rotary.tables(positions, dtype)

    def tables(self, rotary: Rotary) -> RopeTables:
        return self._tables[rotary.key]


@dataclass
class AttentionCache:
    """What the attention's backward reads: q, k (after their norms, before RoPE), the rotated
    q̃, k̃ (None without RoPE: they are q and k), v, the output and its per-row log-sum-exp
    (kept by the CPU flash kernel), and the q/k norms' 1/rms."""

    queries: Tensor  # (T, Hq, D)
    keys: Tensor  # (T, Hkv, D)
    rotated_queries: Tensor | None
    rotated_keys: Tensor | None
    values: Tensor
    output: Tensor  # (T, Hq, D)
    logsumexp: Tensor | None
    inv_rms_q: Tensor | None = None
    inv_rms_k: Tensor | None = None

    @property
    def attention_queries(self) -> Tensor:
        return self.queries if self.rotated_queries is None else self.rotated_queries

    @property
    def attention_keys(self) -> Tensor:
        return self.keys if self.rotated_keys is None else self.rotated_keys


class Attention:
    """The attention block (per tensor-parallel rank: a slice of the heads). ``forward`` returns
    this rank's part of the o projection (the layer sums the ranks, then adds ``output_bias``);
    ``backward`` takes the gradient at the (replicated) output and returns this rank's part of
    the gradient at the input. q, k, v biases keep their share into ``bias_sharded``, the o
    bias into ``bias_replicated``."""

    def __init__(self, q_proj: Tensor, k_proj: Tensor, v_proj: Tensor, o_proj: Tensor,
                 head_dim: int, *, q_bias: Tensor | None = None, k_bias: Tensor | None = None,
                 v_bias: Tensor | None = None, o_bias: Tensor | None = None,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None,
                 rotary: Rotary | None = None, causal: bool = True, window: int | None = None,
                 scale: float | None = None) -> None:
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.q_bias, self.k_bias, self.v_bias, self.output_bias = q_bias, k_bias, v_bias, o_bias
        self.q_norm, self.k_norm, self.rotary = q_norm, k_norm, rotary
        self.head_dim, self.causal, self.window, self.scale = head_dim, causal, window, scale

    def forward(self, x: Tensor, positions: Positions) -> tuple[Tensor, AttentionCache]:
        length = x.shape[0]
        queries = linear(x, self.q_proj, self.q_bias).view(length, -1, self.head_dim)
        keys = linear(x, self.k_proj, self.k_bias).view(length, -1, self.head_dim)
        values = linear(x, self.v_proj, self.v_bias).view(length, -1, self.head_dim)
        inv_rms_q = inv_rms_k = None
        if self.q_norm is not None:
            queries, inv_rms_q = self.q_norm.forward(queries)
            keys, inv_rms_k = self.k_norm.forward(keys)
        rotated_queries = rotated_keys = None
        if self.rotary is not None:
            tables = positions.tables(self.rotary)
            rotated_queries = self.rotary.forward(queries, tables)
            rotated_keys = self.rotary.forward(keys, tables)
        cache = AttentionCache(queries, keys, rotated_queries, rotated_keys, values, None, None,
                               inv_rms_q, inv_rms_k)
        output, cache.logsumexp = attention_forward_for_lrp(
            cache.attention_queries, cache.attention_keys, values, causal=self.causal,
            scale=self.scale, sliding_window=self.window)
        cache.output = output.to(values.dtype)
        return cache.output.reshape(length, -1) @ self.o_proj.T, cache

    def backward(self, cache: AttentionCache, grad_out: Tensor, positions: Positions, mode: str,
                 sinks: Sinks) -> Tensor:
        """∂ at the output (B, T, hidden) → this rank's ∂ at the input, fp32."""
        rows, length = grad_out.shape[:2]
        grad_attended = linear_backward(grad_out, self.o_proj, self.output_bias,
                                        sinks.bias_replicated)
        grad_attended = grad_attended.view(rows, length, -1, self.head_dim)
        queries, keys = cache.attention_queries, cache.attention_keys
        value_share = 1.0 if mode == "cp-lrp" else 0.5
        if ATTENTION_BACKWARD == "reference":
            grad_q, grad_k, grad_v = attention_lrp_backward_reference(
                queries, keys, cache.values, grad_attended, value_share,
                sliding_window=self.window, causal=self.causal, scale=self.scale)
        else:
            grad_q, grad_k, grad_v = attention_lrp_backward(
                queries, keys, cache.values, grad_attended, value_share,
                sliding_window=self.window, causal=self.causal, scale=self.scale,
                output=cache.output, logsumexp=cache.logsumexp)
        grad_in = linear_backward(grad_v.reshape(rows, length, -1), self.v_proj, self.v_bias,
                                  sinks.bias_sharded)
        if grad_q is None:  # cp-lrp: nothing reaches q and k
            return grad_in
        sinks.softmax += attention_softmax_loss(queries, keys, cache.values, grad_q, grad_k,
                                                grad_v)
        if self.rotary is not None:
            tables = positions.tables(self.rotary)
            grad_q = self.rotary.backward(grad_q, cache.queries, tables, mode, sinks.positional)
            grad_k = self.rotary.backward(grad_k, cache.keys, tables, mode, sinks.positional)
        if self.q_norm is not None:
            grad_q = self.q_norm.backward(grad_q, cache.inv_rms_q)
            grad_k = self.k_norm.backward(grad_k, cache.inv_rms_k)
        grad_in += linear_backward(grad_q.reshape(rows, length, -1), self.q_proj, self.q_bias,
                                   sinks.bias_sharded)
        grad_in += linear_backward(grad_k.reshape(rows, length, -1), self.k_proj, self.k_bias,
                                   sinks.bias_sharded)
        return grad_in
