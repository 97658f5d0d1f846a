"""Self-check of the slow explicit LRP reference (tests/explicit_reference.py) on tiny random LLaMA,
Mistral, Qwen2, Qwen3, Gemma 3, Phi-3 (partial rotary, LongRoPE), Qwen3-YaRN, Qwen3-MoE and
Mixtral models (forward vs HF, attention masks, conservation, the rules as gradient × input of
a modified network, and LXT main's Qwen3-MoE relevance)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

try:
    from explicit_reference import MODES, explicit_forward, explicit_relevance, rope_inv_freq, rope_tables
    from tiny_models import FAMILIES, NEW_FAMILIES, tiny_config, tiny_model as _tiny_family_model
except ImportError:  # pragma: no cover - depends on how pytest sets sys.path
    from tests.explicit_reference import MODES, explicit_forward, explicit_relevance, rope_inv_freq, rope_tables
    from tests.tiny_models import FAMILIES, NEW_FAMILIES, tiny_config, tiny_model as _tiny_family_model

REL = 1e-6
INPUT_IDS = [1, 17, 42, 5, 99, 63, 8, 23, 71, 3, 54, 30]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(1234)
    # the LLaMA of tests/tiny_models.py (GQA 4/2, llama3 scaling) with 2 layers and
    # transformers' own initialisation at std 0.1, every embedding row drawn (no padding row)
    cfg = tiny_config("llama", num_hidden_layers=2, rms_norm_eps=1e-6, initializer_range=0.1,
                      max_position_embeddings=256, pad_token_id=None)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():  # non-trivial RMSNorm gammas
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _targets(model):
    fw = explicit_forward(model, INPUT_IDS)
    last = len(INPUT_IDS) - 1
    top = int(fw["logits"][last].argmax())
    return fw, [last], [top]


def _close(a, b, rel=REL):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def test_inv_freq_matches_transformers(tiny_model):
    ours = rope_inv_freq(tiny_model.config)
    hf = tiny_model.model.rotary_emb.inv_freq
    assert torch.equal(ours, hf.to(ours.dtype))
    # llama3 scaling really did something here (high, medium and low frequency bands)
    base = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    assert ours[0] == base[0] and not torch.allclose(ours[1:], base[1:])


def test_forward_matches_hf(tiny_model):
    ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():
        hf_logits = tiny_model(ids[None]).logits[0].double()
    fw = explicit_forward(tiny_model, ids)
    assert fw["logits"].dtype == torch.float64
    assert fw["logits"].shape == (len(INPUT_IDS), 101)
    assert torch.allclose(fw["logits"], hf_logits, atol=1e-4, rtol=1e-4)
    assert hf_logits.abs().max() > 0.1  # logits are not trivially small


@pytest.mark.parametrize("mode", MODES)
def test_conservation_accounts_for_softmax(tiny_model, mode):
    fw, pos, tok = _targets(tiny_model)
    out = explicit_relevance(tiny_model, INPUT_IDS, pos, tok, mode=mode)
    T, L = len(INPUT_IDS), 2
    assert out["token_relevance"].shape == (T,) and out["token_relevance"].dtype == torch.float64
    assert out["positional_cos"].shape == (L, T) and out["positional_sin"].shape == (L, T)
    assert torch.equal(out["logits"], fw["logits"])
    assert _close(out["target_logit"], float(fw["logits"][pos[0], tok[0]]), 1e-12)

    tok_sum = float(out["token_relevance"].sum())
    pos_sum = float(out["positional_cos"].sum() + out["positional_sin"].sum())
    absorbed = float(out["softmax_absorbed"].sum())
    logit = out["target_logit"]
    # causal attention: no relevance may reach tokens after the target position
    assert torch.all(out["token_relevance"][pos[0] + 1 :] == 0)
    if mode == "cp-lrp":
        assert absorbed == 0.0 and pos_sum == 0.0
        assert _close(tok_sum, logit)
    else:
        assert all(abs(a) > 0 for a in out["softmax_absorbed"].tolist())
        assert _close(logit - absorbed, tok_sum + pos_sum)
        # the per-layer accounting also closes layer by layer
        lr = out["layer_relevance"]
        assert _close(float(lr[L].sum()), logit)
        for li in range(L):
            below = float(lr[li].sum()) + float(out["positional_cos"][li].sum() + out["positional_sin"][li].sum())
            assert _close(float(lr[li + 1].sum()) - float(out["softmax_absorbed"][li]), below)
        if mode == "attnlrp":
            assert pos_sum == 0.0
        else:
            assert pos_sum != 0.0
            assert float(out["positional_cos"].abs().sum()) > 0 and float(out["positional_sin"].abs().sum()) > 0


def test_multi_target_and_mode_relations(tiny_model):
    fw = explicit_forward(tiny_model, INPUT_IDS)
    pos = [4, 7, 11]
    tok = [int(fw["logits"][p].argmax()) for p in pos]
    outs = {m: explicit_relevance(tiny_model, INPUT_IDS, pos, tok, mode=m) for m in MODES}
    want = sum(float(fw["logits"][p, t]) for p, t in zip(pos, tok))
    for m, out in outs.items():
        assert _close(out["target_logit"], want, 1e-12), m
    pa, at, cp = outs["pa-lrp"], outs["attnlrp"], outs["cp-lrp"]
    # pa-lrp and attnlrp coincide above the first RoPE: same start, same top-layer relevance,
    # same softmax absorption in the last layer (below its RoPE the two modes diverge)
    assert pa["target_logit"] == at["target_logit"]
    assert torch.allclose(pa["layer_relevance"][-1], at["layer_relevance"][-1], rtol=0, atol=0)
    assert _close(float(pa["softmax_absorbed"][-1]), float(at["softmax_absorbed"][-1]), 1e-12)
    # but differ below it (positional relevance is split off in pa-lrp)
    assert not torch.allclose(pa["token_relevance"], at["token_relevance"])
    # cp-lrp is exactly conservative for a sum of logits as well
    assert _close(float(cp["token_relevance"].sum()), want)
    for out in (pa, at):
        tot = float(out["token_relevance"].sum() + out["positional_cos"].sum() + out["positional_sin"].sum())
        assert _close(want - float(out["softmax_absorbed"].sum()), tot)


def test_bad_mode_raises(tiny_model):
    with pytest.raises(ValueError):
        explicit_relevance(tiny_model, INPUT_IDS, [3], [5], mode="gradient")


def test_weight_cache_sees_in_place_changes():
    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=31, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, initializer_range=0.1)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.tensor([3, 9, 27, 4, 11])
    first = explicit_forward(model, ids)["logits"]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.data.mul_(3.0)  # .data: no version bump
        hf = model(ids[None]).logits[0].double()
    second = explicit_forward(model, ids)["logits"]
    assert not torch.allclose(first, second)
    assert torch.allclose(second, hf, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms), Gemma 3 (1+γ norms, sandwich norms,
# GELU-tanh, √hidden embedding scale, query_pre_attn_scalar, sliding/full layers with their
# own rope θ) and the LLaMA of tests/tiny_models.py
# --------------------------------------------------------------------------------------------
# 29 tokens: longer than Gemma 3's sliding window (8) several times over
FAMILY_IDS = torch.randint(3, 101, (29,), generator=torch.Generator().manual_seed(5)).tolist()
_FAMILY_MODELS: dict = {}


def _family_model(family):
    if family not in _FAMILY_MODELS:
        _FAMILY_MODELS[family] = _tiny_family_model(family)
    return _FAMILY_MODELS[family]


def _hf_rope_inv_freq(model, layer_type):
    rotary = model.model.rotary_emb
    return getattr(rotary, f"{layer_type}_inv_freq", None) if hasattr(rotary, f"{layer_type}_inv_freq") \
        else rotary.inv_freq


def _router_outputs(model, ids):
    """transformers' routing (logits, weights, chosen experts) per MoE layer, from hooks."""
    captured, hooks = {}, []
    for li, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "experts"):
            hooks.append(layer.mlp.gate.register_forward_hook(
                lambda mod, args, out, li=li: captured.__setitem__(li, out)))
    try:
        with torch.no_grad():
            model(ids[None])
    finally:
        for hook in hooks:
            hook.remove()
    return captured


@pytest.mark.parametrize("family", FAMILIES + NEW_FAMILIES)
def test_family_forward_matches_hf(family):
    model = _family_model(family)
    ids = torch.tensor(FAMILY_IDS)
    with torch.no_grad():
        out = model(ids[None], output_attentions=True)
    hf_logits = out.logits[0].double()
    fw = explicit_forward(model, ids)
    assert fw["logits"].dtype == torch.float64
    assert hf_logits.abs().max() > 1.0
    assert torch.allclose(fw["logits"], hf_logits, atol=1e-4, rtol=1e-4)
    # rope per layer type: bit-identical inverse frequencies (after HF's forward: LongRoPE picks
    # its table by length), the same attention factor, the same number of rotating dims
    for layer_type in set(fw["layer_types"]):
        inv_freq, factor = rope_tables(model.config, layer_type, seq_len=len(FAMILY_IDS))
        assert torch.equal(inv_freq, _hf_rope_inv_freq(model, layer_type))
        assert fw["layers"][fw["layer_types"].index(layer_type)]["cos"].shape[-1] == 2 * inv_freq.numel()
        rotary = model.model.rotary_emb
        assert factor == getattr(rotary, f"{layer_type}_attention_scaling", None) or rotary.attention_scaling
    want_rd = {"phi3": 12, "phi3_longrope": 12}.get(family, 16)
    assert all(c["rotary_dim"] == want_rd for c in fw["layers"])
    # mixture of experts: the same experts chosen, the same routing weights
    routed = _router_outputs(model, ids)
    assert sorted(routed) == [li for li, c in enumerate(fw["layers"]) if "moe" in c]
    assert (family in ("qwen3_moe", "mixtral")) == bool(routed)
    for li, (_, hf_weights, hf_experts) in routed.items():
        moe = fw["layers"][li]["moe"]
        assert torch.equal(moe["idx"], hf_experts)
        assert torch.allclose(moe["w"], hf_weights.double(), atol=1e-5, rtol=0)
    # attention probabilities, layer by layer: same values, zero at exactly the same places
    # (causal; Gemma 3's sliding layers: a query sees itself and the 7 keys before it)
    for li, hf_probs in enumerate(out.attentions):
        s = fw["layers"][li]["s"]
        assert torch.allclose(s, hf_probs[0].double(), atol=1e-5, rtol=0)
        assert torch.equal(s == 0, hf_probs[0] == 0)
    if family == "gemma3":
        assert fw["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention",
                                     "sliding_attention"]
        visible = [int(fw["layers"][li]["mask"][-1].sum()) for li in range(4)]
        assert visible == [8, 8, len(FAMILY_IDS), 8]
        assert fw["embed_scale"] == 8.0  # √64
        assert not torch.equal(rope_inv_freq(model.config, "sliding_attention"),
                               rope_inv_freq(model.config, "full_attention"))


def test_qwen2_sliding_layers_and_mistral_window_match_hf():
    """Qwen2 with use_sliding_window (layers >= max_window_layers slide) and a Mistral whose
    every layer slides: the reference's masks follow HF's."""
    from transformers import MistralConfig, MistralForCausalLM

    qwen = _tiny_family_model("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=1)
    torch.manual_seed(3)
    cfg = MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5,
                        initializer_range=0.1)
    cfg._attn_implementation = "eager"
    mistral = MistralForCausalLM(cfg).eval()
    ids = torch.tensor(FAMILY_IDS)
    for model, types in ((qwen, ["full_attention", "sliding_attention", "sliding_attention"]),
                         (mistral, ["sliding_attention"] * 2)):
        with torch.no_grad():
            out = model(ids[None], output_attentions=True)
        fw = explicit_forward(model, ids)
        assert fw["layer_types"] == types
        assert torch.allclose(fw["logits"], out.logits[0].double(), atol=1e-4, rtol=1e-4)
        for li, hf_probs in enumerate(out.attentions):
            assert torch.equal(fw["layers"][li]["s"] == 0, hf_probs[0] == 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES + NEW_FAMILIES)
def test_family_conservation_books_softmax_and_bias(family, mode):
    model = _family_model(family)
    fw = explicit_forward(model, FAMILY_IDS)
    T, L = len(FAMILY_IDS), model.config.num_hidden_layers
    pos = [T - 1, 17]
    tok = [int(fw["logits"][T - 1].argmax()), int(fw["logits"][17].argmax())]
    out = explicit_relevance(model, FAMILY_IDS, pos, tok, mode=mode)
    assert out["token_relevance"].shape == (T,)
    assert out["positional_cos"].shape == (L, T) and out["positional_sin"].shape == (L, T)
    assert out["softmax_absorbed"].shape == (L,) and out["bias_absorbed"].shape == (L,)
    assert _close(out["target_logit"], float(fw["logits"][pos[0], tok[0]] + fw["logits"][pos[1], tok[1]]), 1e-12)

    tok_sum = float(out["token_relevance"].sum())
    pos_sum = float(out["positional_cos"].sum() + out["positional_sin"].sum())
    soft = float(out["softmax_absorbed"].sum())
    router = float(out["router_absorbed"].sum())
    bias = float(out["bias_absorbed"].sum())
    logit = out["target_logit"]
    assert _close(logit - soft - router - bias, tok_sum + pos_sum)
    # layer by layer
    lr = out["layer_relevance"]
    assert _close(float(lr[L].sum()), logit)
    for li in range(L):
        below = float(lr[li].sum()) + float(out["positional_cos"][li].sum() + out["positional_sin"][li].sum())
        above = (float(lr[li + 1].sum()) - float(out["softmax_absorbed"][li]) - float(out["bias_absorbed"][li])
                 - float(out["router_absorbed"][li]))
        assert _close(above, below), li
    # the router's softmax rule absorbs in each MoE layer (Qwen3-MoE's layer 1 is dense), except
    # in cp-lrp, where the routing weights are constants
    moe_layers = [li for li, c in enumerate(fw["layers"]) if "moe" in c]
    assert moe_layers == {"qwen3_moe": [0, 2], "mixtral": [0, 1, 2]}.get(family, [])
    for li in range(L):
        assert (out["router_absorbed"][li] != 0) == (li in moe_layers and mode != "cp-lrp"), li
    # only Qwen2 has biases (q/k/v); they keep some relevance in every layer
    if family == "qwen2":
        assert all(abs(b) > 1e-6 for b in out["bias_absorbed"].tolist())
    else:
        assert bias == 0.0
    if mode == "cp-lrp":
        assert soft == 0.0 and pos_sum == 0.0
    else:
        assert all(abs(a) > 0 for a in out["softmax_absorbed"].tolist())
        if mode == "attnlrp":
            assert pos_sum == 0.0
        else:
            assert float(out["positional_cos"].abs().sum()) > 0 and float(out["positional_sin"].abs().sum()) > 0
            assert all(float(out["positional_cos"][li].abs().sum()) > 0 for li in range(L))


def test_gemma3_sliding_window_limits_the_reach_of_relevance():
    """Three sliding layers (window 8): from position 28 relevance reaches back 3·7 positions
    at most, so tokens 0..6 get exactly nothing and token 7 something."""
    model = _tiny_family_model("gemma3", num_hidden_layers=3, layer_types=["sliding_attention"] * 3)
    T = len(FAMILY_IDS)
    fw = explicit_forward(model, FAMILY_IDS)
    for mode in ("pa-lrp", "attnlrp"):
        out = explicit_relevance(model, FAMILY_IDS, [T - 1], [int(fw["logits"][T - 1].argmax())], mode=mode)
        r = out["token_relevance"]
        assert torch.all(r[: T - 1 - 21] == 0) and r[T - 1 - 21] != 0, mode
        if mode == "pa-lrp":
            assert torch.all(out["positional_cos"][:, : T - 1 - 21] == 0)
            assert out["positional_cos"][0, T - 1 - 21] != 0


def test_gemma3_embed_scale_is_rounded_like_hf():
    """HF multiplies by the embed_scale buffer cast to the weight dtype: float32 √48 in fp32,
    6.9375 (not 6.9282) in bf16; the reference's layer-0 input uses the same value."""
    model = _tiny_family_model("gemma3", hidden_size=48, head_dim=12)
    ids = torch.tensor(FAMILY_IDS)
    fw = explicit_forward(model, ids)
    assert fw["embed_scale"] == float(torch.tensor(48**0.5, dtype=torch.float32))
    with torch.no_grad():
        assert torch.allclose(fw["embedding"], model.model.embed_tokens(ids[None])[0].double(), rtol=1e-6, atol=0)
    model = model.to(torch.bfloat16)
    assert explicit_forward(model, ids)["embed_scale"] == 6.9375


def test_unsupported_gemma_features_raise():
    model = _tiny_family_model("gemma3", final_logit_softcapping=30.0)
    with pytest.raises(NotImplementedError, match="softcapping"):
        explicit_forward(model, FAMILY_IDS)


def _gradient_x_input_of_modified_network(model, ids, positions, token_ids, mode):
    """The rules as gradient × input of a modified float64 network, with autograd (test only;
    the reference itself uses none): norms with 1/rms detached, activation with act(x)/x
    detached, each product's factors getting half the gradient (uniform rule), the plain
    softmax gradient, and in cp-lrp the attention probabilities (and routing weights) detached.
    Same masks, cos/sin, embedding values and (split) weight matrices as the reference's forward
    (those are checked against HF above).  Mixture of experts as transformers computes it:
    softmax over all experts, top-k, renormalised by the chosen ones' sum where the config says,
    each expert's output times its routing weight (uniform rule), summed."""
    F = torch.nn.functional
    cfg = model.config
    gemma = cfg.model_type == "gemma3_text"
    fw = explicit_forward(model, ids)
    T, H, KV, D, n_rep, scale = fw["T"], fw["H"], fw["KV"], fw["D"], fw["n_rep"], fw["scale"]

    def norm(x, n):
        w = 1 + n.weight.detach().double() if gemma else n.weight.detach().double()
        eps = getattr(n, "variance_epsilon", getattr(n, "eps", None))
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps).detach() * w

    def lin(x, w, b):
        return x @ w.T if b is None else x @ w.T + b

    def half(a, b, op):  # value op(a, b); each factor gets half the gradient
        return 0.5 * op(a, b.detach()) + 0.5 * op(a.detach(), b)

    act = (lambda t: F.gelu(t, approximate="tanh")) if gemma else F.silu

    def gated(x, wg, wu):  # act(g) * u with act identity and the uniform rule on the product
        g, u = x @ wg.transpose(-1, -2), x @ wu.transpose(-1, -2)
        return half(g * (act(g) / g).detach(), u, torch.mul)

    def moe_block(x, c):
        wts, idx = c["moe"]["weights"], c["moe"]["idx"]
        p = torch.softmax(x @ wts["router"].T, dim=-1)
        top = torch.gather(p, 1, idx)  # same choice of experts as the reference (and HF)
        w = top / top.sum(-1, keepdim=True) if wts["norm_topk"] else top
        if mode == "cp-lrp":
            w = w.detach()
        xs = x[:, None, None, :]  # (T, 1, 1, hidden) against (T, K, I, hidden)
        m = gated(xs, wts["gate"][idx], wts["up"][idx])  # (T, K, 1, I)
        eo = (m @ wts["down"][idx].transpose(-1, -2))[:, :, 0, :]  # (T, K, hidden)
        prod = eo * w[..., None] if mode == "cp-lrp" else half(eo, w[..., None], torch.mul)
        return prod.sum(1)

    emb = fw["embedding"].clone().requires_grad_(True)
    x, leaves = emb, []
    for li, layer in enumerate(model.model.layers):
        c, at = fw["layers"][li], layer.self_attn
        W, B, rd = c["W"], c["B"], c["rotary_dim"]
        cos = c["cos"].clone().requires_grad_(True)
        sin = c["sin"].clone().requires_grad_(True)
        leaves.append((cos, sin))
        n1 = norm(x, layer.input_layernorm)
        q = lin(n1, W["q"], B["q"]).view(T, H, D).transpose(0, 1)
        k = lin(n1, W["k"], B["k"]).view(T, KV, D).transpose(0, 1)
        v = lin(n1, W["v"], B["v"]).view(T, KV, D).transpose(0, 1).repeat_interleave(n_rep, 0)
        if getattr(at, "q_norm", None) is not None:
            q, k = norm(q, at.q_norm), norm(k, at.k_norm)

        def rope(t):  # the first rd dims rotate, the rest pass
            r, rest = t[..., :rd], t[..., rd:]
            rot = torch.cat((-r[..., rd // 2:], r[..., : rd // 2]), -1)
            if mode == "pa-lrp":
                return torch.cat((half(r, cos, torch.mul) + half(rot, sin, torch.mul), rest), -1)
            return torch.cat((r * cos.detach() + rot * sin.detach(), rest), -1)

        qr, kr = rope(q), rope(k).repeat_interleave(n_rep, 0)
        raw = half(qr, kr, lambda a, b: a @ b.transpose(1, 2)) * scale
        s = torch.softmax(raw.masked_fill(~c["mask"], float("-inf")), -1)
        o = s.detach() @ v if mode == "cp-lrp" else half(s, v, torch.matmul)
        a = lin(o.transpose(0, 1).reshape(T, H * D), W["o"], B["o"])
        sandwich = hasattr(layer, "pre_feedforward_layernorm")
        if sandwich:
            a = norm(a, layer.post_attention_layernorm)
        h = x + a
        n2 = norm(h, layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm)
        if "moe" in c:
            f = moe_block(n2, c)
        else:
            g, u = lin(n2, W["g"], B["g"]), lin(n2, W["u"], B["u"])
            f = lin(half(g * (act(g) / g).detach(), u, torch.mul), W["d"], B["d"])
        if sandwich:
            f = norm(f, layer.post_feedforward_layernorm)
        x = h + f
    logits = norm(x, model.model.norm) @ model.lm_head.weight.detach().double().T
    sum(logits[p, t] for p, t in zip(positions, token_ids)).backward()

    def rel(leaf):
        return (leaf * leaf.grad).sum(-1).detach() if leaf.grad is not None else torch.zeros(T, dtype=torch.float64)

    return ((emb * emb.grad).sum(-1).detach(), torch.stack([rel(cs[0]) for cs in leaves]),
            torch.stack([rel(cs[1]) for cs in leaves]))


# the new families where their new parts matter: positional relevance through partial / scaled
# rotary tables (pa-lrp), the router rule (attnlrp) and constant routing weights (cp-lrp)
_NEW_RULE_CASES = [("phi3", "pa-lrp"), ("phi3_longrope", "pa-lrp"), ("qwen3_yarn", "pa-lrp"),
                   ("qwen3_moe", "pa-lrp"), ("qwen3_moe", "attnlrp"), ("qwen3_moe", "cp-lrp"),
                   ("mixtral", "attnlrp")]


@pytest.mark.parametrize("family,mode", [(f, m) for f in FAMILIES for m in MODES] + _NEW_RULE_CASES)
def test_family_rules_equal_gradient_x_input_of_the_modified_network(family, mode):
    model = _family_model(family)
    positions, token_ids = [len(FAMILY_IDS) - 1, 17], [5, 9]
    out = explicit_relevance(model, FAMILY_IDS, positions, token_ids, mode=mode)
    token, cos, sin = _gradient_x_input_of_modified_network(model, FAMILY_IDS, positions, token_ids, mode)

    def rel_l2(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    assert rel_l2(out["token_relevance"], token) < 1e-7  # EPS = 1e-12 makes ~1e-10
    if mode == "pa-lrp":
        assert rel_l2(out["positional_cos"], cos) < 1e-7 and rel_l2(out["positional_sin"], sin) < 1e-7
    else:
        assert float(cos.abs().sum() + sin.abs().sum()) == 0.0


def test_longrope_takes_the_long_factors_past_the_original_length():
    """Phi-3 LongRoPE: short factors up to original_max_position_embeddings (32) tokens, long
    ones past it, attention factor sqrt(1 + ln(512/32) / ln 32); the reference follows HF."""
    import math

    model = _family_model("phi3_longrope")
    factors = []
    for n in (20, 40):
        ids = torch.randint(3, 101, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        with torch.no_grad():
            hf_logits = model(torch.tensor([ids])).logits[0].double()
        fw = explicit_forward(model, ids)
        assert torch.allclose(fw["logits"], hf_logits, atol=1e-4, rtol=1e-4)
        inv_freq, factor = rope_tables(model.config, seq_len=n)
        assert torch.equal(inv_freq, model.model.rotary_emb.inv_freq)
        factors.append(inv_freq)
    base = 1.0 / (10_000.0 ** (torch.arange(0, 12, 2, dtype=torch.float) / 12))
    assert torch.allclose(factors[0] * torch.tensor([1.0, 1.1, 1.3, 1.6, 2.0, 2.5]), base)
    assert torch.allclose(factors[1] * torch.tensor([1.0, 1.5, 2.5, 4.0, 6.0, 9.0]), base)
    assert factor == pytest.approx(math.sqrt(1 + math.log(16) / math.log(32)), rel=1e-12)


def test_attnlrp_equals_lxt_main_on_qwen3_moe():
    """LXT main's efficient AttnLRP with its qwen3_moe rules (stored by
    references/lxt_main_moe.py, with the LXT commit) on the tiny Qwen3-MoE: the reference's
    attnlrp token relevance equals it (both float64; measured 2e-7 of the largest relevance,
    LXT's forward computes cos/sin in float32)."""
    import json
    from pathlib import Path

    art = json.loads((Path(__file__).parent / "artifacts" / "lxt_main_qwen3_moe.json").read_text())
    assert len(art["lxt_commit"]) == 40 and art["model"]["family"] == "qwen3_moe"
    ids = art["input_ids"]
    assert ids == torch.randint(3, 101, (len(ids),), generator=torch.Generator().manual_seed(11)).tolist()
    model = _tiny_family_model("qwen3_moe", seed=art["model"]["seed"])
    for case in art["cases"]:
        out = explicit_relevance(model, ids, [case["target_position"]], [case["target_token_id"]],
                                 mode="attnlrp")
        assert out["target_logit"] == pytest.approx(case["target_logit"], rel=1e-5)
        lxt = torch.tensor(case["lxt_relevance"], dtype=torch.float64)
        ref = out["token_relevance"]
        assert float((ref - lxt).abs().max()) <= 1e-5 * float(ref.abs().max())
        assert float(out["router_absorbed"].abs().sum()) > 0
