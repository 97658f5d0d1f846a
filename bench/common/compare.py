"""How the benchmarks compare two relevance vectors (torch only, so bare GPU machines import it)."""

from __future__ import annotations

import torch


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖₂ / ‖expected‖₂, in float64."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def top_k_overlap(actual: torch.Tensor, expected: torch.Tensor, k: int = 10) -> float:
    """Share of the k positions of largest |expected| that are also among the k of largest
    |actual| (1: the same k tokens, in any order)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    k = min(k, expected.numel())
    top = (set(x.abs().topk(k).indices.tolist()) for x in (actual, expected))
    return len(set.intersection(*top)) / k
