"""The shared building blocks of every decoder the engine implements: each block's forward (as the
source framework computes it) and the rule that carries the modified gradient back through it.

A model file of ``vllm_pelrp.models`` picks among them through its ``DecoderSpec``; the layer
forward and backward of ``backward.py`` compose them. The MLP is a block object chosen per layer
(``mlp_block``: a dense gated MLP or a mixture of experts) whose ``forward`` returns its cache and
whose ``backward`` applies the rules. LayerNorm with bias and the plain GELU
activations serve the additive-position models (BERT, GPT-2: ``additive.py``). Nothing here
knows an architecture's name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .rules import (
    bias_relevance,
    gelu_identity_rule,
    gelu_tanh_identity_rule,
    layernorm_identity_rule,
    linear_rule,
    renormalisation_rule,
    rmsnorm_identity_rule,
    routed_expert_rule,
    silu_identity_rule,
    softmax_rule,
    uniform_product_rule,
)
from .spec import DecoderSpec, ExpertWeights, LayerWeights, MoEWeights


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


# ---- attention: what the softmax rule drops ------------------------------------------------
def attention_softmax_loss(queries: Tensor, keys: Tensor, values: Tensor, grad_queries: Tensor,
                           grad_keys: Tensor, grad_values: Tensor) -> Tensor:
    """Σ R(probs) − Σ R(scores) per row (B,), from the uniform rules' conservation:
    Σ R(probs) = Σ v ⊙ ∂v (A·V) and Σ R(scores) = Σ q ⊙ ∂q + k ⊙ ∂k (QKᵀ), so no pass over
    the T×T probabilities is needed. Inputs (T, H, D), gradients (B, T, H, D)."""
    return ((grad_values * values.float()).sum((1, 2, 3))
            - (grad_queries * queries.float()).sum((1, 2, 3))
            - (grad_keys * keys.float()).sum((1, 2, 3)))


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


def tensor_bytes(cache: object) -> int:
    """Bytes of the tensors a cache holds, through nested caches and lists of them."""
    if isinstance(cache, Tensor):
        return cache.numel() * cache.element_size()
    if isinstance(cache, (list, tuple)):
        return sum(tensor_bytes(item) for item in cache)
    if is_dataclass(cache):
        return sum(tensor_bytes(getattr(cache, f.name)) for f in fields(cache))
    return 0


@dataclass
class GatedMLPCache:
    """What a gated MLP's backward reads: the gate and up projections and act(gate)."""

    gate: Tensor
    up: Tensor
    activated: Tensor


class GatedMLP:
    """The dense MLP block, down(act(gate) ⊙ up) over (out, in) weights (a layer's, or one
    expert's). Under tensor parallelism its output and its input gradient are this rank's
    partial sums (the caller all-reduces them)."""

    def __init__(self, spec: DecoderSpec, weights: LayerWeights | ExpertWeights) -> None:
        self.spec, self.weights = spec, weights

    def hidden(self, x: Tensor) -> GatedMLPCache:
        gate = x @ self.weights.gate_proj.T
        up = x @ self.weights.up_proj.T
        return GatedMLPCache(gate, up, activation(self.spec, gate))

    def forward(self, x: Tensor, output_needed: bool = True
                ) -> tuple[Tensor | None, GatedMLPCache]:
        """(T, hidden) → (output or None when not needed, cache); no output skips the down
        projection."""
        cache = self.hidden(x)
        if not output_needed:
            return None, cache
        return (cache.activated * cache.up) @ self.weights.down_proj.T, cache

    def backward_from_product(self, cache: GatedMLPCache, grad_product: Tensor) -> Tensor:
        """∂ at act(gate) ⊙ up → ∂ at the input: uniform rule on the product, identity rule on
        the activation, ε-rule (the gradient) through gate and up."""
        grad_act, grad_up = uniform_product_rule(grad_product, cache.activated, cache.up)
        grad_gate = activation_backward(self.spec, grad_act, cache.gate)
        return (linear_rule(grad_gate, self.weights.gate_proj).float()
                + linear_rule(grad_up, self.weights.up_proj).float())

    def backward(self, cache: GatedMLPCache, grad_out: Tensor, mode: str, absorbed: Tensor
                 ) -> Tensor:
        """∂ at the output (B, T, hidden) → ∂ at the input, fp32 (nothing absorbed)."""
        grad_product = linear_rule(grad_out, self.weights.down_proj).float()
        return self.backward_from_product(cache, grad_product)


@dataclass
class MoECache:
    """What a mixture of experts' backward reads: the router's logits (T, E) and fp32
    probabilities, the chosen experts (T, k) and their routing weights (fp32, renormalised
    if the spec says so), and per expert the tokens routed to it, the slot (of k) they chose it
    in and its gated MLP's cache on those tokens (None for an expert no token chose)."""

    logits: Tensor
    probs: Tensor
    chosen: Tensor
    routing_weights: Tensor
    tokens: list[Tensor | None]
    slots: list[Tensor | None]
    experts: list[GatedMLPCache | None]


class MixtureOfExperts:
    """The mixture-of-experts MLP block (Qwen3-MoE, Mixtral), as Hugging Face computes it: router
    logits x Rᵀ, softmax over the experts in fp32, the top k, renormalised over them when the
    spec says so, and Σₖ wₖ · expertₖ(x) with gated experts. Rules as LXT's Qwen3-MoE rules:
    the uniform rule on expert output × routing weight, the identity rule on the gated
    activation (``GatedMLP``), and the routing weight's share back through the renormalisation
    and the softmax by their gradients (AttnLRP's softmax rule), then the router (ε-rule). What
    the routing path drops, Σ R(w) − Σ R(logits), is added to ``absorbed``. ``cp-lrp`` holds the
    routing weights constant, as it holds the attention's probabilities: all relevance flows
    through the experts and nothing is absorbed."""

    def __init__(self, spec: DecoderSpec, weights: MoEWeights) -> None:
        assert spec.moe is not None
        self.spec, self.weights = spec, weights
        self.experts = [GatedMLP(spec, expert) for expert in weights.experts]

    def forward(self, x: Tensor, output_needed: bool = True) -> tuple[Tensor | None, MoECache]:
        moe = self.spec.moe
        logits = x @ self.weights.router.T
        probs = torch.softmax(logits.float(), dim=-1)
        top, chosen = torch.topk(probs, moe.top_k, dim=-1)
        if moe.renormalize:
            top = top / top.sum(-1, keepdim=True)
        output = torch.zeros_like(x) if output_needed else None
        tokens: list[Tensor | None] = []
        slots: list[Tensor | None] = []
        caches: list[GatedMLPCache | None] = []
        for index, expert in enumerate(self.experts):
            token, slot = torch.nonzero(chosen == index, as_tuple=True)
            if token.numel() == 0:  # no token chose this expert
                token = slot = cache = None
            else:
                out, cache = expert.forward(x[token], output_needed)
                if output is not None:
                    output.index_add_(0, token,
                                      (out.float() * top[token, slot, None]).to(x.dtype))
            tokens.append(token)
            slots.append(slot)
            caches.append(cache)
        return output, MoECache(logits, probs, chosen, top, tokens, slots, caches)

    def backward(self, cache: MoECache, grad_out: Tensor, mode: str, absorbed: Tensor) -> Tensor:
        """∂ at the output (B, T, hidden) → ∂ at the input, fp32; adds the routing path's loss
        into ``absorbed`` (B,)."""
        share = 1.0 if mode == "cp-lrp" else 0.5  # the experts' share of w · expert(x)
        grad_x = torch.zeros(grad_out.shape, dtype=torch.float32, device=grad_out.device)
        grad_weights = torch.zeros(*grad_out.shape[:2], cache.chosen.shape[-1],
                                   device=grad_out.device)
        for expert, token, slot, part in zip(self.experts, cache.tokens, cache.slots,
                                             cache.experts):
            if token is None:
                continue
            grad_z = linear_rule(grad_out[:, token], expert.weights.down_proj).float()
            grad_hidden, grad_weight = routed_expert_rule(
                grad_z, part.activated * part.up, cache.routing_weights[token, slot], share)
            grad_weights[:, token, slot] = grad_weight
            grad_x.index_add_(1, token, expert.backward_from_product(part, grad_hidden))
        if share == 1.0:
            return grad_x
        grad_top = grad_weights
        if self.spec.moe.renormalize:
            top = cache.probs.gather(-1, cache.chosen)
            grad_top = renormalisation_rule(grad_weights, cache.routing_weights,
                                            top.sum(-1, keepdim=True))
        grad_probs = torch.zeros(*grad_out.shape[:2], cache.probs.shape[-1],
                                 device=grad_out.device)
        grad_probs.scatter_(-1, cache.chosen.expand(grad_out.shape[0], -1, -1), grad_top)
        grad_logits = softmax_rule(grad_probs, cache.probs)
        absorbed += ((grad_weights * cache.routing_weights).sum((1, 2))
                     - (grad_logits * cache.logits.float()).sum((1, 2)))
        return grad_x + linear_rule(grad_logits, self.weights.router).float()


def mlp_block(spec: DecoderSpec, layer: LayerWeights) -> GatedMLP | MixtureOfExperts:
    """A layer's MLP block: a mixture of experts where the layer has one, else the gated MLP."""
    if layer.moe is not None:
        return MixtureOfExperts(spec, layer.moe)
    return GatedMLP(spec, layer)


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
