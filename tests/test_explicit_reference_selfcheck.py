"""Self-check of the slow explicit LRP reference (tests/explicit_reference.py) on a tiny random LLaMA."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

try:
    from explicit_reference import MODES, explicit_forward, explicit_relevance, rope_inv_freq
except ImportError:  # pragma: no cover - depends on how pytest sets sys.path
    from tests.explicit_reference import MODES, explicit_forward, explicit_relevance, rope_inv_freq

REL = 1e-6
INPUT_IDS = [1, 17, 42, 5, 99, 63, 8, 23, 71, 3, 54, 30]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(1234)
    cfg = LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=0.1,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )
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
