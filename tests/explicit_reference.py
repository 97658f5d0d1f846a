"""Slow, explicit, rule-by-rule LRP reference for LLaMA, Mistral, Qwen2, Qwen3 and Gemma 3
decoder-only models (PA-LRP / AttnLRP / CP-LRP).

This module is the *independent* reference against which the vllm-pelrp engine is tested.
It deliberately shares no code with ``vllm_pelrp`` and uses no ``torch.autograd``: it runs the
forward pass itself, in float64, straight from the weight tensors of a Hugging Face
``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` /
``Gemma3ForCausalLM``, stores every intermediate activation, and then propagates RELEVANCE
(not gradients) backwards, op by op, with explicit closed-form rules.  The architecture is read
from the model's config and modules (``model_type``, ``layer_types``, ``sliding_window``, the
biases present on each ``nn.Linear``, ``q_norm`` / ``k_norm``, sandwich norms).

Forward per decoder layer (x = layer input, shape (T, hidden); ``lin(z; W, b) = z W^T + b``,
b only where the HF module has a bias: Qwen2 q/k/v, ``attention_bias`` / ``mlp_bias``)::

    n1 = norm_in(x)
    q, k, v = lin(n1; Wq, bq), lin(n1; Wk, bk), lin(n1; Wv, bv)      (reshaped to heads)
    q, k = q_norm(q), k_norm(k)          per head, over head_dim   (Qwen3, Gemma 3 only)
    q~ = q*cos + rotate_half(q)*sin ; k~ likewise             (HF neox-style rotate_half)
    scores = q~ k~^T * scale + mask      (k~, v repeated for GQA)
    s = softmax(scores) ; o = s v ; a = lin(o; Wo, bo)
    a' = post_attention_layernorm(a)     (Gemma 3 sandwich norm; LLaMA/Qwen: a' = a)
    h = x + a'
    n2 = norm_pre_mlp(h)                 (LLaMA/Qwen: post_attention_layernorm;
                                          Gemma 3: pre_feedforward_layernorm)
    m = act(lin(n2; Wg, bg)) * lin(n2; Wu, bu) ; f = lin(m; Wd, bd)
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

RoPE: cos/sin = cos/sin(cat(freqs, freqs)), freqs = position * inv_freq.  ``inv_freq`` is
computed with exactly the formula (and the float32 arithmetic) of transformers'
``compute_default_rope_parameters`` / ``_compute_linear_scaling_rope_parameters`` /
``_compute_llama3_parameters`` (rope parameters read from ``config.rope_parameters``, per layer
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
* RoPE, q~ = A + B with A = q*cos, B = rotate_half(q)*sin: epsilon rule on the add
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
* Embedding scale (Gemma 3): a constant factor, relevance passes 100%.
* Token relevance: R_tok[t] = sum_d R(layer-0 input)[t, d] (the scaled embedding for Gemma 3).

Conservation: every rule except the softmax rule and the bias term of the linear rule is
conservative (up to EPS), hence ``target_logit - sum(softmax_absorbed) - sum(bias_absorbed) ==
sum(token_relevance) + sum(positional_cos) + sum(positional_sin)`` for every mode, and layer by
layer; for "cp-lrp" softmax_absorbed is 0 (closure holds to ~1e-11 relative on SmolLM2).  With
EPS -> 0 the rules coincide (to 1e-15) with gradient x input of the correspondingly modified
network; with EPS = 1e-12 they differ from it by ~1e-8 relative.

Not supported (raises NotImplementedError): logit / attention softcapping, bidirectional
attention, partial rotary, RoPE types other than default / linear / llama3, biases on lm_head.

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
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

__all__ = [
    "explicit_relevance", "explicit_forward", "rope_inv_freq", "clear_weight_cache",
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


def rope_inv_freq(config, layer_type: str | None = None) -> torch.Tensor:
    """inverse frequencies (float32, bit-identical to transformers) for default/linear/llama3 RoPE.

    ``layer_type`` ("full_attention" / "sliding_attention") selects the per-layer-type rope
    parameters where the config has them (Gemma 3); None means the global ("full_attention") ones.
    """
    params = _rope_params(config, layer_type)
    rope_type = params["rope_type"]
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial_rotary_factor != 1 is not supported by the reference")
    base = params["rope_theta"]
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # same expression (and float32 arithmetic) as transformers
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / params["factor"]
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
        return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
    raise NotImplementedError(f"rope_type {rope_type!r} is not supported by the reference")


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
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    n_rep = H // KV
    eps = cfg.rms_norm_eps
    scale = float(cfg.query_pre_attn_scalar) ** -0.5 if gemma else 1.0 / math.sqrt(D)
    layer_types = _layer_types(cfg)
    pos = torch.arange(T, dtype=torch.float64) if position_ids is None else _f64(torch.as_tensor(position_ids)).reshape(-1)

    # cos/sin per layer type (attention_scaling is 1 for default/linear/llama3)
    rope = {}
    for lt in sorted(set(layer_types)) + ["full_attention"]:
        if lt in rope:
            continue
        inv_freq = rope_inv_freq(cfg, lt).to(torch.float64)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        rope[lt] = (emb.cos(), emb.sin())  # (T, D)
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

    def lin(mod):
        return _w64(hf_model, mod.weight), _w64(hf_model, getattr(mod, "bias", None))

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
            mask = masks[lt]
            at, mlp = layer.self_attn, layer.mlp
            W, B = {}, {}
            for key, mod in (("q", at.q_proj), ("k", at.k_proj), ("v", at.v_proj), ("o", at.o_proj),
                             ("g", mlp.gate_proj), ("u", mlp.up_proj), ("d", mlp.down_proj)):
                W[key], B[key] = lin(mod)
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
            qA, qB = qn * cos, _rotate_half(qn) * sin
            kA, kB = kn * cos, _rotate_half(kn) * sin
            qr, kr = qA + qB, kA + kB
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
            g = _linear(n2, W["g"], B["g"])
            u = _linear(n2, W["u"], B["u"])
            sg = act(g)
            m = sg * u
            mo = _linear(m, W["d"], B["d"])
            if sandwich:
                pf = layer.post_feedforward_layernorm
                mop = _rmsnorm(mo, gamma(pf), norm_eps(pf))
            else:
                mop = mo
            y = h + mop
            layers.append(dict(
                W=W, B=B, layer_type=lt, mask=mask, cos=cos, sin=sin,
                x=x, n1=n1, q_flat=q_flat, k_flat=k_flat, v_flat=v_flat, q=q, k=k, v=v, qn=qn, kn=kn,
                qA=qA, qB=qB, kA=kA, kB=kB, qr=qr, kr=kr, kr_rep=kr_rep, v_rep=v_rep, scores=scores,
                s=s, o=o, o_flat=o_flat, a=a, ap=ap, h=h, n2=n2, g=g, u=u, sg=sg, m=m, mo=mo, mop=mop, y=y,
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
                # ---- RoPE
                for r_rot_out, A, Bq, dst in ((r_qr, c["qA"], c["qB"], r_q), (r_kr, c["kA"], c["kB"], r_k)):
                    sum_st = _stab(A + Bq)
                    r_A = A / sum_st * r_rot_out
                    r_B = Bq / sum_st * r_rot_out
                    if mode == "pa-lrp":
                        dst += r_A / 2 + _unrotate_relevance(r_B / 2)
                        pos_cos[li] += (r_A / 2).sum(dim=(0, 2))
                        pos_sin[li] += (r_B / 2).sum(dim=(0, 2))
                    else:  # attnlrp: cos / sin are constants
                        dst += r_A + _unrotate_relevance(r_B)
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
        "bias_absorbed": bias_absorbed,
        "layer_relevance": layer_rel,
        "layer_types": list(fw["layer_types"]),
    }
