"""Fused attention part of the LRP backward: no T×T tensor is materialised.

With AttnLRP's rules (uniform rule on A·V and on Q̃K̃ᵀ, softmax rule = plain softmax
gradient) the modified backward of causal attention is the plain attention backward with
constant factors: ∂V = s·∂V_plain, ∂Q̃ = ½(1−s)·∂Q̃_plain, ∂K̃ = ½(1−s)·∂K̃_plain for the value
share s (½; 1 holds A constant). So the fused, tiled attention backward that PyTorch already
has (flash attention on CPU and CUDA, memory-efficient attention for fp32 on CUDA) computes it
with only the per-row log-sum-exp saved. ``attention_lrp_reference.py`` applies the rules one
by one on explicit T×T blocks; the tests compare the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_lrp_reference import attention_lrp_backward_reference


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """fp32 on CPU (fp64 stays fp64); on CUDA a half/bf16 model keeps its dtype so the flash
    kernel (which accumulates in fp32 internally) runs, as in the model's own backward."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_forward_for_lrp(
    queries: Tensor, keys: Tensor, values: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Causal attention (T, H, D) layout → (output (T, Hq, D), log-sum-exp or None).

    On CPU it calls the flash kernel directly, so the log-sum-exp the fused backward needs is
    kept; elsewhere it is PyTorch's SDPA and the backward recomputes the forward.
    """
    q, k, v = (x.transpose(0, 1)[None] for x in (queries, keys, values))  # (1, H, T, D)
    if queries.device.type == "cpu":
        output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, True
        )
        return output[0].transpose(0, 1), logsumexp
    output = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return output[0].transpose(0, 1), None


def attention_lrp_backward(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    grad_output: Tensor,
    value_share: float,
    *,
    sliding_window: int | None = None,
    output: Tensor | None = None,
    logsumexp: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Same contract as ``attention_lrp_backward_reference``, through the fused SDPA backward.

    ``output`` (T, Hq, D) and ``logsumexp`` from ``attention_forward_for_lrp`` skip the forward
    recomputation on CPU when they are in the compute dtype. Sliding-window models whose input
    is longer than the window fall back to the reference (their mask is not plain causal).
    """
    length = grad_output.shape[1]
    if sliding_window is not None and length > sliding_window:
        return attention_lrp_backward_reference(
            queries, keys, values, grad_output, value_share, sliding_window=sliding_window
        )
    dtype = _compute_dtype(queries.dtype, queries.device)
    q, k, v = (x.to(dtype).transpose(0, 1)[None] for x in (queries, keys, values))  # (1,H,T,D)
    grad = grad_output.to(dtype).transpose(1, 2)  # (B, Hq, T, D)
    if queries.device.type == "cpu":
        grad_q, grad_k, grad_v = _flash_backward_cpu(q, k, v, grad, output, logsumexp, dtype)
    else:
        grad_q, grad_k, grad_v = _sdpa_backward_autograd(q, k, v, grad)
    grad_values = (value_share * grad_v.float()).transpose(1, 2)
    if value_share == 1.0:
        return None, None, grad_values
    factor = 0.5 * (1.0 - value_share)
    return ((factor * grad_q.float()).transpose(1, 2), (factor * grad_k.float()).transpose(1, 2),
            grad_values)


def _flash_backward_cpu(q, k, v, grad, output, logsumexp, dtype):
    """PyTorch's CPU flash-attention backward, every target row against the same q, k, v."""
    rows = grad.shape[0]
    if output is None or logsumexp is None or output.dtype != dtype:
        output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, True
        )
    else:
        output = output.transpose(0, 1)[None]
    expand = lambda x: x.expand(rows, *x.shape[1:])  # noqa: E731  (views, no copies)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, expand(q), expand(k), expand(v), expand(output), expand(logsumexp), 0.0, True
    )


def _sdpa_backward_autograd(q, k, v, grad):
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
        output = F.scaled_dot_product_attention(leaves[0], *repeated, is_causal=True)
        return torch.autograd.grad(output, leaves, grad)
