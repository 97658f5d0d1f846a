"""LRP rules in gradient×input form: relevance(x) = x ⊙ modified_gradient(x).

Each function maps the modified gradient at an op's output to the modified gradient at its
input(s), given the forward quantities it needs. They are linear in the incoming gradient, so a
leading batch dimension of several targets (seeds) passes through unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_rule(grad_out: Tensor, weight: Tensor) -> Tensor:
    """ε-rule on a bias-free linear z = x Wᵀ equals the plain gradient: ∂ = ∂z · W."""
    return grad_out.to(weight.dtype) @ weight


def bias_relevance(grad_out: Tensor, bias: Tensor) -> Tensor:
    """ε-rule on z = x Wᵀ + b: the bias keeps its share, R(b) = Σ b ⊙ ∂z (per target row)."""
    return (grad_out.float() * bias.float()).flatten(1).sum(-1)


def rmsnorm_identity_rule(grad_out: Tensor, inv_rms: Tensor, gamma: Tensor) -> Tensor:
    """Identity rule on RMSNorm: 1/rms held constant, ∂x = ∂y ⊙ γ ⊙ (1/rms(x)) (γ: the scale
    actually applied, 1 + w for Gemma)."""
    return grad_out.float() * gamma.float() * inv_rms


def silu_identity_rule(grad_out: Tensor, gate: Tensor) -> Tensor:
    """Identity rule on SiLU: ∂x = ∂y ⊙ silu(x)/x = ∂y ⊙ sigmoid(x) (½ at x = 0)."""
    return grad_out * torch.sigmoid(gate.float())


def gelu_tanh_identity_rule(grad_out: Tensor, gate: Tensor) -> Tensor:
    """Identity rule on GELU-tanh: ∂x = ∂y ⊙ gelu(x)/x = ∂y ⊙ ½(1 + tanh(√(2/π)(x + 0.044715x³)))."""
    x = gate.float()
    return grad_out * (0.5 * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x.pow(3)))))


def uniform_product_rule(grad_out: Tensor, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """Uniform rule on y = a ⊙ b: each factor gets half, ∂a = ½ ∂y ⊙ b, ∂b = ½ ∂y ⊙ a."""
    return 0.5 * grad_out * right.float(), 0.5 * grad_out * left.float()


def softmax_rule(grad_out: Tensor, probs: Tensor) -> Tensor:
    """AttnLRP softmax rule = plain softmax gradient: ∂x = s ⊙ (∂s − Σⱼ s ⊙ ∂s)."""
    return probs * (grad_out - (probs * grad_out).sum(-1, keepdim=True))


def attention_value_rule(
    grad_out: Tensor, probs: Tensor, values: Tensor, share: float
) -> tuple[Tensor | None, Tensor]:
    """Uniform rule on o = A·V (share ½): ∂A = ½ ∂o Vᵀ, ∂V = ½ Aᵀ ∂o; share 1 holds A constant.

    Shapes: grad_out (B, G, T, D) for the G query heads sharing one kv head, probs (G, T, S),
    values (S, D). ∂V is summed over the G heads (GQA: repeated kv heads are summed back).
    """
    grad_values = share * torch.einsum("gts,bgtd->bsd", probs, grad_out)
    if share == 1.0:
        return None, grad_values
    # scale the small (…, D) factor, not the (…, T, S) product
    grad_probs = torch.einsum("bgtd,sd->bgts", grad_out * (1.0 - share), values)
    return grad_probs, grad_values


def attention_score_rule(
    grad_scores: Tensor, queries: Tensor, keys: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Uniform rule on S = scale·Q̃K̃ᵀ: ∂Q̃ = ½·scale·∂S K̃, ∂K̃ = ½·scale·∂Sᵀ Q̃ (summed over G).

    Shapes: grad_scores (B, G, T, S), queries (G, T, D), keys (S, D).
    """
    half = 0.5 * scale
    grad_queries = half * torch.einsum("bgts,sd->bgtd", grad_scores, keys)
    grad_keys = half * torch.einsum("bgts,gtd->bsd", grad_scores, queries)
    return grad_queries, grad_keys


# ---- mixture of experts (LXT's Qwen3-MoE rules) ------------------------------------------------
def routed_expert_rule(grad_z: Tensor, hidden: Tensor, weight: Tensor, share: float
                       ) -> tuple[Tensor, Tensor]:
    """Uniform rule on y = w·(D h) given z = Dᵀ∂y: ∂h = share·w·z, ∂w = (1 − share)·Σᵢ hᵢ zᵢ (share 1: w held)."""
    grad_hidden = grad_z * (share * weight.float()[..., None])
    return grad_hidden, (1.0 - share) * (grad_z * hidden.float()).sum(-1)


def renormalisation_rule(grad_weights: Tensor, weights: Tensor, total: Tensor) -> Tensor:
    """Plain gradient of w = s / Σⱼ sⱼ (top-k renormalisation): ∂s = (∂w − Σⱼ wⱼ ∂wⱼ) / Σⱼ sⱼ."""
    return (grad_weights - (weights * grad_weights).sum(-1, keepdim=True)) / total


# ---- additive-position models (BERT, RoBERTa, GPT-2): LayerNorm, GELU, tanh, embedding sum ----
def layernorm_identity_rule(grad_out: Tensor, inv_std: Tensor, gamma: Tensor | None) -> Tensor:
    """Identity rule on LayerNorm (LXT): σ held constant, the mean not: ∂x = ∂u − mean(∂u), ∂u = ∂y ⊙ γ/σ."""
    scaled = grad_out.float() * inv_std
    if gamma is not None:
        scaled = scaled * gamma.float()
    return scaled - scaled.mean(-1, keepdim=True)


def gelu_identity_rule(grad_out: Tensor, gate: Tensor) -> Tensor:
    """Identity rule on GELU (erf): ∂x = ∂y ⊙ gelu(x)/x = ∂y ⊙ Φ(x) = ∂y ⊙ ½(1 + erf(x/√2))."""
    return grad_out * (0.5 * (1.0 + torch.erf(gate.float() * 0.7071067811865476)))


def quick_gelu_identity_rule(grad_out: Tensor, gate: Tensor) -> Tensor:
    """Identity rule on quick GELU x·σ(1.702x) (CLIP): ∂x = ∂y ⊙ σ(1.702x)."""
    return grad_out * torch.sigmoid(1.702 * gate.float())


def tanh_identity_rule(grad_out: Tensor, pre: Tensor) -> Tensor:
    """Identity rule on tanh: ∂x = ∂y ⊙ tanh(x)/x (1 − x²/3 near 0, 1 at x = 0)."""
    x = pre.float()
    small = x.abs() < 1e-4
    ratio = torch.where(small, 1.0 - x * x / 3.0, torch.tanh(x) / torch.where(small, 1.0, x))
    return grad_out * ratio


def additive_embedding_rule(grad_sum: Tensor, *addends: Tensor | None) -> tuple[Tensor | None, ...]:
    """ε-rule on x = Σᵢ aᵢ (exact in gradient×input): R(aᵢ)ₜ = Σ_d aᵢ[t,d] ∂x[t,d], per addend (None stays None)."""
    return tuple(None if a is None else (a.float() * grad_sum.float()).sum(-1) for a in addends)
