"""Fused attention part of the LRP backward: no T×T tensor is materialised.

With AttnLRP's rules (uniform rule on A·V and on Q̃K̃ᵀ, softmax rule = plain softmax
gradient) the modified backward of attention is the plain attention backward with constant
factors: ∂V = s·∂V_plain, ∂Q̃ = ½(1−s)·∂Q̃_plain, ∂K̃ = ½(1−s)·∂K̃_plain for the value
share s (½; 1 holds A constant). So the fused, tiled attention backward that PyTorch already
has (flash attention on CPU and CUDA, memory-efficient attention for fp32 on CUDA) computes it
with only the per-row log-sum-exp saved. ``attention_lrp_reference.py`` applies the rules one
by one on explicit score blocks; the tests compare the two.

Sliding-window layers longer than their window run in tiles of queries: a tile [q0, q1) sees
only the keys ``key_range`` gives (at most W − 1 before q0), through the same fused kernels with
that tile's band mask, so memory is O(T·(W + tile)) per head, not T×T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_lrp_reference import band_mask, key_range

# queries per tile of a sliding-window layer: bench/perf/cpu_bench.py --window measures it
WINDOW_TILE = 128


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """fp32 on CPU (fp64 stays fp64); on CUDA a half/bf16 model keeps its dtype so the flash
    kernel (which accumulates in fp32 internally) runs, as in the model's own backward."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cpu_flash(device: torch.device) -> bool:
    """The CPU flash kernels are called directly (they keep the log-sum-exp); elsewhere SDPA."""
    return device.type == "cpu"


def _windowed(length: int, sliding_window: int | None) -> bool:
    """A window only masks anything when the input is longer than it."""
    return sliding_window is not None and length > sliding_window


def _tiles(length: int, tile: int, causal: bool, window: int):
    """(q0, q1, k0, k1) per tile of queries, with the keys it sees."""
    for q0 in range(0, length, tile):
        q1 = min(length, q0 + tile)
        yield (q0, q1, *key_range(q0, q1, length, causal, window))


def attention_forward_for_lrp(
    queries: Tensor, keys: Tensor, values: Tensor, *, causal: bool = True,
    scale: float | None = None, sliding_window: int | None = None, tile: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Attention, (T, H, D) layout → (output (T, Hq, D), log-sum-exp or None).

    ``causal``: else bidirectional; ``scale``: of the scores, None for 1/√D; ``sliding_window``:
    a query sees the W keys up to itself (bidirectional: within W either side), run in tiles of
    ``tile`` queries (default ``WINDOW_TILE``). On CPU it calls the flash kernel directly, so
    the log-sum-exp the fused backward needs is kept; elsewhere it is PyTorch's SDPA and the
    backward recomputes the forward.
    """
    length = queries.shape[0]
    q, k, v = (x.transpose(0, 1)[None] for x in (queries, keys, values))  # (1, H, T, D)
    if _windowed(length, sliding_window):
        return _windowed_forward(q, k, v, causal, scale, sliding_window, tile or WINDOW_TILE)
    if _cpu_flash(queries.device):
        output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale
        )
        return output[0].transpose(0, 1), logsumexp
    output = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                            enable_gqa=True)
    return output[0].transpose(0, 1), None


def _windowed_forward(q, k, v, causal, scale, window, tile):
    """Tile by tile: each tile's queries against the keys they see, with the tile's band mask."""
    length = q.shape[2]
    output = q.new_empty(length, q.shape[1], v.shape[3])
    logsumexp = None
    for q0, q1, k0, k1 in _tiles(length, tile, causal, window):
        mask = band_mask(q0 - k0, q1 - q0, k1 - k0, causal, window, q.dtype, str(q.device))
        parts = (q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1])
        if _cpu_flash(q.device):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                *parts, 0.0, False, attn_mask=mask, scale=scale
            )
            if logsumexp is None:
                logsumexp = lse.new_empty(1, q.shape[1], length)
            logsumexp[..., q0:q1] = lse
        else:
            out = F.scaled_dot_product_attention(*parts, attn_mask=mask, scale=scale,
                                                 enable_gqa=True)
        output[q0:q1] = out[0].transpose(0, 1)
    return output, logsumexp


def attention_lrp_backward(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    grad_output: Tensor,
    value_share: float,
    *,
    sliding_window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    output: Tensor | None = None,
    logsumexp: Tensor | None = None,
    tile: int | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Same contract as ``attention_lrp_backward_reference``, through the fused SDPA backward.

    ``output`` (T, Hq, D) and ``logsumexp`` from ``attention_forward_for_lrp`` (same
    ``causal``, ``scale``, ``sliding_window``) skip the forward recomputation on CPU when they
    are in the compute dtype. Sliding-window layers longer than their window run in tiles of
    ``tile`` queries, each against the keys it sees.
    """
    length = grad_output.shape[1]
    dtype = _compute_dtype(queries.dtype, queries.device)
    q, k, v = (x.to(dtype).transpose(0, 1)[None] for x in (queries, keys, values))  # (1,H,T,D)
    grad = grad_output.to(dtype).transpose(1, 2)  # (B, Hq, T, D)
    if output is not None and (logsumexp is None or output.dtype != dtype):
        output = logsumexp = None
    if output is not None:
        output = output.transpose(0, 1)[None]
    if _windowed(length, sliding_window):
        grad_q, grad_k, grad_v = _windowed_backward(q, k, v, grad, output, logsumexp, causal,
                                                    scale, sliding_window, tile or WINDOW_TILE)
    elif _cpu_flash(queries.device):
        grad_q, grad_k, grad_v = _flash_backward_cpu(q, k, v, grad, output, logsumexp, causal,
                                                     scale)
    else:
        grad_q, grad_k, grad_v = _sdpa_backward_autograd(q, k, v, grad, causal=causal,
                                                         scale=scale)
    # the kernels' gradients are fresh tensors: scale them in place (no second copy)
    grad_values = grad_v.float().mul_(value_share).transpose(1, 2)
    if value_share == 1.0:
        return None, None, grad_values
    factor = 0.5 * (1.0 - value_share)
    return (grad_q.float().mul_(factor).transpose(1, 2),
            grad_k.float().mul_(factor).transpose(1, 2), grad_values)


def _flash_backward_cpu(q, k, v, grad, output, logsumexp, causal=True, scale=None,
                        attn_mask=None):
    """PyTorch's CPU flash-attention backward, every target row against the same q, k, v
    (``output`` (1, Hq, T, D) and ``logsumexp`` recomputed when None)."""
    rows = grad.shape[0]
    if output is None:
        output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=attn_mask, scale=scale
        )
    expand = lambda x: x.expand(rows, *x.shape[1:])  # noqa: E731  (views, no copies)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, expand(q), expand(k), expand(v), expand(output), expand(logsumexp), 0.0, causal,
        attn_mask=attn_mask, scale=scale,
    )


def _windowed_backward(q, k, v, grad, output, logsumexp, causal, scale, window, tile):
    """Tile by tile: ∂Q̃ of a tile's queries is whole; ∂K̃ and ∂V of the keys it sees add up
    over the tiles that see them (fp32, fp64 for fp64 inputs)."""
    rows, num_heads, length, head_dim = grad.shape
    accumulate = torch.float64 if q.dtype == torch.float64 else torch.float32
    grad_q = grad.new_empty(rows, num_heads, length, head_dim, dtype=accumulate)
    grad_k = grad.new_zeros(rows, *k.shape[1:], dtype=accumulate)
    grad_v = grad.new_zeros(rows, *v.shape[1:], dtype=accumulate)
    for q0, q1, k0, k1 in _tiles(length, tile, causal, window):
        mask = band_mask(q0 - k0, q1 - q0, k1 - k0, causal, window, q.dtype, str(q.device))
        parts = (q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], grad[:, :, q0:q1])
        if _cpu_flash(q.device):
            tile_output = None if output is None else output[:, :, q0:q1]
            tile_lse = None if output is None else logsumexp[..., q0:q1]
            tile_q, tile_k, tile_v = _flash_backward_cpu(*parts, tile_output, tile_lse, False,
                                                         scale, mask)
        else:
            tile_q, tile_k, tile_v = _sdpa_backward_autograd(*parts, causal=False, scale=scale,
                                                             attn_mask=mask)
        grad_q[:, :, q0:q1] = tile_q
        grad_k[:, :, k0:k1] += tile_k
        grad_v[:, :, k0:k1] += tile_v
    return grad_q, grad_k, grad_v


def _sdpa_backward_autograd(q, k, v, grad, *, causal=True, scale=None, attn_mask=None):
    """Any device: autograd through SDPA (flash / memory-efficient kernels pick themselves).

    The kv heads are repeated to the query heads explicitly (not every fused kernel takes
    GQA) and their gradients summed back per group.
    """
    rows, num_heads = grad.shape[:2]
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    with torch.enable_grad():
        leaves = [x.expand(rows, *x.shape[1:]).detach().requires_grad_() for x in (q, k, v)]
        repeated = [x.repeat_interleave(group, dim=1) for x in leaves[1:]]
        output = F.scaled_dot_product_attention(leaves[0], *repeated, attn_mask=attn_mask,
                                                is_causal=causal, scale=scale)
        return torch.autograd.grad(output, leaves, grad)
