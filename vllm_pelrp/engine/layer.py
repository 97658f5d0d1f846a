"""One transformer layer: an attention block and an MLP block placed around the residual stream
with their norms. The placements:

- ``pre`` (LLaMA, Qwen, Mistral, GPT-2): h = x + A(N₁(x)); y = h + M(N₂(h));
- ``pre`` with output norms, the sandwich (Gemma): h = x + N₁ₒ(A(N₁(x))); y = h + N₂ₒ(M(N₂(h)));
- ``post`` (BERT): h = N₁(x + A(x)); y = N₂(h + M(h)).

A and M are this rank's partial sums under tensor parallelism: the layer sums them across ranks
(``reduce``) before their output bias, and sums the blocks' partial input gradients. The
residual adds pass the gradient to both addends (the ε-rule on a sum, exact)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

from .attention import Attention, AttentionCache, Positions
from .blocks import MLP, Norm, Sinks

PLACEMENTS = ("pre", "post")


def _identity(tensor: Tensor) -> Tensor:
    return tensor


@dataclass
class LayerCache:
    """What a layer's backward reads: each block's cache and each norm's 1/rms (or 1/σ)."""

    attention_norm: Tensor
    attention: AttentionCache
    mlp_norm: Tensor | None
    mlp: Any
    attention_output_norm: Tensor | None = None
    mlp_output_norm: Tensor | None = None


class TransformerLayer:
    """A layer of blocks (see the module docstring). ``forward`` returns the output and, with
    ``keep_cache``, what the backward needs; ``output_needed=False`` lets a pre-norm layer skip
    its MLP's last projection when only the cache is wanted (the driver knows the output: it is
    the next layer's saved input)."""

    def __init__(self, attention_norm: Norm, attention: Attention, mlp_norm: Norm, mlp: MLP, *,
                 placement: str = "pre", attention_output_norm: Norm | None = None,
                 mlp_output_norm: Norm | None = None,
                 reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement {placement!r}; allowed: {', '.join(PLACEMENTS)}")
        if placement == "post" and (attention_output_norm or mlp_output_norm):
            raise ValueError("output norms sit in a pre-norm layer (the sandwich)")
        self.attention_norm, self.attention = attention_norm, attention
        self.mlp_norm, self.mlp, self.placement = mlp_norm, mlp, placement
        self.attention_output_norm, self.mlp_output_norm = attention_output_norm, mlp_output_norm
        self.reduce = reduce or _identity

    def _attention(self, x: Tensor, positions: Positions) -> tuple[Tensor, AttentionCache]:
        partial, cache = self.attention.forward(x, positions)
        out = self.reduce(partial)
        return (out if self.attention.output_bias is None else out + self.attention.output_bias,
                cache)

    def _mlp(self, x: Tensor, output_needed: bool) -> tuple[Tensor | None, Any]:
        partial, cache = self.mlp.forward(x, output_needed)
        if partial is None:
            return None, cache
        out = self.reduce(partial)
        return out if self.mlp.output_bias is None else out + self.mlp.output_bias, cache

    def forward(self, x: Tensor, positions: Positions, keep_cache: bool,
                output_needed: bool = True) -> tuple[Tensor | None, LayerCache | None]:
        """x (T, hidden) → y (T, hidden) (None when not needed), cache (None unless kept)."""
        if self.placement == "post":
            attended, attention_cache = self._attention(x, positions)
            hidden, inv_attention = self.attention_norm.forward(x + attended)
            mlp, mlp_cache = self._mlp(hidden, True)
            output, inv_mlp = self.mlp_norm.forward(hidden + mlp)
            cache = LayerCache(inv_attention, attention_cache, inv_mlp, mlp_cache)
            return output, cache if keep_cache else None
        normed, inv_attention = self.attention_norm.forward(x)
        attended, attention_cache = self._attention(normed, positions)
        inv_attention_output = inv_mlp_output = None
        if self.attention_output_norm is not None:
            attended, inv_attention_output = self.attention_output_norm.forward(attended)
        hidden = x + attended
        normed, inv_mlp = self.mlp_norm.forward(hidden)
        # the output norm's 1/rms needs the MLP's output even when y is not wanted
        full = output_needed or not keep_cache
        mlp, mlp_cache = self._mlp(normed, full or self.mlp_output_norm is not None)
        if self.mlp_output_norm is not None:
            mlp, inv_mlp_output = self.mlp_output_norm.forward(mlp)
        output = hidden + mlp if full else None
        if not keep_cache:
            return output, None
        return output, LayerCache(inv_attention, attention_cache, inv_mlp, mlp_cache,
                                  inv_attention_output, inv_mlp_output)

    def backward(self, cache: LayerCache, grad_output: Tensor, positions: Positions, mode: str,
                 sinks: Sinks) -> Tensor:
        """Modified gradient at the output (B, T, hidden), fp32 → at the input, fp32."""
        kept = sinks.bias_replicated  # every norm's β is replicated
        if self.placement == "post":
            grad_sum = self.mlp_norm.backward(grad_output, cache.mlp_norm, kept)
            grad_hidden = grad_sum + self.reduce(self.mlp.backward(cache.mlp, grad_sum, mode,
                                                                   sinks))
            grad_sum = self.attention_norm.backward(grad_hidden, cache.attention_norm, kept)
            return grad_sum + self.reduce(self.attention.backward(cache.attention, grad_sum,
                                                                  positions, mode, sinks))
        grad_mlp = grad_output
        if self.mlp_output_norm is not None:
            grad_mlp = self.mlp_output_norm.backward(grad_mlp, cache.mlp_output_norm, kept)
        grad_normed = self.reduce(self.mlp.backward(cache.mlp, grad_mlp, mode, sinks))
        grad_hidden = grad_output + self.mlp_norm.backward(grad_normed, cache.mlp_norm, kept)
        grad_attention = grad_hidden
        if self.attention_output_norm is not None:
            grad_attention = self.attention_output_norm.backward(
                grad_attention, cache.attention_output_norm, kept)
        grad_normed = self.reduce(self.attention.backward(cache.attention, grad_attention,
                                                          positions, mode, sinks))
        return grad_hidden + self.attention_norm.backward(grad_normed, cache.attention_norm, kept)
