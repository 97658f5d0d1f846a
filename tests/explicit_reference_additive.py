"""Slow, explicit, rule-by-rule float64 LRP reference for BERT, RoBERTa and GPT-2 (positions added
to the input as a table): PA-LRP, AttnLRP, CP-LRP.

Independent of ``vllm_pelrp`` (imports nothing from it) and of ``torch.autograd``: it reads the
weights straight from the Hugging Face modules (``BertModel``, ``BertForSequenceClassification``,
``RobertaModel``, ``GPT2LMHeadModel``; GPT-2's Conv1D weights are (in, out)), runs the forward in
float64 keeping every intermediate, and propagates RELEVANCE (not gradients) back op by op with
closed-form ε-ratio rules (every denominator stabilised: z + EPS·sign(z), EPS = 1e-12):

* linear z = x Wᵀ + b: R_x[i] = Σ_j x[i] W[j,i] R_z[j]/z[j]; the bias keeps Σ_j b[j] R_z[j]/z[j];
* add s = a + b (+ c): R_a = a/s · R_s (each addend its share), elementwise;
* LayerNorm y = γ·c/σ + β, c = x − mean(x), σ held constant (LXT): R_u = u/y · R_y for
  u = γ·c/σ, β keeps β/y · R_y; R_c = R_u (a constant factor); the centring c = (I − 11ᵀ/D)x
  is a linear map: R_x[i] = x[i] (R_c[i]/c[i] − (1/D) Σ_j R_c[j]/c[j]);
* GELU, tanh: identity rule, R_in = R_out;
* attention per head, o = s·v: uniform rule, R_s[i,j] = Σ_d s[i,j] v[j,d] R_o[i,d]/(2 o[i,d]),
  R_v[j,d] = Σ_i (same summand); CP-LRP: s constant, R_v takes the whole (no halving) and
  nothing reaches the scores; softmax (AttnLRP): R_scores[i,j] = scores[i,j] (R_s[i,j] −
  s[i,j] Σ_j' R_s[i,j']) (masked entries 0), the loss Σ R_s − Σ R_scores is "softmax_absorbed";
  scores = scale·q kᵀ: uniform rule, R_q[i,d] = Σ_j q[i,d] k[j,d] scale R_scores[i,j] /
  (2 scores[i,j]), R_k[j,d] = Σ_i (same summand);
* input x = E + T + P: the add rule; ``pa-lrp``: token Σ_d R_E, positional Σ_d R_P, token type
  Σ_d R_T; ``attnlrp`` / ``cp-lrp``: token Σ_d (R_E + R_P + R_T), positional 0.

Targets, each in relevance form:
* ``{"logits": [(position, token_id), ...]}`` (GPT-2): R(logit) = its value;
* ``{"dimension": k}``: R(pooled_k) = pooled_k; pooling (mean / cls / max) as a linear map or
  winner-take-all;
* ``{"label": i}`` (BertForSequenceClassification): R(logit_i) = logit_i through classifier
  (bias kept), tanh (identity), pooler dense (bias kept) to the CLS state;
* ``{"similarity": other_ids}``: cos = c·Σ_k a_k b_k with c = 1/(‖a‖‖b‖) constant;
  R(a_k) = R(b_k) = ½ c a_k b_k; each side propagated through its own text.

Conservation: target = Σ token + Σ positional + Σ token_type + Σ softmax_absorbed +
Σ bias_absorbed + embedding_bias + head_bias, where bias_absorbed[l] gathers layer l's linear
biases and LayerNorm β, embedding_bias the embedding LayerNorm's β (BERT) and head_bias GPT-2's
ln_f β or the classifier head's biases.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-12
MODES = ("pa-lrp", "attnlrp", "cp-lrp")


def _stab(z: torch.Tensor) -> torch.Tensor:
    return z + EPS * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def _f64(t) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# weights, read from the HF modules
# ---------------------------------------------------------------------------------------------
def _linear(module, conv1d: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = _f64(module.weight)
    return (weight.T.contiguous() if conv1d else weight), _f64(module.bias)


def _norm(module) -> tuple[torch.Tensor, torch.Tensor, float]:
    return _f64(module.weight), _f64(module.bias), float(module.eps)


def _read(model) -> dict:
    config = model.config
    if config.model_type == "gpt2":
        tr = model.transformer
        layers = []
        for block in tr.h:
            qkv_w, qkv_b = _linear(block.attn.c_attn, conv1d=True)
            hidden = qkv_w.shape[1]
            layers.append(dict(
                ln1=_norm(block.ln_1),
                q=(qkv_w[:hidden], qkv_b[:hidden]),
                k=(qkv_w[hidden:2 * hidden], qkv_b[hidden:2 * hidden]),
                v=(qkv_w[2 * hidden:], qkv_b[2 * hidden:]),
                o=_linear(block.attn.c_proj, conv1d=True),
                ln2=_norm(block.ln_2),
                up=_linear(block.mlp.c_fc, conv1d=True),
                down=_linear(block.mlp.c_proj, conv1d=True)))
        head_dim = config.n_embd // config.n_head
        scale = head_dim ** -0.5 if config.scale_attn_weights else 1.0
        return dict(kind="pre", causal=True, E=_f64(tr.wte.weight), P=_f64(tr.wpe.weight),
                    T=None, offset=0, layers=layers, ln_f=_norm(tr.ln_f),
                    lm_head=_f64(model.lm_head.weight), heads=config.n_head,
                    scales=[scale / ((i + 1) if config.scale_attn_by_inverse_layer_idx else 1)
                            for i in range(config.n_layer)],
                    tanh_gelu=config.activation_function in ("gelu_new", "gelu_pytorch_tanh"))
    base = getattr(model, "bert", None) or getattr(model, "roberta", None) or model
    emb = base.embeddings
    layers = []
    for layer in base.encoder.layer:
        att = layer.attention
        layers.append(dict(
            q=_linear(att.self.query), k=_linear(att.self.key), v=_linear(att.self.value),
            o=_linear(att.output.dense), ln1=_norm(att.output.LayerNorm),
            up=_linear(layer.intermediate.dense), down=_linear(layer.output.dense),
            ln2=_norm(layer.output.LayerNorm)))
    head_dim = config.hidden_size // config.num_attention_heads
    offset = config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta") else 0
    out = dict(kind="post", causal=False, E=_f64(emb.word_embeddings.weight),
               P=_f64(emb.position_embeddings.weight), T=_f64(emb.token_type_embeddings.weight),
               offset=offset, ln_emb=_norm(emb.LayerNorm), layers=layers,
               heads=config.num_attention_heads,
               scales=[head_dim ** -0.5] * config.num_hidden_layers,
               tanh_gelu=config.hidden_act in ("gelu_new", "gelu_pytorch_tanh"))
    if hasattr(model, "classifier"):
        out["pooler"] = _linear(base.pooler.dense)
        out["classifier"] = _linear(model.classifier)
    return out


# ---------------------------------------------------------------------------------------------
# forward (float64), keeping what the relevance rules need
# ---------------------------------------------------------------------------------------------
def _gelu(x, tanh_approx):
    if tanh_approx:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _lin(x, wb):
    weight, bias = wb
    z = x @ weight.T
    return z if bias is None else z + bias


def _ln_forward(x, norm):
    gamma, beta, eps = norm
    c = x - x.mean(-1, keepdim=True)
    sigma = torch.sqrt((c * c).mean(-1, keepdim=True) + eps)
    u = c / sigma * gamma
    return dict(x=x, c=c, u=u, beta=beta, y=u + beta)


def _attention_forward(q, k, v, heads, scale, causal):
    length = q.shape[0]
    dim = q.shape[1] // heads
    cache = []
    outs = []
    for h in range(heads):
        qh, kh, vh = (t[:, h * dim:(h + 1) * dim] for t in (q, k, v))
        raw = scale * (qh @ kh.T)
        masked = raw.clone()
        if causal:
            blocked = torch.ones(length, length, dtype=torch.bool).triu(1)
            masked = masked.masked_fill(blocked, float("-inf"))
        s = torch.softmax(masked, dim=-1)
        o = s @ vh
        cache.append(dict(q=qh, k=kh, v=vh, raw=raw, s=s, o=o, scale=scale,
                          visible=~torch.ones(length, length, dtype=torch.bool).triu(1)
                          if causal else torch.ones(length, length, dtype=torch.bool)))
        outs.append(o)
    return torch.cat(outs, dim=-1), cache


def _forward(w, input_ids, token_type_ids, positions):
    ids = torch.as_tensor(input_ids)
    length = ids.shape[0]
    if positions is None:
        positions = torch.arange(length) + w["offset"]
    parts = {"E": w["E"][ids], "P": w["P"][torch.as_tensor(positions)]}
    if w["T"] is not None:
        types = torch.zeros(length, dtype=torch.long) if token_type_ids is None \
            else torch.as_tensor(token_type_ids)
        parts["T"] = w["T"][types]
    x = sum(parts.values())
    fw = dict(parts=parts, x0=x, layers=[])
    if w["kind"] == "post":
        fw["ln_emb"] = _ln_forward(x, w["ln_emb"])
        x = fw["ln_emb"]["y"]
    for index, lw in enumerate(w["layers"]):
        st = dict(x=x)
        if w["kind"] == "pre":
            st["ln1"] = _ln_forward(x, lw["ln1"])
            a_in = st["ln1"]["y"]
        else:
            a_in = x
        st["a_in"] = a_in
        st["q"], st["k"], st["v"] = (_lin(a_in, lw[n]) for n in "qkv")
        st["o_cat"], st["att"] = _attention_forward(st["q"], st["k"], st["v"], w["heads"],
                                                    w["scales"][index], w["causal"])
        st["a"] = _lin(st["o_cat"], lw["o"])
        if w["kind"] == "pre":
            st["h"] = x + st["a"]
            st["ln2"] = _ln_forward(st["h"], lw["ln2"])
            m_in = st["ln2"]["y"]
        else:
            st["s1"] = x + st["a"]
            st["ln1"] = _ln_forward(st["s1"], lw["ln1"])
            st["h"] = st["ln1"]["y"]
            m_in = st["h"]
        st["m_in"] = m_in
        st["u"] = _lin(m_in, lw["up"])
        st["g"] = _gelu(st["u"], w["tanh_gelu"])
        st["m"] = _lin(st["g"], lw["down"])
        if w["kind"] == "pre":
            x = st["h"] + st["m"]
        else:
            st["s2"] = st["h"] + st["m"]
            st["ln2"] = _ln_forward(st["s2"], lw["ln2"])
            x = st["ln2"]["y"]
        fw["layers"].append(st)
    fw["last"] = x
    if w["kind"] == "pre":
        fw["ln_f"] = _ln_forward(x, w["ln_f"])
        fw["final"] = fw["ln_f"]["y"]
    else:
        fw["final"] = x
    return fw


# ---------------------------------------------------------------------------------------------
# relevance rules
# ---------------------------------------------------------------------------------------------
def _lin_rel(x, wb, z, r_z):
    """ε-rule on z = x Wᵀ + b → (R_x, what the bias keeps)."""
    weight, bias = wb
    ratio = r_z / _stab(z)
    r_x = x * (ratio @ weight)
    kept = 0.0 if bias is None else float((ratio * bias).sum())
    return r_x, kept


def _add_rel(parts, total, r_total):
    ratio = r_total / _stab(total)
    return [p * ratio for p in parts]


def _ln_rel(st, r_y):
    """LayerNorm with σ constant → (R_x, what β keeps)."""
    ratio = r_y / _stab(st["y"])
    r_u, kept = st["u"] * ratio, float((st["beta"] * ratio).sum())
    centred = r_u / _stab(st["c"])
    r_x = st["x"] * (centred - centred.mean(-1, keepdim=True))
    return r_x, kept


def _attention_rel(att, r_o_cat, mode):
    """Per head → (R_q, R_k, R_v) concatenated over heads, and the softmax loss."""
    dim = att[0]["q"].shape[1]
    r_q, r_k, r_v = [], [], []
    absorbed = 0.0
    for h, c in enumerate(att):
        r_o = r_o_cat[:, h * dim:(h + 1) * dim]
        ratio = r_o / _stab(c["o"])  # (T, D)
        share = 1.0 if mode == "cp-lrp" else 0.5
        # summand[i, j, d] = s[i,j] v[j,d] ratio[i,d]
        r_v.append(share * (c["s"].T @ ratio) * c["v"])
        if mode == "cp-lrp":
            r_q.append(torch.zeros_like(c["q"]))
            r_k.append(torch.zeros_like(c["k"]))
            continue
        r_s = 0.5 * c["s"] * (ratio @ c["v"].T)
        raw = torch.where(c["visible"], c["raw"], torch.zeros_like(c["raw"]))
        r_scores = raw * (r_s - c["s"] * r_s.sum(-1, keepdim=True))
        r_scores = torch.where(c["visible"], r_scores, torch.zeros_like(r_scores))
        absorbed += float(r_s.sum() - r_scores.sum())
        score_ratio = 0.5 * c["scale"] * r_scores / _stab(raw)  # raw = scale·q·kᵀ
        score_ratio = torch.where(c["visible"], score_ratio, torch.zeros_like(score_ratio))
        r_q.append(c["q"] * (score_ratio @ c["k"]))
        r_k.append(c["k"] * (score_ratio.T @ c["q"]))
    return torch.cat(r_q, -1), torch.cat(r_k, -1), torch.cat(r_v, -1), absorbed


def _layer_rel(w, lw, st, r_out, mode):
    """Relevance at the layer output → at its input; (R_x, softmax loss, bias kept)."""
    kept = 0.0
    if w["kind"] == "pre":
        r_h1, r_m = _add_rel([st["h"], st["m"]], st["h"] + st["m"], r_out)
    else:
        r_s2, k = _ln_rel(st["ln2"], r_out)
        kept += k
        r_h1, r_m = _add_rel([st["h"], st["m"]], st["s2"], r_s2)
    r_g, k = _lin_rel(st["g"], lw["down"], st["m"], r_m)
    kept += k
    r_u = r_g  # GELU: identity rule
    r_min, k = _lin_rel(st["m_in"], lw["up"], st["u"], r_u)
    kept += k
    if w["kind"] == "pre":
        r_h2, k = _ln_rel(st["ln2"], r_min)
        kept += k
        r_h = r_h1 + r_h2
        r_x1, r_a = _add_rel([st["x"], st["a"]], st["h"], r_h)
    else:
        r_h = r_h1 + r_min
        r_s1, k = _ln_rel(st["ln1"], r_h)
        kept += k
        r_x1, r_a = _add_rel([st["x"], st["a"]], st["s1"], r_s1)
    r_o, k = _lin_rel(st["o_cat"], lw["o"], st["a"], r_a)
    kept += k
    r_q, r_k, r_v, absorbed = _attention_rel(st["att"], r_o, mode)
    r_in = torch.zeros_like(st["a_in"])
    for name, r in (("q", r_q), ("k", r_k), ("v", r_v)):
        r_part, k = _lin_rel(st["a_in"], lw[name], st[name], r)
        r_in = r_in + r_part
        kept += k
    if w["kind"] == "pre":
        r_x2, k = _ln_rel(st["ln1"], r_in)
        kept += k
    else:
        r_x2 = r_in
    return r_x1 + r_x2, absorbed, kept


def _pool(hidden, pooling):
    if pooling == "mean":
        return hidden.mean(0)
    if pooling == "cls":
        return hidden[0]
    if pooling == "max":
        return hidden.max(0).values
    raise ValueError(pooling)


def _pool_rel(hidden, pooling, r_pooled):
    """Pooled relevance (hidden,) → hidden states (T, hidden)."""
    pooled = _pool(hidden, pooling)
    out = torch.zeros_like(hidden)
    if pooling == "mean":
        return (hidden / hidden.shape[0]) * (r_pooled / _stab(pooled))
    if pooling == "cls":
        out[0] = r_pooled
        return out
    winners = hidden.max(0).indices
    out[winners, torch.arange(hidden.shape[1])] = r_pooled
    return out


def _backward(w, fw, r_final, mode, head_bias, target):
    """Relevance at the final hidden states → the result dict."""
    r = r_final
    if w["kind"] == "pre":
        r, k = _ln_rel(fw["ln_f"], r)
        head_bias += k
    absorbed, kept = [], []
    for lw, st in reversed(list(zip(w["layers"], fw["layers"]))):
        r, a, k = _layer_rel(w, lw, st, r, mode)
        absorbed.append(a)
        kept.append(k)
    embedding_bias = 0.0
    if w["kind"] == "post":
        r, embedding_bias = _ln_rel(fw["ln_emb"], r)
    names = list(fw["parts"])
    shares = dict(zip(names, _add_rel([fw["parts"][n] for n in names], fw["x0"], r)))
    if mode == "pa-lrp":
        token = shares["E"].sum(-1)
        positional = shares["P"].sum(-1)
        token_type = shares["T"].sum(-1) if "T" in shares else None
    else:
        token = sum(shares.values()).sum(-1)
        positional = torch.zeros_like(token)
        token_type = torch.zeros_like(token) if "T" in shares else None
    return dict(token=token, positional=positional, token_type=token_type, target=target,
                softmax_absorbed=torch.tensor(absorbed[::-1], dtype=torch.float64),
                bias_absorbed=torch.tensor(kept[::-1], dtype=torch.float64),
                embedding_bias=embedding_bias, head_bias=head_bias)


@torch.no_grad()
def explicit_additive_relevance(model, input_ids, target: dict, mode: str = "pa-lrp",
                                token_type_ids=None, pooling: str = "mean", positions=None,
                                other_token_type_ids=None) -> dict:
    """Relevance of one target (see the module docstring) on one text, float64.

    Returns dict(token, positional, token_type (None without token types), target,
    softmax_absorbed (L,), bias_absorbed (L,), embedding_bias, head_bias); for
    ``{"similarity": other_ids}``: dict(first=…, second=…, cosine=…), one result per text.
    """
    if mode not in MODES:
        raise ValueError(mode)
    w = _read(model)
    fw = _forward(w, input_ids, token_type_ids, positions)
    final = fw["final"]
    (kind, value), = target.items()
    if kind == "logits":
        r_final = torch.zeros_like(final)
        total = 0.0
        for position, token_id in value:
            row = w["lm_head"][token_id]
            logit = float(final[position] @ row)
            r_final[position] += final[position] * row * (logit / float(_stab(torch.tensor(logit))))
            total += logit
        return _backward(w, fw, r_final, mode, 0.0, total)
    if kind == "dimension":
        pooled = _pool(final, pooling)
        r_pooled = torch.zeros_like(pooled)
        r_pooled[value] = pooled[value]
        return _backward(w, fw, _pool_rel(final, pooling, r_pooled), mode, 0.0,
                         float(pooled[value]))
    if kind == "label":
        cls = final[0]
        z_pool = _lin(cls, w["pooler"])
        pooled = torch.tanh(z_pool)
        weight, bias = w["classifier"]
        logit = pooled @ weight[value] + bias[value]
        ratio = logit / _stab(logit)
        r_pooled = pooled * weight[value] * ratio
        head_bias = float(bias[value] * ratio)
        r_cls, k = _lin_rel(cls[None], w["pooler"], z_pool[None], r_pooled[None])  # tanh: identity
        r_final = torch.zeros_like(final)
        r_final[0] = r_cls[0]
        return _backward(w, fw, r_final, mode, head_bias + k, float(logit))
    if kind == "similarity":
        other = _forward(w, value, other_token_type_ids, None)
        a, b = _pool(final, pooling), _pool(other["final"], pooling)
        c = 1.0 / (a.norm() * b.norm())
        r_side = 0.5 * c * a * b
        cosine = float(c * (a * b).sum())
        first = _backward(w, fw, _pool_rel(final, pooling, r_side), mode, 0.0, cosine / 2)
        second = _backward(w, other, _pool_rel(other["final"], pooling, r_side), mode, 0.0,
                           cosine / 2)
        return dict(first=first, second=second, cosine=cosine)
    raise ValueError(f"unknown target {target!r}")


@torch.no_grad()
def explicit_additive_forward(model, input_ids, token_type_ids=None) -> torch.Tensor:
    """Final hidden states (T, hidden), float64 (HF's last_hidden_state)."""
    return _forward(_read(model), input_ids, token_type_ids, None)["final"]
