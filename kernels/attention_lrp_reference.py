"""Plain-PyTorch reference for the attention part of the LRP backward (explicit T×T blocks).

Applies the rules of ``vllm_pelrp.engine.rules`` one by one to recomputed attention
probabilities: uniform rule on A·V, AttnLRP's softmax rule, uniform rule on Q̃K̃ᵀ. It
materialises (targets × heads × queries × keys) fp32 blocks, bounded by ``block_bytes``; the
fused version in ``attention_lrp.py`` must equal it.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

# absolute: a server started from the repo root may also import this folder as `kernels`
from vllm_pelrp.engine.rules import attention_score_rule, attention_value_rule, softmax_rule

BLOCK_BYTES = 256 * 2**20


@functools.lru_cache(maxsize=4)  # the same blocks recur for every layer and kv head
def _block_mask(window: int | None, q0: int, q1: int, keys: int, device: str) -> Tensor:
    """Additive causal (and sliding-window) mask for queries q0..q1-1 against keys 0..keys-1."""
    query_index = torch.arange(q0, q1, device=device)[:, None]
    key_index = torch.arange(keys, device=device)[None, :]
    blocked = key_index > query_index
    if window is not None:
        blocked |= key_index <= query_index - window
    return torch.zeros(q1 - q0, keys, device=device).masked_fill(blocked, float("-inf"))


def attention_lrp_backward_reference(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    grad_output: Tensor,
    value_share: float,
    *,
    sliding_window: int | None = None,
    block_bytes: int | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Causal attention o = softmax(Q̃K̃ᵀ/√D)·V: modified ∂o → modified ∂Q̃, ∂K̃, ∂V (fp32).

    queries (T, Hq, D) after RoPE, keys/values (T, Hkv, D), grad_output (B, T, Hq, D): one row
    per target. ``block_bytes`` bounds one fp32 block (default ``BLOCK_BYTES``). ``value_share`` is the uniform rule's share for V (½), or 1 to hold A constant
    (CP-LRP: then ∂Q̃ and ∂K̃ are None). Returns (B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D).
    """
    rows, length, num_heads, head_dim = grad_output.shape
    block_bytes = block_bytes or BLOCK_BYTES
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    grad_values = grad_output.new_zeros(rows, length, num_kv_heads, head_dim, dtype=torch.float32)
    grad_queries = grad_keys = None
    if value_share != 1.0:
        grad_queries = torch.zeros(rows, length, num_heads, head_dim, device=grad_output.device)
        grad_keys = torch.zeros_like(grad_values)
    # Blocks of target rows × query rows, so one (rows, G, queries, keys) fp32 block stays
    # within block_bytes; causal: a query block only needs the keys up to its end.
    full_row_bytes = 4 * group * length * length
    rows_per_block = max(1, min(rows, block_bytes // full_row_bytes))
    query_block = length if full_row_bytes <= block_bytes else max(
        64, block_bytes // (4 * group * length)
    )
    for kv_head in range(num_kv_heads):
        heads = slice(kv_head * group, (kv_head + 1) * group)
        all_queries = queries[:, heads].transpose(0, 1).float()  # (G, T, D)
        all_keys = keys[:, kv_head].float()  # (S, D)
        all_values = values[:, kv_head].float()
        for q0 in range(0, length, query_block):
            q1 = min(length, q0 + query_block)
            block_queries, block_keys = all_queries[:, q0:q1], all_keys[:q1]
            mask = _block_mask(sliding_window, q0, q1, q1, str(block_keys.device))
            scores = (block_queries @ block_keys.T).mul_(scale).add_(mask)
            probs = torch.softmax(scores, dim=-1)  # (G, tq, S)
            del scores
            for start in range(0, rows, rows_per_block):
                block = slice(start, start + rows_per_block)
                grad_out = grad_output[block, q0:q1, heads].transpose(1, 2).float()
                grad_probs, grad_v = attention_value_rule(
                    grad_out, probs, all_values[:q1], value_share
                )
                grad_values[block, :q1, kv_head] += grad_v
                if grad_probs is None:
                    continue
                grad_scores = softmax_rule(grad_probs, probs)
                grad_q, grad_k = attention_score_rule(grad_scores, block_queries, block_keys, scale)
                grad_queries[block, q0:q1, heads] = grad_q.transpose(1, 2)
                grad_keys[block, :q1, kv_head] += grad_k
    return grad_queries, grad_keys, grad_values
