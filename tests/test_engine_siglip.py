"""SigLIP through the block engine: both towers against Hugging Face, and the image–text
similarity on both sides (the image side through the attention-pooling head) against an
independent float64 autograd implementation of the same rules, with conservation. Random
weights of a small ``SiglipModel`` (no SigLIP weights ship offline)."""

from __future__ import annotations

import pytest
import torch

from tiny_vision import fold_positions
from vllm_pelrp.engine.driver import relevance, run_forward
from vllm_pelrp.models.siglip import (
    image_embedding,
    siglip_from_hf,
    siglip_similarity_seeds,
    text_embedding,
)

IDS = torch.tensor([3, 17, 8, 30, 22, 5])


@pytest.fixture(scope="module")
def siglip():
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    config = SiglipConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, vocab_size=50, max_position_embeddings=6),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, image_size=16, patch_size=8))
    model = SiglipModel(config).eval()
    with torch.no_grad():  # larger than HF's initialisation, so every part carries relevance
        for name, parameter in model.named_parameters():
            if "embedding" in name or "probe" in name:
                parameter.normal_(0, 0.5)
    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))
    return model, siglip_from_hf(model), image


def _halve(t):
    return 0.5 * t + 0.5 * t.detach()


def _layer_norm(double, x, name, eps):
    mean = x.mean(-1, keepdim=True)
    std = ((x - mean).pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return (x - mean) / std.detach() * double[f"{name}.weight"] + double[f"{name}.bias"]


def _linear(double, x, name):
    return x @ double[f"{name}.weight"].T + double[f"{name}.bias"]


def _act(x):  # GELU-tanh by the identity rule
    return x * (torch.nn.functional.gelu(x, approximate="tanh") / x).detach()


def _attend(q, k, v, mode="pa-lrp"):  # (h, Tq, d), (h, T, d): the rules as autograd
    probs = torch.softmax(_halve(q @ k.transpose(1, 2)) / q.shape[-1] ** 0.5, -1)
    return probs.detach() @ v if mode == "cp-lrp" else _halve(probs @ v)


def _tower(double, prefix, config, x, mode="pa-lrp"):
    heads, eps = config.num_attention_heads, config.layer_norm_eps
    for index in range(config.num_hidden_layers):
        at = f"{prefix}.encoder.layers.{index}"
        h = _layer_norm(double, x, f"{at}.layer_norm1", eps)
        q, k, v = (_linear(double, h, f"{at}.self_attn.{n}").view(len(h), heads, -1).transpose(0, 1)
                   for n in ("q_proj", "k_proj", "v_proj"))
        attended = _attend(q, k, v, mode).transpose(0, 1).reshape(len(h), -1)
        x = x + _linear(double, attended, f"{at}.self_attn.out_proj")
        up = _linear(double, _layer_norm(double, x, f"{at}.layer_norm2", eps), f"{at}.mlp.fc1")
        x = x + _linear(double, _act(up), f"{at}.mlp.fc2")
    return x


def _reference(model, image, ids, mode="pa-lrp"):
    """Both sides' relevance of the cosine, float64 autograd on the rules (cp-lrp: the
    attention probabilities detached, the pooling head's too); outside pa-lrp the positions'
    relevance is folded into their tokens'."""
    config = model.config
    vc, tc = config.vision_config, config.text_config
    double = {name: p.detach().double() for name, p in model.named_parameters()}
    pixels = image.double().requires_grad_(True)
    table = double["vision_model.embeddings.position_embedding.weight"].clone().requires_grad_(True)
    conv = torch.nn.functional.conv2d(pixels[None],
                                      double["vision_model.embeddings.patch_embedding.weight"],
                                      double["vision_model.embeddings.patch_embedding.bias"],
                                      stride=vc.patch_size)
    x = _tower(double, "vision_model", vc, conv.flatten(2)[0].T + table, mode)
    x = _layer_norm(double, x, "vision_model.post_layernorm", vc.layer_norm_eps)
    heads = vc.num_attention_heads
    w, b = double["vision_model.head.attention.in_proj_weight"], \
        double["vision_model.head.attention.in_proj_bias"]
    (wq, wk, wv), (bq, bk, bv) = w.chunk(3), b.chunk(3)
    probe = double["vision_model.head.probe"].reshape(1, -1)
    q = (probe @ wq.T + bq).view(1, heads, -1).transpose(0, 1)
    k = (x @ wk.T + bk).view(len(x), heads, -1).transpose(0, 1)
    v = (x @ wv.T + bv).view(len(x), heads, -1).transpose(0, 1)
    r = _linear(double, _attend(q, k, v, mode).transpose(0, 1).reshape(1, -1),
                "vision_model.head.attention.out_proj")
    up = _linear(double, _layer_norm(double, r, "vision_model.head.layernorm", vc.layer_norm_eps),
                 "vision_model.head.mlp.fc1")
    a = (r + _linear(double, _act(up), "vision_model.head.mlp.fc2"))[0]
    words = double["text_model.embeddings.token_embedding.weight"][ids].clone().requires_grad_(True)
    places = double["text_model.embeddings.position_embedding.weight"][:len(ids)].clone()
    places.requires_grad_(True)
    y = _tower(double, "text_model", tc, words + places, mode)
    y = _layer_norm(double, y, "text_model.final_layer_norm", tc.layer_norm_eps)
    text = _linear(double, y[-1], "text_model.head")
    cosine = (a * text).sum() / (a.norm() * text.norm()).detach()
    _halve(cosine).backward()
    out = {"cosine": float(cosine.detach()),
           "image_token": (pixels * pixels.grad).detach().unfold(1, 8, 8).unfold(2, 8, 8)
           .sum((0, 3, 4)).flatten(),
           "image_position": (table * table.grad).sum(-1).detach(),
           "text_token": (words * words.grad).sum(-1).detach(),
           "text_position": (places * places.grad).sum(-1).detach()}
    return fold_positions(out, ("image", "text"), mode)


def _relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_both_towers_equal_hf(siglip):
    model, blocks, image = siglip
    with torch.no_grad():
        out = model(input_ids=IDS[None], pixel_values=image[None])
    a = torch.nn.functional.normalize(image_embedding(blocks, run_forward(blocks.vision, image)),
                                      dim=0)
    b = torch.nn.functional.normalize(text_embedding(blocks, run_forward(blocks.text, IDS)), dim=0)
    assert (a - out.image_embeds[0]).abs().max() < 1e-5
    assert (b - out.text_embeds[0]).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["pa-lrp", "attnlrp", "cp-lrp"])
def test_similarity_on_both_sides_equals_float64_autograd_and_conserves(siglip, mode):
    model, blocks, image = siglip
    image_forward, text_forward = run_forward(blocks.vision, image), run_forward(blocks.text, IDS)
    seeds = siglip_similarity_seeds(blocks, image_forward, text_forward, mode)
    reference = _reference(model, image, IDS, mode)
    assert seeds.cosine == pytest.approx(reference["cosine"], abs=1e-5)
    for side, model_blocks, forward, seed in (("image", blocks.vision, image_forward, seeds.image),
                                              ("text", blocks.text, text_forward, seeds.text)):
        result = relevance(model_blocks, forward.layer_inputs, forward.positions, seed, mode,
                           forward=forward)
        assert float(result.target_logit[0]) == pytest.approx(seeds.cosine / 2, rel=1e-5)
        assert _relative(result.token[0], reference[f"{side}_token"]) < 1e-4, side
        assert _relative(result.position_embedding[0], reference[f"{side}_position"]) < 1e-4, side
        assert (result.position_embedding.abs().sum() > 0) == (mode == "pa-lrp")
        total = result.input_relevance + result.absorbed
        assert torch.allclose(total, result.target_logit, rtol=1e-4, atol=1e-6), side
