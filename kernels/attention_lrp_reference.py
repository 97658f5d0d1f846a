"""Plain-PyTorch reference for the attention part of the LRP backward (explicit score blocks).

Applies the rules of ``vllm_pelrp.engine.rules`` one by one to recomputed attention
probabilities: uniform rule on A·V, AttnLRP's softmax rule, uniform rule on Q̃K̃ᵀ. It
materialises (targets × heads × queries × keys) fp32 blocks of a block of queries against the
keys that block sees (bounded by ``block_bytes``; a sliding window bounds the keys by the
window plus the block, so no T×T tensor then); the fused version in ``attention_lrp.py`` must
equal it. ``key_range`` and ``band_mask`` say which keys a block of queries sees; the fused
windowed path tiles with them too.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

# absolute: a server started from the repo root may also import this folder as `kernels`
from vllm_pelrp.engine.rules import attention_score_rule, attention_value_rule, softmax_rule

BLOCK_BYTES = 256 * 2**20


def key_range(q0: int, q1: int, length: int, causal: bool, window: int | None) -> tuple[int, int]:
    """Keys [k0, k1) that queries [q0, q1) see: query i sees key j iff j ≤ i (causal) and
    i − W < j (window W; bidirectional: |i − j| < W)."""
    k0 = 0 if window is None else max(0, q0 - window + 1)
    if causal:
        return k0, q1
    return k0, length if window is None else min(length, q1 + window - 1)


@functools.lru_cache(maxsize=8)  # the same tiles recur for every layer, kv head and tile
def band_mask(offset: int, queries: int, keys: int, causal: bool, window: int | None,
              dtype: torch.dtype, device: str) -> Tensor:
    """Additive mask (queries, keys) of a tile whose first query sits ``offset`` positions after
    its first key: 0 where ``key_range``'s rule lets the query see the key, −inf elsewhere."""
    distance = (torch.arange(queries, device=device)[:, None] + offset
                - torch.arange(keys, device=device)[None, :])  # query − key position
    blocked = torch.zeros(queries, keys, dtype=torch.bool, device=device)
    if causal:
        blocked |= distance < 0
    if window is not None:
        blocked |= distance >= window
        if not causal:
            blocked |= distance <= -window
    return torch.zeros(queries, keys, dtype=dtype, device=device).masked_fill(blocked, float("-inf"))


def _query_block(length: int, group: int, block_bytes: int, causal: bool,
                 window: int | None) -> int:
    """Queries per block, so that one (G, block, keys seen) fp32 block fits ``block_bytes``."""
    if window is None:
        if 4 * group * length * length <= block_bytes:
            return length
        return max(64, block_bytes // (4 * group * length))
    reach = (window - 1) * (1 if causal else 2)  # keys seen beyond the block's own positions
    # 4·G·b·(b + reach) ≤ block_bytes, and b ≤ W so that a block sees O(W) keys, not T
    block = int((math.sqrt(reach * reach + block_bytes / group) - reach) / 2)
    return max(16, min(length, window, block))


def attention_lrp_backward_reference(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    grad_output: Tensor,
    value_share: float,
    *,
    sliding_window: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    block_bytes: int | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Attention o = softmax(scale·Q̃K̃ᵀ + mask)·V: modified ∂o → modified ∂Q̃, ∂K̃, ∂V (fp32).

    queries (T, Hq, D) after RoPE, keys/values (T, Hkv, D), grad_output (B, T, Hq, D): one row
    per target. The mask: causal or bidirectional, with an optional sliding window (``key_range``);
    ``scale`` defaults to 1/√D. ``block_bytes`` bounds one fp32 block (default ``BLOCK_BYTES``).
    ``value_share`` is the uniform rule's share for V (½), or 1 to hold A constant
    (CP-LRP: then ∂Q̃ and ∂K̃ are None). Returns (B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D).
    """
    rows, length, num_heads, head_dim = grad_output.shape
    block_bytes = block_bytes or BLOCK_BYTES
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    window = sliding_window if sliding_window is not None and sliding_window < length else None
    grad_values = grad_output.new_zeros(rows, length, num_kv_heads, head_dim, dtype=torch.float32)
    grad_queries = grad_keys = None
    if value_share != 1.0:
        grad_queries = torch.zeros(rows, length, num_heads, head_dim, device=grad_output.device)
        grad_keys = torch.zeros_like(grad_values)
    # Blocks of target rows × query rows, so one (rows, G, queries, keys) fp32 block stays
    # within block_bytes; a query block only needs the keys it sees (key_range).
    query_block = _query_block(length, group, block_bytes, causal, window)
    widest = max(k1 - k0 for k0, k1 in (key_range(q0, min(length, q0 + query_block), length,
                                                  causal, window)
                                        for q0 in range(0, length, query_block)))
    rows_per_block = max(1, min(rows, block_bytes // (4 * group * query_block * widest)))
    for kv_head in range(num_kv_heads):
        heads = slice(kv_head * group, (kv_head + 1) * group)
        all_queries = queries[:, heads].transpose(0, 1).float()  # (G, T, D)
        all_keys = keys[:, kv_head].float()  # (T, D)
        all_values = values[:, kv_head].float()
        for q0 in range(0, length, query_block):
            q1 = min(length, q0 + query_block)
            k0, k1 = key_range(q0, q1, length, causal, window)
            block_queries, block_keys = all_queries[:, q0:q1], all_keys[k0:k1]
            mask = band_mask(q0 - k0, q1 - q0, k1 - k0, causal, window, torch.float32,
                             str(block_keys.device))
            scores = (block_queries @ block_keys.T).mul_(scale).add_(mask)
            probs = torch.softmax(scores, dim=-1)  # (G, tq, keys seen)
            del scores
            for start in range(0, rows, rows_per_block):
                block = slice(start, start + rows_per_block)
                grad_out = grad_output[block, q0:q1, heads].transpose(1, 2).float()
                grad_probs, grad_v = attention_value_rule(
                    grad_out, probs, all_values[k0:k1], value_share
                )
                grad_values[block, k0:k1, kv_head] += grad_v
                if grad_probs is None:
                    continue
                grad_scores = softmax_rule(grad_probs, probs)
                grad_q, grad_k = attention_score_rule(grad_scores, block_queries, block_keys, scale)
                grad_queries[block, q0:q1, heads] = grad_q.transpose(1, 2)
                grad_keys[block, k0:k1, kv_head] += grad_k
    return grad_queries, grad_keys, grad_values
