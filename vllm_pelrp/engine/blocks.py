"""The engine's building blocks: each block's forward (as the source framework computes it) and the
rule that carries the modified gradient back through it.

- norms: ``RMSNorm`` (γ or Gemma's 1 + γ; also per-head q/k norms) and ``LayerNorm`` with bias;
- linear layers with or without bias;
- MLPs: ``GatedMLP`` (SiLU, GELU-tanh), ``PlainMLP`` (GELU, GELU-tanh, with biases) and
  ``MixtureOfExperts``;
- attention (``attention.py``), the layer that places them around the residual stream
  (``layer.py``), the embeddings (``embeddings.py``) and the heads that give the seed
  (``driver.py``).

Every block's ``forward`` returns its output and what its backward reads (its cache); its
``backward`` takes the modified gradient at its output and returns it at its input, booking what
does not flow on (a bias's share, the softmax rule's loss, RoPE's positional share) into the
layer's ``Sinks``. Nothing here knows an architecture's name.
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
    quick_gelu_identity_rule,
    renormalisation_rule,
    rmsnorm_identity_rule,
    routed_expert_rule,
    silu_identity_rule,
    softmax_rule,
    uniform_product_rule,
)
from .spec import ExpertWeights, LayerWeights, MoESpec, MoEWeights


# ---- where a block's backward books what does not flow on ---------------------------------------
@dataclass
class Sinks:
    """Per target row, what one layer's backward keeps out of the flow (views of the driver's
    (B, L) tensors, added into in place): ``softmax``, what the softmax rules (attention, a
    router) drop; ``bias_sharded``, what this rank's slice of a column-parallel bias keeps (q, k,
    v, MLP up: summed across ranks at the end); ``bias_replicated``, what a bias every rank
    holds keeps (o, MLP down, LayerNorm β: the same on every rank); ``positional`` (b, T, 2),
    RoPE's cos and sin shares in pa-lrp (None for a model without rotary positions)."""

    softmax: Tensor
    bias_sharded: Tensor
    bias_replicated: Tensor
    positional: Tensor | None = None


# ---- norms: RMSNorm (γ, or Gemma's 1 + γ) and LayerNorm with bias -------------------------------
@dataclass
class RMSNorm:
    """RMSNorm over the last dim with fp32 statistics, as in HF: LLaMA casts back then scales
    by γ; Gemma scales by (1 + γ) in fp32 (``offset`` 1, ``scale_in_float``) then casts. Also
    the per-head q/k norms (Qwen3, Gemma 3) over (T, H, D). No bias."""

    gamma: Tensor
    eps: float
    offset: float = 0.0
    scale_in_float: bool = False

    def scale(self) -> Tensor:
        """The factor applied: γ, or (1 + γ) in fp32."""
        return self.gamma.float() + self.offset if self.offset else self.gamma

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(y, 1/rms), 1/rms fp32 keepdim."""
        x32 = x.float()
        inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.scale_in_float:
            return (x32 * inv_rms * self.scale().float()).to(x.dtype), inv_rms
        return self.scale() * (x32 * inv_rms).to(x.dtype), inv_rms

    def backward(self, grad_out: Tensor, inv_rms: Tensor, kept: Tensor | None = None) -> Tensor:
        """Identity rule (1/rms held constant)."""
        return rmsnorm_identity_rule(grad_out, inv_rms, self.scale())


@dataclass
class LayerNorm:
    """LayerNorm over the last dim as torch.nn.LayerNorm computes it (BERT, GPT-2)."""

    gamma: Tensor | None
    beta: Tensor | None
    eps: float

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(y, 1/σ), 1/σ fp32 keepdim (biased variance, as LayerNorm)."""
        y = F.layer_norm(x, (x.shape[-1],), self.gamma, self.beta, self.eps)
        inv_std = torch.rsqrt(x.float().var(-1, unbiased=False, keepdim=True) + self.eps)
        return y, inv_std

    def backward(self, grad_out: Tensor, inv_std: Tensor, kept: Tensor | None = None) -> Tensor:
        """Identity rule (σ held, the mean not: LXT); β keeps Σ β ⊙ ∂y, added to ``kept`` (B,).
        ``grad_out`` is (B, T, hidden)."""
        if self.beta is not None and kept is not None:
            kept += bias_relevance(grad_out, self.beta)
        return layernorm_identity_rule(grad_out, inv_std, self.gamma)


Norm = RMSNorm | LayerNorm


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


# ---- activations, each with its identity rule ---------------------------------------------------
def activation(name: str, x: Tensor) -> Tensor:
    """``silu``, ``gelu`` (erf), ``gelu_tanh`` or ``quick_gelu`` (CLIP), as the source framework
    computes it."""
    if name == "silu":
        return F.silu(x)
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


def activation_backward(name: str, grad_out: Tensor, x: Tensor) -> Tensor:
    """Identity rule through ``activation``: ∂x = ∂y ⊙ act(x)/x."""
    if name == "silu":
        return silu_identity_rule(grad_out, x)
    if name == "gelu_tanh":
        return gelu_tanh_identity_rule(grad_out, x)
    if name == "quick_gelu":
        return quick_gelu_identity_rule(grad_out, x)
    return gelu_identity_rule(grad_out, x)


def tensor_bytes(cache: object) -> int:
    """Bytes of the tensors a cache holds, through nested caches and lists of them."""
    if isinstance(cache, Tensor):
        return cache.numel() * cache.element_size()
    if isinstance(cache, (list, tuple)):
        return sum(tensor_bytes(item) for item in cache)
    if is_dataclass(cache):
        return sum(tensor_bytes(getattr(cache, f.name)) for f in fields(cache))
    return 0


# ---- MLP blocks: gated, plain, mixture of experts -----------------------------------------------
# Each returns this rank's partial output (the layer sums it across ranks, then adds
# ``output_bias``) and takes the gradient at its (replicated) output; its input gradient is again
# this rank's part.
@dataclass
class GatedMLPCache:
    """What a gated MLP's backward reads: the gate and up projections and act(gate)."""

    gate: Tensor
    up: Tensor
    activated: Tensor


class GatedMLP:
    """The gated MLP block, down(act(gate) ⊙ up) over (out, in) weights (a layer's, or one
    expert's): the uniform rule on the product, the identity rule on the activation, the
    ε-rule (the gradient) through the projections. No biases."""

    output_bias = None

    def __init__(self, weights: LayerWeights | ExpertWeights, activation_name: str = "silu"
                 ) -> None:
        self.weights, self.activation = weights, activation_name

    def hidden(self, x: Tensor) -> GatedMLPCache:
        gate = x @ self.weights.gate_proj.T
        up = x @ self.weights.up_proj.T
        return GatedMLPCache(gate, up, activation(self.activation, gate))

    def forward(self, x: Tensor, output_needed: bool = True
                ) -> tuple[Tensor | None, GatedMLPCache]:
        """(T, hidden) → (output or None when not needed, cache); no output skips the down
        projection."""
        cache = self.hidden(x)
        if not output_needed:
            return None, cache
        return (cache.activated * cache.up) @ self.weights.down_proj.T, cache

    def backward_from_product(self, cache: GatedMLPCache, grad_product: Tensor) -> Tensor:
        """∂ at act(gate) ⊙ up → ∂ at the input."""
        grad_act, grad_up = uniform_product_rule(grad_product, cache.activated, cache.up)
        grad_gate = activation_backward(self.activation, grad_act, cache.gate)
        return (linear_rule(grad_gate, self.weights.gate_proj).float()
                + linear_rule(grad_up, self.weights.up_proj).float())

    def backward(self, cache: GatedMLPCache, grad_out: Tensor, mode: str, sinks: Sinks
                 ) -> Tensor:
        """∂ at the output (B, T, hidden) → ∂ at the input, fp32 (nothing kept)."""
        grad_product = linear_rule(grad_out, self.weights.down_proj).float()
        return self.backward_from_product(cache, grad_product)


@dataclass
class PlainMLPCache:
    """The up projection (the activation's input) of a plain MLP."""

    up: Tensor


class PlainMLP:
    """The non-gated MLP block, W₂·act(W₁x + b₁) (+ b₂) (BERT: erf GELU, GPT-2: GELU-tanh): the
    identity rule on the activation, the ε-rule through both linears; b₁ (this rank's slice)
    keeps its share into ``bias_sharded``, b₂ (``output_bias``, added after the ranks' sum)
    into ``bias_replicated``."""

    def __init__(self, up: Tensor, up_bias: Tensor | None, down: Tensor,
                 down_bias: Tensor | None, activation_name: str) -> None:
        self.up, self.up_bias, self.down = up, up_bias, down
        self.output_bias, self.activation = down_bias, activation_name

    def forward(self, x: Tensor, output_needed: bool = True
                ) -> tuple[Tensor | None, PlainMLPCache]:
        up = linear(x, self.up, self.up_bias)
        if not output_needed:
            return None, PlainMLPCache(up)
        return linear(activation(self.activation, up), self.down), PlainMLPCache(up)

    def backward(self, cache: PlainMLPCache, grad_out: Tensor, mode: str, sinks: Sinks
                 ) -> Tensor:
        grad_act = linear_backward(grad_out, self.down, self.output_bias, sinks.bias_replicated)
        grad_up = activation_backward(self.activation, grad_act, cache.up)
        return linear_backward(grad_up, self.up, self.up_bias, sinks.bias_sharded)


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
    the routing path drops, Σ R(w) − Σ R(logits), is added to ``sinks.softmax``. ``cp-lrp``
    holds the routing weights constant, as it holds the attention's probabilities: all
    relevance flows through the experts and nothing is absorbed."""

    output_bias = None

    def __init__(self, moe: MoESpec, weights: MoEWeights, activation_name: str = "silu") -> None:
        self.moe, self.weights = moe, weights
        self.experts = [GatedMLP(expert, activation_name) for expert in weights.experts]

    def forward(self, x: Tensor, output_needed: bool = True) -> tuple[Tensor | None, MoECache]:
        moe = self.moe
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

    def backward(self, cache: MoECache, grad_out: Tensor, mode: str, sinks: Sinks) -> Tensor:
        """∂ at the output (B, T, hidden) → ∂ at the input, fp32; adds the routing path's loss
        into ``sinks.softmax`` (B,)."""
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
        if self.moe.renormalize:
            top = cache.probs.gather(-1, cache.chosen)
            grad_top = renormalisation_rule(grad_weights, cache.routing_weights,
                                            top.sum(-1, keepdim=True))
        grad_probs = torch.zeros(*grad_out.shape[:2], cache.probs.shape[-1],
                                 device=grad_out.device)
        grad_probs.scatter_(-1, cache.chosen.expand(grad_out.shape[0], -1, -1), grad_top)
        grad_logits = softmax_rule(grad_probs, cache.probs)
        sinks.softmax += ((grad_weights * cache.routing_weights).sum((1, 2))
                          - (grad_logits * cache.logits.float()).sum((1, 2)))
        return grad_x + linear_rule(grad_logits, self.weights.router).float()


MLP = GatedMLP | PlainMLP | MixtureOfExperts
