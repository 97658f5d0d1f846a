"""The shared building blocks of every decoder the engine implements: each block's forward (as the
source framework computes it) and the rule that carries the modified gradient back through it.

A model file of ``vllm_pelrp.models`` picks among them through its ``DecoderSpec``; the layer
forward and backward of ``backward.py`` compose them. LayerNorm with bias and the plain GELU
activations serve the additive-position models (BERT, GPT-2: ``additive.py``). Nothing here
knows an architecture's name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .rules import (
    bias_relevance,
    gelu_identity_rule,
    gelu_tanh_identity_rule,
    layernorm_identity_rule,
    linear_rule,
    rmsnorm_identity_rule,
    silu_identity_rule,
)
from .spec import DecoderSpec


# ---- RMSNorm (plain γ, or Gemma's 1 + γ) ---------------------------------------------------------
def norm_scale(spec: DecoderSpec, gamma: Tensor) -> Tensor:
    """The factor RMSNorm applies: γ, or (1 + γ) in fp32 for Gemma."""
    return gamma.float() + spec.norm_offset if spec.norm_offset else gamma


def rms_norm(spec: DecoderSpec, x: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """RMSNorm over the last dim with fp32 statistics, as in HF: LLaMA casts back then scales,
    Gemma scales in fp32 then casts. Returns (y, 1/rms) with 1/rms fp32, keepdim."""
    x32 = x.float()
    inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + spec.rms_norm_eps)
    if spec.norm_scale_in_float:
        return (x32 * inv_rms * norm_scale(spec, gamma).float()).to(x.dtype), inv_rms
    return norm_scale(spec, gamma) * (x32 * inv_rms).to(x.dtype), inv_rms


def rms_norm_backward(spec: DecoderSpec, grad_out: Tensor, inv_rms: Tensor, gamma: Tensor) -> Tensor:
    """Identity rule (1/rms held constant) through ``rms_norm``."""
    return rmsnorm_identity_rule(grad_out, inv_rms, norm_scale(spec, gamma))


# ---- linear, with or without bias ---------------------------------------------------------------
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """z = x Wᵀ (+ b)."""
    out = x @ weight.T
    return out if bias is None else out + bias


def linear_backward(grad_out: Tensor, weight: Tensor, bias: Tensor | None,
                    kept: Tensor | None) -> Tensor:
    """ε-rule through ``linear``: the plain gradient; a bias keeps its share, added to ``kept``
    (B,). ``grad_out`` is (B, T, out_features)."""
    if bias is not None and kept is not None:
        kept += bias_relevance(grad_out, bias)
    return linear_rule(grad_out, weight).float()


# ---- gated MLP: down(act(gate) ⊙ up) ---------------------------------------------------------
def activation(spec: DecoderSpec, gate: Tensor) -> Tensor:
    if spec.activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh")
    return F.silu(gate)


def activation_backward(spec: DecoderSpec, grad_out: Tensor, gate: Tensor) -> Tensor:
    """Identity rule through the gate's activation (SiLU or GELU-tanh)."""
    if spec.activation == "gelu_tanh":
        return gelu_tanh_identity_rule(grad_out, gate)
    return silu_identity_rule(grad_out, gate)


# ---- LayerNorm with bias (BERT, GPT-2): the mean flows, σ is held ------------------------------
def layer_norm(x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
               ) -> tuple[Tensor, Tensor]:
    """LayerNorm over the last dim as torch.nn.LayerNorm computes it. Returns (y, 1/σ), 1/σ fp32
    keepdim (biased variance, as LayerNorm)."""
    y = F.layer_norm(x, (x.shape[-1],), gamma, beta, eps)
    inv_std = torch.rsqrt(x.float().var(-1, unbiased=False, keepdim=True) + eps)
    return y, inv_std


def layer_norm_backward(grad_out: Tensor, inv_std: Tensor, gamma: Tensor | None,
                        beta: Tensor | None, kept: Tensor | None) -> Tensor:
    """Identity rule (σ held, the mean not: LXT) through ``layer_norm``; β keeps its share
    Σ β ⊙ ∂y, added to ``kept`` (B,). ``grad_out`` is (B, T, hidden)."""
    if beta is not None and kept is not None:
        kept += bias_relevance(grad_out, beta)
    return layernorm_identity_rule(grad_out, inv_std, gamma)


# ---- non-gated MLP activations (BERT: erf GELU; GPT-2: GELU-tanh) -----------------------------
def gelu(x: Tensor, approximate: bool) -> Tensor:
    """GELU, exact (erf) or the tanh approximation (GPT-2's gelu_new)."""
    return F.gelu(x, approximate="tanh" if approximate else "none")


def gelu_backward(grad_out: Tensor, x: Tensor, approximate: bool) -> Tensor:
    """Identity rule through ``gelu``."""
    if approximate:
        return gelu_tanh_identity_rule(grad_out, x)
    return gelu_identity_rule(grad_out, x)
