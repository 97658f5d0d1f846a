"""Slow, explicit, rule-by-rule LRP reference for LLaMA models (PA-LRP / AttnLRP / CP-LRP).

This module is the *independent* reference against which the vllm-pelrp engine is tested.
It deliberately shares no code with ``vllm_pelrp`` and uses no ``torch.autograd``: it runs the
forward pass itself, in float64, straight from the weight tensors of a Hugging Face
``LlamaForCausalLM``, stores every intermediate activation, and then propagates RELEVANCE
(not gradients) backwards, op by op, with explicit closed-form rules.

Forward per decoder layer (x = layer input, shape (T, hidden))::

    n1 = x * rsqrt(mean(x^2) + eps) * g1
    q, k, v = n1 Wq^T, n1 Wk^T, n1 Wv^T                      (reshaped to heads)
    q~ = q*cos + rotate_half(q)*sin ; k~ likewise             (HF neox-style rotate_half)
    scores = q~ k~^T / sqrt(D) + causal mask  (k~, v repeated for GQA)
    s = softmax(scores) ; o = s v ; a = o Wo^T ; h = x + a
    n2 = rmsnorm(h) * g2 ; m = silu(n2 Wg^T) * (n2 Wu^T) ; y = h + m Wd^T
    logits = rmsnorm(y) * gf Wlm^T

RoPE: cos/sin = cos/sin(cat(freqs, freqs)), freqs = position * inv_freq.  ``inv_freq`` is
computed with exactly the formula (and the float32 arithmetic) of transformers'
``compute_default_rope_parameters`` / ``_compute_linear_scaling_rope_parameters`` /
``_compute_llama3_parameters`` (rope parameters read from ``config.rope_parameters``, with a
fallback to the transformers-4 ``rope_theta`` / ``rope_scaling`` attributes); the angles and
everything after them are then computed in float64.

Relevance rules (R = relevance; every division uses a stabilised denominator
``z + EPS*sign(z)`` with EPS = 1e-12 and sign(0) = +1):

* Start: R(logits) is zero except at each selected (position, token id), where it equals the
  logit value (several targets: each gets its own value; duplicates add up).
* Linear z = x W^T (no bias), epsilon rule: R_x[i] = sum_j x[i] W[j,i] R_z[j] / z[j].
* RMSNorm (including the gamma weight): identity rule, R_x = R_out.
* Residual add h = x + a, epsilon rule: R_x = x/h * R_h, R_a = a/h * R_h (elementwise).
* m = silu(g) * u: uniform rule R_silu(g) = R_u = R_m / 2;  SiLU: identity rule R_g = R_silu(g).
* A.V, o = s v per head: uniform rule for the bilinear product:
  R_s[i,j] = sum_d s[i,j] v[j,d] R_o[i,d] / (2 o[i,d]),
  R_v[j,d] = sum_i s[i,j] v[j,d] R_o[i,d] / (2 o[i,d]).
* Softmax (AttnLRP rule, not conservative): R_scores[i,j] = scores[i,j] (R_s[i,j] - s[i,j]
  sum_j' R_s[i,j']); masked entries have score 0 and relevance 0.  The amount
  sum R_s - sum R_scores is "absorbed" and reported per layer ("softmax_absorbed").
* scores = q~ k~^T / sqrt(D): uniform rule (1/sqrt(D) is a constant factor):
  R_q~[i,d] = sum_j q~[i,d] k~[j,d]/sqrt(D) R_scores[i,j] / (2 scores[i,j]);
  R_k~[j,d] = sum_i (same summand).
* repeat_kv (GQA): relevance of the repeated k / v heads is summed back onto the kv head.
* RoPE, q~ = A + B with A = q*cos, B = rotate_half(q)*sin: epsilon rule on the add
  (R_A = A/q~ R_q~, R_B = B/q~ R_q~), then per mode:
    - "pa-lrp": uniform rule on each product: R_q += R_A/2, R_cos += R_A/2, R_rot += R_B/2,
      R_sin += R_B/2; rotate_half is a signed permutation and passes relevance 100%
      (R_q[perm] += R_rot).  Positional relevance of layer l at position t:
      cos part = sum over heads and dims of R_cos (q and k together), sin part = sum of R_sin.
    - "attnlrp": cos/sin are constants: R_q += R_A + R_B (through the permutation);
      positional relevance 0.
* "cp-lrp": the attention probabilities s are held constant, so o = s v is linear in v:
  R_v[j,d] = sum_i s[i,j] v[j,d] R_o[i,d] / o[i,d] (full, not halved); nothing flows into
  scores / q / k, and positional relevance is 0.
* Token relevance: R_tok[t] = sum_d R(embedding)[t, d], the embedding being the input of
  layer 0.

Conservation: every rule except the softmax rule is conservative (up to EPS), hence
``target_logit - sum(softmax_absorbed) == sum(token_relevance) + sum(positional_cos) +
sum(positional_sin)`` for every mode; for "cp-lrp" softmax_absorbed is 0 (closure holds to
~1e-11 relative on SmolLM2).  With EPS -> 0 the rules coincide (to 1e-15) with gradient x input
of the correspondingly modified network; with EPS = 1e-12 they differ from it by ~1e-8 relative.

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

__all__ = ["explicit_relevance", "explicit_forward", "rope_inv_freq", "clear_weight_cache", "MODES", "EPS"]


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


def _w64(model, p: torch.Tensor) -> torch.Tensor:
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


def _rmsnorm(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gamma


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _unrotate_relevance(r_rot: torch.Tensor) -> torch.Tensor:
    """Relevance of rotate_half(q) -> relevance of q (100% through the permutation).

    rotate_half(q)[d] = -q[d + D/2] (d < D/2) and q[d - D/2] (d >= D/2).
    """
    half = r_rot.shape[-1] // 2
    return torch.cat((r_rot[..., half:], r_rot[..., :half]), dim=-1)


def _lin_eps(x: torch.Tensor, w: torch.Tensor, z: torch.Tensor, r_z: torch.Tensor) -> torch.Tensor:
    """Epsilon rule through z = x W^T: R_x[t,i] = x[t,i] * sum_j W[j,i] R_z[t,j] / z[t,j]."""
    return x * ((r_z / _stab(z)) @ w)


def _rope_params(config) -> dict:
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and rp:
        params = dict(rp)
        if "rope_theta" not in params and "full_attention" in params:  # per-layer-type layout
            params = dict(params["full_attention"])
    else:  # transformers 4 layout
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "rope_type" not in params:
        params["rope_type"] = params.get("type", "default")
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", None) or getattr(config, "default_theta", 10000.0)
    return params


def rope_inv_freq(config) -> torch.Tensor:
    """inverse frequencies (float32, bit-identical to transformers) for default/linear/llama3 RoPE."""
    params = _rope_params(config)
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


def _check_supported(config) -> None:
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise NotImplementedError("biases are not supported by the reference")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"hidden_act {act!r} is not supported by the reference")


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
def explicit_forward(hf_model, input_ids, position_ids=None) -> dict:
    """Explicit float64 forward; returns logits and every intermediate activation (per layer)."""
    _check_supported(hf_model.config)
    cfg = hf_model.config
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).cpu()
    T = ids.numel()
    H = cfg.num_attention_heads
    KV = getattr(cfg, "num_key_value_heads", None) or H
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    n_rep = H // KV
    eps = cfg.rms_norm_eps
    pos = torch.arange(T, dtype=torch.float64) if position_ids is None else _f64(torch.as_tensor(position_ids)).reshape(-1)

    inv_freq = rope_inv_freq(cfg).to(torch.float64)
    freqs = pos[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()  # (T, D); attention_scaling is 1 for default/linear/llama3
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # [i, j]: key j visible to query i

    inner = hf_model.model
    with torch.no_grad():
        x = _w64(hf_model, inner.embed_tokens.weight)[ids]
        layers = []
        for layer in inner.layers:
            at, mlp = layer.self_attn, layer.mlp
            W = {
                "q": _w64(hf_model, at.q_proj.weight), "k": _w64(hf_model, at.k_proj.weight), "v": _w64(hf_model, at.v_proj.weight),
                "o": _w64(hf_model, at.o_proj.weight), "g": _w64(hf_model, mlp.gate_proj.weight), "u": _w64(hf_model, mlp.up_proj.weight),
                "d": _w64(hf_model, mlp.down_proj.weight),
            }
            g1, g2 = _w64(hf_model, layer.input_layernorm.weight), _w64(hf_model, layer.post_attention_layernorm.weight)
            eps1 = getattr(layer.input_layernorm, "variance_epsilon", eps)
            eps2 = getattr(layer.post_attention_layernorm, "variance_epsilon", eps)
            n1 = _rmsnorm(x, g1, eps1)
            q_flat, k_flat, v_flat = n1 @ W["q"].T, n1 @ W["k"].T, n1 @ W["v"].T
            q = q_flat.view(T, H, D).transpose(0, 1)  # (H, T, D)
            k = k_flat.view(T, KV, D).transpose(0, 1)  # (KV, T, D)
            v = v_flat.view(T, KV, D).transpose(0, 1)
            qA, qB = q * cos, _rotate_half(q) * sin
            kA, kB = k * cos, _rotate_half(k) * sin
            qr, kr = qA + qB, kA + kB
            kr_rep = kr.repeat_interleave(n_rep, dim=0)  # (H, T, D), head h uses kv head h // n_rep
            v_rep = v.repeat_interleave(n_rep, dim=0)
            raw = qr @ kr_rep.transpose(1, 2) / math.sqrt(D)  # (H, T, T), unmasked
            scores = torch.where(causal, raw, torch.zeros_like(raw))  # masked entries: score 0
            s = torch.softmax(raw.masked_fill(~causal, float("-inf")), dim=-1)
            o = s @ v_rep  # (H, T, D)
            o_flat = o.transpose(0, 1).reshape(T, H * D)
            a = o_flat @ W["o"].T
            h = x + a
            n2 = _rmsnorm(h, g2, eps2)
            g = n2 @ W["g"].T
            u = n2 @ W["u"].T
            sg = torch.nn.functional.silu(g)
            m = sg * u
            mo = m @ W["d"].T
            y = h + mo
            layers.append(dict(
                W=W, x=x, n1=n1, q_flat=q_flat, k_flat=k_flat, v_flat=v_flat, q=q, k=k, v=v,
                qA=qA, qB=qB, kA=kA, kB=kB, qr=qr, kr=kr, kr_rep=kr_rep, v_rep=v_rep, scores=scores,
                s=s, o=o, o_flat=o_flat, a=a, h=h, n2=n2, g=g, u=u, sg=sg, m=m, mo=mo, y=y,
            ))
            x = y
        nf = _rmsnorm(x, _w64(hf_model, inner.norm.weight), getattr(inner.norm, "variance_epsilon", eps))
        w_lm = _w64(hf_model, hf_model.lm_head.weight)
        logits = nf @ w_lm.T
    return dict(
        ids=ids, T=T, H=H, KV=KV, D=D, n_rep=n_rep, cos=cos, sin=sin, causal=causal,
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
      token_relevance  float64 (T,)    sum_d relevance of the layer-0 input (embedding)
      positional_cos   float64 (L, T)  pa-lrp only (zeros otherwise)
      positional_sin   float64 (L, T)  pa-lrp only (zeros otherwise)
      target_logit     float           sum of the selected logits
      logits           float64 (T, V)  logits of the explicit forward
      softmax_absorbed float64 (L,)    sum R_s - sum R_scores per layer (0 for cp-lrp)
      layer_relevance  float64 (L+1, T) sum_d relevance at the input of each layer
                                        (row L: input of the final norm)
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
    sqrt_d = math.sqrt(D)
    causal = fw["causal"]

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
        layer_rel = torch.zeros(L + 1, T, dtype=torch.float64)
        layer_rel[L] = r.sum(-1)

        for li in range(L - 1, -1, -1):
            c = fw["layers"][li]
            W = c["W"]
            # ---- y = h + mo (epsilon rule on the residual add)
            ry = r
            y_st = _stab(c["y"])
            r_h = c["h"] / y_st * ry
            r_mo = c["mo"] / y_st * ry
            # ---- down projection
            r_m = _lin_eps(c["m"], W["d"], c["mo"], r_mo)
            # ---- m = silu(g) * u: uniform rule; silu: identity
            r_g = r_m / 2
            r_u = r_m / 2
            # ---- gate / up projections; post-attention norm (identity)
            r_n2 = _lin_eps(c["n2"], W["g"], c["g"], r_g) + _lin_eps(c["n2"], W["u"], c["u"], r_u)
            r_h = r_h + r_n2
            # ---- h = x + a (epsilon rule)
            h_st = _stab(c["h"])
            r_x = c["x"] / h_st * r_h
            r_a = c["a"] / h_st * r_h
            # ---- o_proj
            r_o = _lin_eps(c["o_flat"], W["o"], c["a"], r_a).view(T, H, D).transpose(0, 1)  # (H, T, D)
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
                r_sc = torch.where(causal, r_sc, torch.zeros_like(r_sc))
                absorbed[li] = r_s.sum() - r_sc.sum()
                # ---- scores = q~ k~^T / sqrt(D): uniform rule
                rr = torch.where(causal, r_sc / (2 * _stab(scores)), torch.zeros_like(r_sc))
                qr, kr_rep = c["qr"], c["kr_rep"]
                r_qr = qr * (rr @ kr_rep) / sqrt_d  # (H, T, D)
                r_kr_rep = kr_rep * (rr.transpose(1, 2) @ qr) / sqrt_d
                r_kr = r_kr_rep.view(KV, n_rep, T, D).sum(1)
                # ---- RoPE
                for r_rot_out, A, B, dst in ((r_qr, c["qA"], c["qB"], r_q), (r_kr, c["kA"], c["kB"], r_k)):
                    sum_st = _stab(A + B)
                    r_A = A / sum_st * r_rot_out
                    r_B = B / sum_st * r_rot_out
                    if mode == "pa-lrp":
                        dst += r_A / 2 + _unrotate_relevance(r_B / 2)
                        pos_cos[li] += (r_A / 2).sum(dim=(0, 2))
                        pos_sin[li] += (r_B / 2).sum(dim=(0, 2))
                    else:  # attnlrp: cos / sin are constants
                        dst += r_A + _unrotate_relevance(r_B)
            # ---- q/k/v projections; input norm (identity)
            r_q_flat = r_q.transpose(0, 1).reshape(T, H * D)
            r_k_flat = r_k.transpose(0, 1).reshape(T, KV * D)
            r_v_flat = r_v.transpose(0, 1).reshape(T, KV * D)
            r_n1 = (
                _lin_eps(c["n1"], W["q"], c["q_flat"], r_q_flat)
                + _lin_eps(c["n1"], W["k"], c["k_flat"], r_k_flat)
                + _lin_eps(c["n1"], W["v"], c["v_flat"], r_v_flat)
            )
            r = r_x + r_n1
            layer_rel[li] = r.sum(-1)

    return {
        "token_relevance": r.sum(-1),
        "positional_cos": pos_cos,
        "positional_sin": pos_sin,
        "target_logit": target_logit,
        "logits": logits,
        "softmax_absorbed": absorbed,
        "layer_relevance": layer_rel,
    }
