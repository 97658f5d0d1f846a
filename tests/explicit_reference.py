"""Slow, explicit, rule-by-rule LRP reference for LLaMA, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3,
Qwen3-MoE and Mixtral decoder-only models (PA-LRP / AttnLRP / CP-LRP).

This module is the *independent* reference against which the vllm-pelrp engine is tested.
It deliberately shares no code with ``vllm_pelrp`` and uses no ``torch.autograd``: it runs the
forward pass itself, in float64, straight from the weight tensors of a Hugging Face
``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` /
``Gemma3ForCausalLM`` / ``Phi3ForCausalLM`` / ``Qwen3MoeForCausalLM`` / ``MixtralForCausalLM``,
stores every intermediate activation, and then propagates RELEVANCE
(not gradients) backwards, op by op, with explicit closed-form rules.  The architecture is read
from the model's config and modules (``model_type``, ``layer_types``, ``sliding_window``, the
biases present on each ``nn.Linear``, ``q_norm`` / ``k_norm``, sandwich norms).

Forward per decoder layer (x = layer input, shape (T, hidden); ``lin(z; W, b) = z W^T + b``,
b only where the HF module has a bias: Qwen2 q/k/v, ``attention_bias`` / ``mlp_bias``)::

    n1 = norm_in(x)
    q, k, v = lin(n1; Wq, bq), lin(n1; Wk, bk), lin(n1; Wv, bv)      (reshaped to heads;
                                         Phi-3's fused qkv_proj split by rows)
    q, k = q_norm(q), k_norm(k)          per head, over head_dim   (Qwen3, Gemma 3 only)
    q~[:rd] = q[:rd]*cos + rotate_half(q[:rd])*sin ; q~[rd:] = q[rd:] ; k~ likewise
                                         (HF neox-style rotate_half within the rd rotating dims;
                                          rd = int(head_dim * partial_rotary_factor), = head_dim
                                          unless the config rotates part of each head (Phi-3))
    scores = q~ k~^T * scale + mask      (k~, v repeated for GQA)
    s = softmax(scores) ; o = s v ; a = lin(o; Wo, bo)
    a' = post_attention_layernorm(a)     (Gemma 3 sandwich norm; LLaMA/Qwen: a' = a)
    h = x + a'
    n2 = norm_pre_mlp(h)                 (LLaMA/Qwen: post_attention_layernorm;
                                          Gemma 3: pre_feedforward_layernorm)
    m = act(lin(n2; Wg, bg)) * lin(n2; Wu, bu) ; f = lin(m; Wd, bd)
                                         (Phi-3's fused gate_up_proj: gate = first half of rows)
      or, in a mixture-of-experts layer (Qwen3-MoE except ``mlp_only_layers``, Mixtral):
    z = n2 Wr^T ; p = softmax(z) over the E experts ; chosen = top-k of p (per token)
    w_k = p_k / sum_chosen p  (renormalised: Mixtral, Qwen3-MoE with norm_topk_prob) or p_k
    eo_k = lin(act(lin(n2; Wg_e)) * lin(n2; Wu_e); Wd_e) for chosen expert e = e(k)
    f = sum_k eo_k * w_k
    f' = post_feedforward_layernorm(f)   (Gemma 3 sandwich norm; LLaMA/Qwen: f' = f)
    y = h + f'
    logits = norm_final(y) Wlm^T

* norms are RMSNorms ``x * rsqrt(mean(x^2) + eps) * w`` with w = gamma (LLaMA/Mistral/Qwen) or
  w = 1 + gamma (Gemma 3).
* act = SiLU (LLaMA/Mistral/Qwen) or GELU-tanh (Gemma 3, ``hidden_activation``).
* scale = head_dim**-0.5, Gemma 3: ``query_pre_attn_scalar**-0.5``.
* Embedding: layer-0 input = E[ids] (Gemma 3: E[ids] * embed_scale, embed_scale = sqrt(hidden)
  rounded exactly like HF does: the ``embed_scale`` buffer (float32 sqrt(hidden)) cast to the
  embedding weight's dtype, i.e. 55.5 rather than 55.4256 for a bf16 Gemma with hidden 3072).
* mask: causal, key j visible to query i iff j <= i (by index, as HF's masking_utils with no
  padding); on a "sliding_attention" layer (``config.layer_types``; every layer of a Mistral
  with ``sliding_window`` set) additionally j > i - sliding_window (HF's
  ``sliding_window_overlay``: a query sees itself and the sliding_window - 1 keys before it).

RoPE: cos/sin = attention_factor * cos/sin(cat(freqs, freqs)), freqs = position * inv_freq
(rd/2 frequencies).  ``inv_freq`` and the attention factor are computed with exactly the
formula (and the float32 arithmetic) of transformers' ``compute_default_rope_parameters`` /
``_compute_linear_scaling_rope_parameters`` / ``_compute_llama3_parameters`` /
``_compute_yarn_parameters`` / ``_compute_longrope_parameters`` (LongRoPE: the long factors
once max position + 1 > original_max_position_embeddings, as ``dynamic_rope_update``; the
attention factor is 1 for default / linear / llama3) (rope parameters read from ``config.rope_parameters``, per layer
type where it is keyed by layer type (Gemma 3: "sliding_attention" -> local theta,
"full_attention" -> global theta and scaling), with a fallback to the transformers-4
``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq`` attributes); the angles and
everything after them are then computed in float64.

Relevance rules (R = relevance; every division uses a stabilised denominator
``z + EPS*sign(z)`` with EPS = 1e-12 and sign(0) = +1):

* Start: R(logits) is zero except at each selected (position, token id), where it equals the
  logit value (several targets: each gets its own value; duplicates add up).
* Linear z = x W^T + b, epsilon rule: R_x[i] = sum_j x[i] W[j,i] R_z[j] / z[j]; the bias keeps
  R_b = sum_j b[j] R_z[j] / z[j] (summed per layer over all of its linears and reported as
  "bias_absorbed"; 0 for bias-free models).
* RMSNorm (including the gamma / 1+gamma weight; hidden norms, sandwich norms and the per-head
  q/k norms alike): identity rule, R_x = R_out.
* Residual add h = x + a, epsilon rule: R_x = x/h * R_h, R_a = a/h * R_h (elementwise).
* m = act(g) * u: uniform rule R_act(g) = R_u = R_m / 2;  SiLU / GELU: identity rule
  R_g = R_act(g).
* A.V, o = s v per head: uniform rule for the bilinear product:
  R_s[i,j] = sum_d s[i,j] v[j,d] R_o[i,d] / (2 o[i,d]),
  R_v[j,d] = sum_i s[i,j] v[j,d] R_o[i,d] / (2 o[i,d]).
* Softmax (AttnLRP rule, not conservative): R_scores[i,j] = scores[i,j] (R_s[i,j] - s[i,j]
  sum_j' R_s[i,j']); masked entries have score 0 and relevance 0.  The amount
  sum R_s - sum R_scores is "absorbed" and reported per layer ("softmax_absorbed").
* scores = q~ k~^T * scale: uniform rule (scale is a constant factor):
  R_q~[i,d] = sum_j q~[i,d] k~[j,d] scale R_scores[i,j] / (2 scores[i,j]);
  R_k~[j,d] = sum_i (same summand).
* repeat_kv (GQA): relevance of the repeated k / v heads is summed back onto the kv head.
* RoPE, q~[:rd] = A + B with A = q[:rd]*cos, B = rotate_half(q[:rd])*sin (the dims rd.. pass
  their relevance to q unchanged): epsilon rule on the add
  (R_A = A/q~ R_q~, R_B = B/q~ R_q~), then per mode:
    - "pa-lrp": uniform rule on each product: R_q += R_A/2, R_cos += R_A/2, R_rot += R_B/2,
      R_sin += R_B/2; rotate_half is a signed permutation and passes relevance 100%
      (R_q[perm] += R_rot).  Positional relevance of layer l at position t:
      cos part = sum over heads and dims of R_cos (q and k together), sin part = sum of R_sin.
      (Each layer's cos/sin are those of its own layer type.)
    - "attnlrp": cos/sin are constants: R_q += R_A + R_B (through the permutation);
      positional relevance 0.
* "cp-lrp": the attention probabilities s are held constant, so o = s v is linear in v:
  R_v[j,d] = sum_i s[i,j] v[j,d] R_o[i,d] / o[i,d] (full, not halved); nothing flows into
  scores / q / k, and positional relevance is 0.
* Mixture of experts, f = sum_k prod_k with prod_k = eo_k * w_k: epsilon rule on the sum
  (R_prod_k = prod_k / f * R_f); uniform rule on each product: R_eo_k = R_prod_k / 2,
  R_w_k = sum_hidden R_prod_k / 2; each expert's down / gate / up projections, product and
  activation as in the dense MLP.  The routing weights' share goes through the router's
  softmax by AttnLRP's softmax rule, R_z[e] = z[e] (R_p[e] - p[e] sum_e' R_p[e']): renormalised
  top-k weights are the softmax over the chosen experts' logits, so there the rule runs over the
  chosen logits with R_p = R_w (the other logits get 0); without renormalisation over all E
  logits with R_p = R_w at the chosen experts.  (Both equal gradient x input through
  transformers' softmax -> top-k -> renormalisation, i.e. LXT main's qwen3_moe rules, which
  patch the experts and leave the router to the plain gradient.)  The router linear: epsilon.
  sum R_w - sum R_z is "absorbed" and reported per layer ("router_absorbed").
  "cp-lrp": the routing weights are constants, R_eo_k = R_prod_k, nothing flows to the router.
* Embedding scale (Gemma 3): a constant factor, relevance passes 100%.
* Token relevance: R_tok[t] = sum_d R(layer-0 input)[t, d] (the scaled embedding for Gemma 3).

Conservation: every rule except the softmax rules (attention, router) and the bias term of the
linear rule is conservative (up to EPS), hence ``target_logit - sum(softmax_absorbed) -
sum(router_absorbed) - sum(bias_absorbed) == sum(token_relevance) + sum(positional_cos) +
sum(positional_sin)`` for every mode, and layer by layer; for "cp-lrp" softmax_absorbed and
router_absorbed are 0 (closure holds to ~1e-11 relative on SmolLM2).  With
EPS -> 0 the rules coincide (to 1e-15) with gradient x input of the correspondingly modified
network; with EPS = 1e-12 they differ from it by ~1e-8 relative.

Not supported (raises NotImplementedError): logit / attention softcapping, bidirectional
attention, RoPE types other than default / linear / llama3 / yarn / longrope, biases on
lm_head, shared experts, expert biases.

Speed: about 7-15 s per call for SmolLM2-135M with ~13 tokens on 2 CPU cores.  The float64
weight copies are cached per model (re-read when a parameter changes; ``clear_weight_cache()``
frees them).
"""

from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch

EPS = 1e-12
MODES = ("pa-lrp", "attnlrp", "cp-lrp")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "qwen3_moe", "mixtral",
                         "phi3")

__all__ = [
    "explicit_relevance", "explicit_forward", "rope_inv_freq", "rope_tables", "rotary_dim",
    "clear_weight_cache",
    "MODES", "EPS", "SUPPORTED_MODEL_TYPES",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _stab(z: torch.Tensor) -> torch.Tensor:
    """z + EPS * sign(z), with sign(0) = +1 (never zero)."""
    return z + EPS * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


# float64 copies of the weights, per model; an entry is reused only while the parameter is the
# same object, same storage, same in-place-modification version and same checksum (so weights
# mutated in place, even through ``.data``, are re-read).
_WEIGHT_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _w64(model, p: torch.Tensor | None) -> torch.Tensor | None:
    if p is None:
        return None
    try:
        cache = _WEIGHT_CACHE.setdefault(model, {})
    except TypeError:  # model not weak-referenceable: no caching
        return _f64(p)
    key = id(p)
    stamp = (p.data_ptr(), p._version, p.dtype, tuple(p.shape), p.device, float(p.detach().sum()))
    hit = cache.get(key)
    if hit is not None and hit[0] is p and hit[1] == stamp:
        return hit[2]
    out = _f64(p)
    cache[key] = (p, stamp, out)
    return out


def clear_weight_cache() -> None:
    _WEIGHT_CACHE.clear()


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w over the last dim (w: the effective weight)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _unrotate_relevance(r_rot: torch.Tensor) -> torch.Tensor:
    """Relevance of rotate_half(q) -> relevance of q (100% through the permutation).

    rotate_half(q)[d] = -q[d + D/2] (d < D/2) and q[d - D/2] (d >= D/2).
    """
    half = r_rot.shape[-1] // 2
    return torch.cat((r_rot[..., half:], r_rot[..., :half]), dim=-1)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    z = x @ w.T
    return z if b is None else z + b


def _lin_eps(x: torch.Tensor, w: torch.Tensor, z: torch.Tensor, r_z: torch.Tensor) -> torch.Tensor:
    """Epsilon rule through z = x W^T (+ b): R_x[t,i] = x[t,i] * sum_j W[j,i] R_z[t,j] / z[t,j]."""
    return x * ((r_z / _stab(z)) @ w)


def _bias_kept(b: torch.Tensor | None, z: torch.Tensor, r_z: torch.Tensor) -> float:
    """Relevance the bias keeps in the epsilon rule: sum_{t,j} b[j] R_z[t,j] / z[t,j]."""
    if b is None:
        return 0.0
    return float((b * (r_z / _stab(z))).sum())


def _model_type(config) -> str:
    return getattr(config, "model_type", "") or ""


def _is_gemma(config) -> bool:
    return _model_type(config) in ("gemma3_text", "gemma3")


def _layer_types(config) -> list[str]:
    L = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is not None:
        types = list(types)[:L]
        if len(types) != L:
            raise ValueError(f"config.layer_types has {len(types)} entries for {L} layers")
        return types
    if _model_type(config) == "mistral" and getattr(config, "sliding_window", None) is not None:
        return ["sliding_attention"] * L  # Mistral: every layer uses the sliding-window mask
    return ["full_attention"] * L


def _rope_params(config, layer_type: str | None = None) -> dict:
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and rp:
        per_type = "rope_theta" not in rp and (
            isinstance(rp.get("full_attention"), dict) or isinstance(rp.get("sliding_attention"), dict))
        if per_type:  # per-layer-type layout (Gemma 3 in transformers 5)
            params = rp.get(layer_type or "full_attention")
            if params is None:
                params = rp.get("full_attention")
            params = dict(params or {})
        else:
            params = dict(rp)
    elif layer_type == "sliding_attention" and getattr(config, "rope_local_base_freq", None) is not None:
        # transformers-4 Gemma 3: local layers use rope_local_base_freq and no scaling
        params = {"rope_type": "default", "rope_theta": config.rope_local_base_freq}
    else:  # transformers 4 layout
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "rope_type" not in params:
        params["rope_type"] = params.get("type", "default")
    if "rope_theta" not in params:
        theta = getattr(config, "rope_theta", None)
        if theta is None:
            default = getattr(config, "default_theta", 10000.0)
            if isinstance(default, dict):
                default = default["local" if layer_type == "sliding_attention" else "global"]
            theta = default
        params["rope_theta"] = theta
    return params


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rotary_fraction(config, params: dict) -> float:
    """``partial_rotary_factor``: in ``rope_parameters`` (transformers 5) or on the config (4.x)."""
    fraction = params.get("partial_rotary_factor")
    if fraction is None:
        fraction = getattr(config, "partial_rotary_factor", None)
    return 1.0 if fraction is None else float(fraction)


def rotary_dim(config, layer_type: str | None = None) -> int:
    """Number of leading dims of each head that rotate: int(head_dim * partial_rotary_factor)."""
    return int(_head_dim(config) * _rotary_fraction(config, _rope_params(config, layer_type)))


def _original_max_positions(config, params: dict) -> int:
    value = params.get("original_max_position_embeddings")
    if value is None:
        value = getattr(config, "original_max_position_embeddings", None)
    if value is None:
        raise ValueError("this rope type needs original_max_position_embeddings")
    return int(value)


def _yarn_tables(config, params: dict, dim: int) -> tuple[torch.Tensor, float]:
    """transformers' ``_compute_yarn_parameters``: same expressions, float32 where it uses it."""
    base = params["rope_theta"]
    factor = params.get("factor")
    original = _original_max_positions(config, params)
    if factor is None:
        factor = config.max_position_embeddings / original

    def get_mscale(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers: "Prevent singularity"
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


def _longrope_tables(config, params: dict, dim: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """transformers' ``_compute_longrope_parameters``: the long factors once the sequence is
    longer than original_max_position_embeddings (``dynamic_rope_update``), the short ones
    otherwise; attention factor sqrt(1 + ln(factor) / ln(original)) with factor
    max_position_embeddings / original unless the config gives it."""
    base = params["rope_theta"]
    original = _original_max_positions(config, params)
    factor = params.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    long = seq_len is not None and seq_len > original
    ext = torch.tensor(params["long_factor"] if long else params["short_factor"], dtype=torch.float32)
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext * base**shape), float(attention_factor)


def rope_tables(config, layer_type: str | None = None, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, float32 and bit-identical to transformers; attention factor that
    multiplies cos and sin) for default / linear / llama3 / yarn / longrope RoPE over the
    ``rotary_dim`` rotating dims.  ``layer_type`` selects per-layer-type rope parameters (Gemma
    3); ``seq_len`` (max position + 1) picks LongRoPE's short or long factors."""
    params = _rope_params(config, layer_type)
    rope_type = params["rope_type"]
    base = params["rope_theta"]
    dim = rotary_dim(config, layer_type)
    if rope_type == "yarn":
        return _yarn_tables(config, params, dim)
    if rope_type == "longrope":
        return _longrope_tables(config, params, dim, seq_len)
    # same expression (and float32 arithmetic) as transformers
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / params["factor"], 1.0
    if rope_type == "llama3":
        factor = params["factor"]
        low_freq_factor = params["low_freq_factor"]
        high_freq_factor = params["high_freq_factor"]
        old_context_len = params["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama), 1.0
    raise NotImplementedError(f"rope_type {rope_type!r} is not supported by the reference")


def rope_inv_freq(config, layer_type: str | None = None, seq_len: int | None = None) -> torch.Tensor:
    """inverse frequencies (float32, bit-identical to transformers), see ``rope_tables``."""
    return rope_tables(config, layer_type, seq_len)[0]


_ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "swish": torch.nn.functional.silu,
    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gelu": torch.nn.functional.gelu,
}


def _activation_name(config) -> str:
    if _is_gemma(config):
        return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "gelu_pytorch_tanh")
    return getattr(config, "hidden_act", "silu")


def _check_supported(hf_model) -> None:
    config = hf_model.config
    mt = _model_type(config)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(f"model_type {mt!r} is not supported by the reference "
                                  f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    act = _activation_name(config)
    if act not in _ACTIVATIONS:
        raise NotImplementedError(f"activation {act!r} is not supported by the reference")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None) is not None:
            raise NotImplementedError(f"{name} is not supported by the reference")
    if getattr(config, "use_bidirectional_attention", False) or not getattr(config, "is_causal", True):
        raise NotImplementedError("bidirectional attention is not supported by the reference")
    if getattr(hf_model.lm_head, "bias", None) is not None:
        raise NotImplementedError("a bias on lm_head is not supported by the reference")
    if "sliding_attention" in _layer_types(config) and getattr(config, "sliding_window", None) is None:
        raise ValueError("sliding_attention layers but config.sliding_window is None")


def _embed_scale(hf_model) -> float:
    """Gemma 3's embedding multiplier exactly as HF applies it (1.0 for the other models)."""
    emb = hf_model.model.embed_tokens
    if not _is_gemma(hf_model.config):
        return 1.0
    buf = getattr(emb, "embed_scale", None)
    if isinstance(buf, torch.Tensor):  # transformers: self.embed_scale.to(self.weight.dtype)
        return float(buf.detach().to(emb.weight.dtype).cpu())
    if buf is not None:  # older versions kept a python float
        return float(torch.tensor(float(buf), dtype=emb.weight.dtype))
    return float(torch.tensor(hf_model.config.hidden_size**0.5, dtype=emb.weight.dtype))


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
def _attention_weights(hf_model, at, H: int, KV: int, D: int) -> tuple[dict, dict]:
    """q/k/v/o weights and biases; Phi-3's fused ``qkv_proj`` is split by rows (q, k, v)."""
    W, B = {}, {}
    if hasattr(at, "qkv_proj"):
        w, b = _w64(hf_model, at.qkv_proj.weight), _w64(hf_model, getattr(at.qkv_proj, "bias", None))
        bounds = {"q": (0, H * D), "k": (H * D, (H + KV) * D), "v": ((H + KV) * D, (H + 2 * KV) * D)}
        for key, (lo, hi) in bounds.items():
            W[key], B[key] = w[lo:hi], None if b is None else b[lo:hi]
    else:
        for key, mod in (("q", at.q_proj), ("k", at.k_proj), ("v", at.v_proj)):
            W[key], B[key] = _w64(hf_model, mod.weight), _w64(hf_model, getattr(mod, "bias", None))
    W["o"], B["o"] = _w64(hf_model, at.o_proj.weight), _w64(hf_model, getattr(at.o_proj, "bias", None))
    return W, B


def _dense_mlp_weights(hf_model, mlp) -> tuple[dict, dict]:
    """gate/up/down weights and biases; Phi-3's fused ``gate_up_proj`` is split in halves
    (gate first, as its ``chunk(2)``)."""
    W, B = {}, {}
    if isinstance(getattr(mlp, "gate_up_proj", None), torch.nn.Linear):
        w, b = _w64(hf_model, mlp.gate_up_proj.weight), _w64(hf_model, getattr(mlp.gate_up_proj, "bias", None))
        half = w.shape[0] // 2
        W["g"], W["u"] = w[:half], w[half:]
        B["g"], B["u"] = (None, None) if b is None else (b[:half], b[half:])
    else:
        for key, mod in (("g", mlp.gate_proj), ("u", mlp.up_proj)):
            W[key], B[key] = _w64(hf_model, mod.weight), _w64(hf_model, getattr(mod, "bias", None))
    W["d"], B["d"] = _w64(hf_model, mlp.down_proj.weight), _w64(hf_model, getattr(mlp.down_proj, "bias", None))
    return W, B


def _is_moe(mlp) -> bool:
    return hasattr(mlp, "experts") and hasattr(mlp, "gate")


def _moe_weights(hf_model, mlp) -> dict:
    """Router (E, hidden) and per-expert gate / up (E, I, hidden) and down (E, hidden, I) weights.

    transformers 5 keeps the experts as 3D tensors (``gate_up_proj`` [gate; up] and
    ``down_proj``, converted from the hub's per-expert names at load time); transformers 4 as a
    list of per-expert MLPs (``gate_proj`` / ``up_proj`` / ``down_proj``, Mixtral's ``w1`` /
    ``w3`` / ``w2``).
    """
    cfg = hf_model.config
    if getattr(mlp, "shared_expert", None) is not None or getattr(mlp, "shared_experts", None) is not None:
        raise NotImplementedError("shared experts are not supported by the reference")
    experts, router = mlp.experts, mlp.gate
    top_k = getattr(router, "top_k", None) or getattr(mlp, "top_k", None) or cfg.num_experts_per_tok
    # Mixtral always renormalises over the chosen experts; Qwen3-MoE when norm_topk_prob
    norm_topk = True if _model_type(cfg) == "mixtral" else bool(cfg.norm_topk_prob)
    if isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
        if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
            raise NotImplementedError("expert biases are not supported by the reference")
        gate_up, down = _w64(hf_model, experts.gate_up_proj), _w64(hf_model, experts.down_proj)
        if getattr(experts, "is_transposed", False):
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        if getattr(experts, "is_concatenated", True):
            half = gate_up.shape[1] // 2
            w_gate, w_up = gate_up[:, :half], gate_up[:, half:]
        else:  # interleaved [gate0, up0, gate1, up1, ...]
            w_gate, w_up = gate_up[:, 0::2], gate_up[:, 1::2]
        w_down = down
    else:
        names = ("gate_proj", "up_proj", "down_proj") if hasattr(experts[0], "gate_proj") else ("w1", "w3", "w2")
        w_gate, w_up, w_down = (torch.stack([_w64(hf_model, getattr(e, n).weight) for e in experts])
                                for n in names)
    return dict(router=_w64(hf_model, router.weight), gate=w_gate, up=w_up, down=w_down,
                top_k=int(top_k), norm_topk=norm_topk)


def _moe_forward(x: torch.Tensor, weights: dict, act) -> dict:
    """Router softmax over all experts, top-k (renormalised per config), gated experts, and the
    routing-weighted sum; every (token, chosen expert) pair's activations are kept."""
    T, K = x.shape[0], weights["top_k"]
    logits = x @ weights["router"].T  # (T, E)
    probs = torch.softmax(logits, dim=-1)
    top_p, idx = torch.topk(probs, K, dim=-1)  # (T, K), descending like transformers
    w = top_p / top_p.sum(-1, keepdim=True) if weights["norm_topk"] else top_p
    inter = weights["gate"].shape[1]
    g = torch.zeros(T, K, inter, dtype=torch.float64)
    u = torch.zeros_like(g)
    eo = torch.zeros(T, K, x.shape[1], dtype=torch.float64)
    for e in range(weights["router"].shape[0]):
        t_idx, k_idx = torch.nonzero(idx == e, as_tuple=True)
        if t_idx.numel() == 0:
            continue
        xe = x[t_idx]
        g[t_idx, k_idx] = xe @ weights["gate"][e].T
        u[t_idx, k_idx] = xe @ weights["up"][e].T
    sg = act(g)
    m = sg * u
    for e in range(weights["router"].shape[0]):
        t_idx, k_idx = torch.nonzero(idx == e, as_tuple=True)
        if t_idx.numel():
            eo[t_idx, k_idx] = m[t_idx, k_idx] @ weights["down"][e].T
    prod = eo * w[..., None]  # (T, K, hidden)
    return dict(weights=weights, x=x, router_logits=logits, probs=probs, idx=idx, w=w, g=g, u=u, sg=sg,
                m=m, eo=eo, prod=prod, out=prod.sum(1))


def explicit_forward(hf_model, input_ids, position_ids=None) -> dict:
    """Explicit float64 forward; returns logits and every intermediate activation (per layer)."""
    _check_supported(hf_model)
    cfg = hf_model.config
    gemma = _is_gemma(cfg)
    act = _ACTIVATIONS[_activation_name(cfg)]
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).cpu()
    T = ids.numel()
    H = cfg.num_attention_heads
    KV = getattr(cfg, "num_key_value_heads", None) or H
    D = _head_dim(cfg)
    n_rep = H // KV
    eps = cfg.rms_norm_eps
    scale = float(cfg.query_pre_attn_scalar) ** -0.5 if gemma else 1.0 / math.sqrt(D)
    layer_types = _layer_types(cfg)
    pos = torch.arange(T, dtype=torch.float64) if position_ids is None else _f64(torch.as_tensor(position_ids)).reshape(-1)
    seq_len = int(pos.max()) + 1

    # cos/sin per layer type over the rotary dims, times the attention factor (YaRN, LongRoPE)
    rope = {}
    for lt in sorted(set(layer_types)) + ["full_attention"]:
        if lt in rope:
            continue
        inv_freq, attention_factor = rope_tables(cfg, lt, seq_len=seq_len)
        freqs = pos[:, None] * inv_freq.to(torch.float64)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        rope[lt] = (emb.cos() * attention_factor, emb.sin() * attention_factor)  # (T, rotary_dim)
    idx = torch.arange(T)
    causal = idx[None, :] <= idx[:, None]  # [i, j]: key j visible to query i
    masks = {"full_attention": causal}
    if "sliding_attention" in layer_types:
        window = int(cfg.sliding_window)
        masks["sliding_attention"] = causal & (idx[None, :] > idx[:, None] - window)

    def gamma(norm):
        w = _w64(hf_model, norm.weight)
        return 1.0 + w if gemma else w

    def norm_eps(norm):
        return getattr(norm, "variance_epsilon", getattr(norm, "eps", eps))

    inner = hf_model.model
    embed_scale = _embed_scale(hf_model)
    with torch.no_grad():
        x = _w64(hf_model, inner.embed_tokens.weight)[ids]
        if embed_scale != 1.0:
            x = x * embed_scale
        x_embed = x
        layers = []
        for li, layer in enumerate(inner.layers[: cfg.num_hidden_layers]):
            lt = layer_types[li]
            if lt not in masks:
                raise NotImplementedError(f"layer type {lt!r} is not supported by the reference")
            cos, sin = rope[lt]
            rd = cos.shape[-1]  # rotary dims; dims rd.. of each head pass through unrotated
            mask = masks[lt]
            at, mlp = layer.self_attn, layer.mlp
            W, B = _attention_weights(hf_model, at, H, KV, D)
            moe = _is_moe(mlp)
            if not moe:
                Wm, Bm = _dense_mlp_weights(hf_model, mlp)
                W.update(Wm)
                B.update(Bm)
            q_norm, k_norm = getattr(at, "q_norm", None), getattr(at, "k_norm", None)
            sandwich = hasattr(layer, "pre_feedforward_layernorm")
            norm_in = layer.input_layernorm
            norm_mlp = layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm

            n1 = _rmsnorm(x, gamma(norm_in), norm_eps(norm_in))
            q_flat, k_flat, v_flat = _linear(n1, W["q"], B["q"]), _linear(n1, W["k"], B["k"]), _linear(n1, W["v"], B["v"])
            q = q_flat.view(T, H, D).transpose(0, 1)  # (H, T, D), before the q norm
            k = k_flat.view(T, KV, D).transpose(0, 1)  # (KV, T, D)
            v = v_flat.view(T, KV, D).transpose(0, 1)
            qn = q if q_norm is None else _rmsnorm(q, gamma(q_norm), norm_eps(q_norm))
            kn = k if k_norm is None else _rmsnorm(k, gamma(k_norm), norm_eps(k_norm))
            # RoPE on the first rd dims (rotate_half within them); the rest passes unchanged
            qA, qB = qn[..., :rd] * cos, _rotate_half(qn[..., :rd]) * sin
            kA, kB = kn[..., :rd] * cos, _rotate_half(kn[..., :rd]) * sin
            qr = torch.cat((qA + qB, qn[..., rd:]), dim=-1)
            kr = torch.cat((kA + kB, kn[..., rd:]), dim=-1)
            kr_rep = kr.repeat_interleave(n_rep, dim=0)  # (H, T, D), head h uses kv head h // n_rep
            v_rep = v.repeat_interleave(n_rep, dim=0)
            raw = (qr @ kr_rep.transpose(1, 2)) * scale  # (H, T, T), unmasked
            scores = torch.where(mask, raw, torch.zeros_like(raw))  # masked entries: score 0
            s = torch.softmax(raw.masked_fill(~mask, float("-inf")), dim=-1)
            o = s @ v_rep  # (H, T, D)
            o_flat = o.transpose(0, 1).reshape(T, H * D)
            a = _linear(o_flat, W["o"], B["o"])
            if sandwich:
                pa = layer.post_attention_layernorm
                ap = _rmsnorm(a, gamma(pa), norm_eps(pa))
            else:
                ap = a
            h = x + ap
            n2 = _rmsnorm(h, gamma(norm_mlp), norm_eps(norm_mlp))
            mlp_cache = {}
            if moe:
                mlp_cache["moe"] = _moe_forward(n2, _moe_weights(hf_model, mlp), act)
                mo = mlp_cache["moe"]["out"]
            else:
                g = _linear(n2, W["g"], B["g"])
                u = _linear(n2, W["u"], B["u"])
                sg = act(g)
                m = sg * u
                mo = _linear(m, W["d"], B["d"])
                mlp_cache.update(g=g, u=u, sg=sg, m=m)
            if sandwich:
                pf = layer.post_feedforward_layernorm
                mop = _rmsnorm(mo, gamma(pf), norm_eps(pf))
            else:
                mop = mo
            y = h + mop
            layers.append(dict(
                W=W, B=B, layer_type=lt, mask=mask, cos=cos, sin=sin, rotary_dim=rd,
                x=x, n1=n1, q_flat=q_flat, k_flat=k_flat, v_flat=v_flat, q=q, k=k, v=v, qn=qn, kn=kn,
                qA=qA, qB=qB, kA=kA, kB=kB, qr=qr, kr=kr, kr_rep=kr_rep, v_rep=v_rep, scores=scores,
                s=s, o=o, o_flat=o_flat, a=a, ap=ap, h=h, n2=n2, mo=mo, mop=mop, y=y, **mlp_cache,
            ))
            x = y
        nf = _rmsnorm(x, gamma(inner.norm), norm_eps(inner.norm))
        w_lm = _w64(hf_model, hf_model.lm_head.weight)
        logits = nf @ w_lm.T
    cos, sin = rope["full_attention"]
    return dict(
        ids=ids, T=T, H=H, KV=KV, D=D, n_rep=n_rep, scale=scale, cos=cos, sin=sin, causal=causal,
        rope=rope, masks=masks, layer_types=layer_types, embed_scale=embed_scale, embedding=x_embed,
        layers=layers, y_final=x, nf=nf, w_lm=w_lm, logits=logits,
    )


# --------------------------------------------------------------------------------------------
# relevance
# --------------------------------------------------------------------------------------------
def _moe_relevance(moe: dict, r_out: torch.Tensor, mode: str) -> tuple[torch.Tensor, float]:
    """Relevance of the MoE block's input from that of its output; returns (R_x, router_absorbed).

    out = sum_k prod_k, prod_k = eo_k * w_k: epsilon rule on the sum (R_prod = prod / out * R_out);
    uniform rule on each product (R_eo = R_prod / 2, R_w = sum_hidden R_prod / 2); in cp-lrp the
    routing weights are constants (R_eo = R_prod, R_w = 0).  Each expert: down projection
    (epsilon), m = act(g) * u uniform (R_g = R_u = R_m / 2), act identity, gate / up (epsilon).
    Router: AttnLRP's softmax rule R_z[e] = z[e] (R_p[e] - p[e] sum_e' R_p[e']) on the router
    logits z; renormalised top-k weights are the softmax over the chosen experts' logits, so the
    rule runs over those (zero for the others); without renormalisation over all experts with
    R_p = R_w at the chosen ones.  Then the router linear (epsilon).
    """
    wts, x, idx, w = moe["weights"], moe["x"], moe["idx"], moe["w"]
    r_prod = moe["prod"] / _stab(moe["out"])[:, None, :] * r_out[:, None, :]  # (T, K, hidden)
    if mode == "cp-lrp":
        r_eo, r_w = r_prod, torch.zeros_like(w)
    else:
        r_eo, r_w = r_prod / 2, r_prod.sum(-1) / 2
    r_m = torch.zeros_like(moe["m"])
    r_x = torch.zeros_like(x)
    for e in range(wts["router"].shape[0]):
        t_idx, k_idx = torch.nonzero(idx == e, as_tuple=True)
        if t_idx.numel() == 0:
            continue
        r_m[t_idx, k_idx] = _lin_eps(moe["m"][t_idx, k_idx], wts["down"][e], moe["eo"][t_idx, k_idx],
                                     r_eo[t_idx, k_idx])
    r_g = r_u = r_m / 2
    for e in range(wts["router"].shape[0]):
        t_idx, k_idx = torch.nonzero(idx == e, as_tuple=True)
        if t_idx.numel() == 0:
            continue
        xe = x[t_idx]
        r_xe = (_lin_eps(xe, wts["gate"][e], moe["g"][t_idx, k_idx], r_g[t_idx, k_idx])
                + _lin_eps(xe, wts["up"][e], moe["u"][t_idx, k_idx], r_u[t_idx, k_idx]))
        r_x.index_add_(0, t_idx, r_xe)
    if mode == "cp-lrp":
        return r_x, 0.0
    z = moe["router_logits"]
    r_z = torch.zeros_like(z)
    z_chosen = torch.gather(z, 1, idx)
    if wts["norm_topk"]:  # softmax over the chosen logits, whose output is w
        r_z.scatter_(1, idx, z_chosen * (r_w - w * r_w.sum(-1, keepdim=True)))
    else:  # softmax over all experts, relevance R_w at the chosen outputs
        r_p = torch.zeros_like(z).scatter_(1, idx, r_w)
        r_z = z * (r_p - moe["probs"] * r_p.sum(-1, keepdim=True))
    r_x = r_x + _lin_eps(x, wts["router"], z, r_z)
    return r_x, float(r_w.sum() - r_z.sum())


def explicit_relevance(
    hf_model,
    input_ids,
    target_positions: Sequence[int],
    target_token_ids: Sequence[int],
    mode: str = "pa-lrp",
    position_ids=None,
) -> dict:
    """Explicit LRP relevance of the sum of the selected logits, see the module docstring.

    Returns a dict with
      token_relevance  float64 (T,)    sum_d relevance of the layer-0 input (embedding; Gemma 3:
                                        the scaled embedding)
      positional_cos   float64 (L, T)  pa-lrp only (zeros otherwise)
      positional_sin   float64 (L, T)  pa-lrp only (zeros otherwise)
      target_logit     float           sum of the selected logits
      logits           float64 (T, V)  logits of the explicit forward
      softmax_absorbed float64 (L,)    sum R_s - sum R_scores per layer (0 for cp-lrp)
      router_absorbed  float64 (L,)    sum R_w - sum R_router_logits per layer: what the router's
                                        softmax rule absorbs (0 for dense layers and for cp-lrp)
      bias_absorbed    float64 (L,)    relevance kept by the linear biases per layer (0 without)
      layer_relevance  float64 (L+1, T) sum_d relevance at the input of each layer
                                        (row L: input of the final norm)
      layer_types      list[str] (L)   "full_attention" / "sliding_attention" per layer
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    target_positions = [int(p) for p in target_positions]
    target_token_ids = [int(t) for t in target_token_ids]
    if len(target_positions) != len(target_token_ids) or not target_positions:
        raise ValueError("target_positions and target_token_ids must be non-empty and of equal length")

    fw = explicit_forward(hf_model, input_ids, position_ids=position_ids)
    T, H, KV, D, n_rep = fw["T"], fw["H"], fw["KV"], fw["D"], fw["n_rep"]
    L = len(fw["layers"])
    logits = fw["logits"]
    scale = fw["scale"]

    with torch.no_grad():
        # start: each selected logit carries its own value
        r_logits = torch.zeros_like(logits)
        target_logit = 0.0
        for p, t in zip(target_positions, target_token_ids):
            p = p % T if p < 0 else p
            r_logits[p, t] += logits[p, t]
            target_logit += float(logits[p, t])

        # lm_head (epsilon rule), final norm (identity)
        r = _lin_eps(fw["nf"], fw["w_lm"], logits, r_logits)  # (T, hidden)

        pos_cos = torch.zeros(L, T, dtype=torch.float64)
        pos_sin = torch.zeros(L, T, dtype=torch.float64)
        absorbed = torch.zeros(L, dtype=torch.float64)
        router_absorbed = torch.zeros(L, dtype=torch.float64)
        bias_absorbed = torch.zeros(L, dtype=torch.float64)
        layer_rel = torch.zeros(L + 1, T, dtype=torch.float64)
        layer_rel[L] = r.sum(-1)

        for li in range(L - 1, -1, -1):
            c = fw["layers"][li]
            W, B = c["W"], c["B"]
            mask = c["mask"]
            kept = 0.0
            # ---- y = h + f' (epsilon rule on the residual add); post-feedforward norm (identity)
            ry = r
            y_st = _stab(c["y"])
            r_h = c["h"] / y_st * ry
            r_mo = c["mop"] / y_st * ry
            if "moe" in c:
                # ---- mixture of experts (see _moe_relevance); pre-MLP norm (identity)
                r_n2, router_absorbed[li] = _moe_relevance(c["moe"], r_mo, mode)
            else:
                # ---- down projection
                r_m = _lin_eps(c["m"], W["d"], c["mo"], r_mo)
                kept += _bias_kept(B["d"], c["mo"], r_mo)
                # ---- m = act(g) * u: uniform rule; act: identity
                r_g = r_m / 2
                r_u = r_m / 2
                # ---- gate / up projections; pre-MLP norm (identity)
                r_n2 = _lin_eps(c["n2"], W["g"], c["g"], r_g) + _lin_eps(c["n2"], W["u"], c["u"], r_u)
                kept += _bias_kept(B["g"], c["g"], r_g) + _bias_kept(B["u"], c["u"], r_u)
            r_h = r_h + r_n2
            # ---- h = x + a' (epsilon rule); post-attention norm (Gemma 3, identity)
            h_st = _stab(c["h"])
            r_x = c["x"] / h_st * r_h
            r_a = c["ap"] / h_st * r_h
            # ---- o_proj
            r_o = _lin_eps(c["o_flat"], W["o"], c["a"], r_a).view(T, H, D).transpose(0, 1)  # (H, T, D)
            kept += _bias_kept(B["o"], c["a"], r_a)
            # ---- o = s v
            s, v_rep, o = c["s"], c["v_rep"], c["o"]
            ratio = r_o / _stab(o)  # R_o / o, (H, T, D)
            r_v_rep_full = v_rep * (s.transpose(1, 2) @ ratio)  # sum_i s[i,j] v[j,d] R_o[i,d]/o[i,d]
            if mode == "cp-lrp":
                r_v_rep = r_v_rep_full
                r_s = None
            else:
                r_v_rep = r_v_rep_full / 2
                r_s = s * (ratio @ v_rep.transpose(1, 2)) / 2  # (H, T, T)
            r_v = r_v_rep.view(KV, n_rep, T, D).sum(1)  # repeat_kv: sum back onto kv heads

            r_q = torch.zeros(H, T, D, dtype=torch.float64)
            r_k = torch.zeros(KV, T, D, dtype=torch.float64)
            if r_s is not None:
                # ---- softmax (AttnLRP rule)
                scores = c["scores"]
                r_sc = scores * (r_s - s * r_s.sum(-1, keepdim=True))
                r_sc = torch.where(mask, r_sc, torch.zeros_like(r_sc))
                absorbed[li] = r_s.sum() - r_sc.sum()
                # ---- scores = q~ k~^T * scale: uniform rule
                rr = torch.where(mask, r_sc / (2 * _stab(scores)), torch.zeros_like(r_sc))
                qr, kr_rep = c["qr"], c["kr_rep"]
                r_qr = qr * (rr @ kr_rep) * scale  # (H, T, D)
                r_kr_rep = kr_rep * (rr.transpose(1, 2) @ qr) * scale
                r_kr = r_kr_rep.view(KV, n_rep, T, D).sum(1)
                # ---- RoPE on the first rd dims; the other dims pass to q / k unchanged
                rd = c["rotary_dim"]
                for r_out, A, Bq, dst in ((r_qr, c["qA"], c["qB"], r_q), (r_kr, c["kA"], c["kB"], r_k)):
                    r_rot_out = r_out[..., :rd]
                    dst[..., rd:] += r_out[..., rd:]
                    sum_st = _stab(A + Bq)
                    r_A = A / sum_st * r_rot_out
                    r_B = Bq / sum_st * r_rot_out
                    if mode == "pa-lrp":
                        dst[..., :rd] += r_A / 2 + _unrotate_relevance(r_B / 2)
                        pos_cos[li] += (r_A / 2).sum(dim=(0, 2))
                        pos_sin[li] += (r_B / 2).sum(dim=(0, 2))
                    else:  # attnlrp: cos / sin are constants
                        dst[..., :rd] += r_A + _unrotate_relevance(r_B)
                # ---- per-head q/k norms (Qwen3, Gemma 3): identity, R_q = R_qn
            # ---- q/k/v projections; input norm (identity)
            r_q_flat = r_q.transpose(0, 1).reshape(T, H * D)
            r_k_flat = r_k.transpose(0, 1).reshape(T, KV * D)
            r_v_flat = r_v.transpose(0, 1).reshape(T, KV * D)
            r_n1 = (
                _lin_eps(c["n1"], W["q"], c["q_flat"], r_q_flat)
                + _lin_eps(c["n1"], W["k"], c["k_flat"], r_k_flat)
                + _lin_eps(c["n1"], W["v"], c["v_flat"], r_v_flat)
            )
            kept += (_bias_kept(B["q"], c["q_flat"], r_q_flat) + _bias_kept(B["k"], c["k_flat"], r_k_flat)
                     + _bias_kept(B["v"], c["v_flat"], r_v_flat))
            bias_absorbed[li] = kept
            r = r_x + r_n1
            layer_rel[li] = r.sum(-1)

    # the embedding scale (Gemma 3) is a constant factor: the layer-0 input's relevance is the token's
    return {
        "token_relevance": r.sum(-1),
        "positional_cos": pos_cos,
        "positional_sin": pos_sin,
        "target_logit": target_logit,
        "logits": logits,
        "softmax_absorbed": absorbed,
        "router_absorbed": router_absorbed,
        "bias_absorbed": bias_absorbed,
        "layer_relevance": layer_rel,
        "layer_types": list(fw["layer_types"]),
    }
