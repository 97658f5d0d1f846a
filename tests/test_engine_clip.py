"""CLIP through the block engine: both towers against Hugging Face, and the image–text
similarity explained on both sides against an independent float64 autograd implementation of
the same rules, with conservation (each side half the cosine). Random weights of a small
``CLIPModel`` (no CLIP weights ship offline)."""

from __future__ import annotations

import pytest
import torch

from tiny_vision import fold_positions
from vllm_pelrp.engine.driver import relevance, run_forward
from vllm_pelrp.models.clip import (
    clip_from_hf,
    clip_similarity_seeds,
    image_embedding,
    text_embedding,
)

EOS = 49
IDS = torch.tensor([3, 17, 8, 30, 22, EOS, 5])  # HF pools at the first end-of-text token


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, vocab_size=50, max_position_embeddings=16,
                         eos_token_id=EOS, bos_token_id=1, pad_token_id=0),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, image_size=16, patch_size=8),
        projection_dim=8)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # larger than HF's initialisation, so every part carries relevance
        for name, parameter in model.named_parameters():
            if "embedding" in name or "projection" in name:
                parameter.normal_(0, 0.5)
    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))
    return model, clip_from_hf(model), image


def _tower(double, prefix, config, x, causal, mode="pa-lrp"):
    """One tower's layers as autograd on the rules (LXT's efficient AttnLRP, float64; cp-lrp:
    the attention probabilities detached)."""
    def halve(t):
        return 0.5 * t + 0.5 * t.detach()

    def layer_norm(x, name):
        mean = x.mean(-1, keepdim=True)
        std = ((x - mean).pow(2).mean(-1, keepdim=True) + config.layer_norm_eps).sqrt()
        return (x - mean) / std.detach() * double[f"{name}.weight"] + double[f"{name}.bias"]

    def linear(x, name):
        return x @ double[f"{name}.weight"].T + double[f"{name}.bias"]

    heads = config.num_attention_heads
    length = len(x)
    mask = torch.triu(torch.full((length, length), float("-inf"), dtype=torch.float64), 1)
    for index in range(config.num_hidden_layers):
        at = f"{prefix}.encoder.layers.{index}"
        h = layer_norm(x, f"{at}.layer_norm1")
        q, k, v = (linear(h, f"{at}.self_attn.{name}").view(length, heads, -1).transpose(0, 1)
                   for name in ("q_proj", "k_proj", "v_proj"))
        scores = halve(q @ k.transpose(1, 2)) / q.shape[-1] ** 0.5
        probs = torch.softmax(scores + mask if causal else scores, -1)
        attended = probs.detach() @ v if mode == "cp-lrp" else halve(probs @ v)
        x = x + linear(attended.transpose(0, 1).reshape(length, -1), f"{at}.self_attn.out_proj")
        up = linear(layer_norm(x, f"{at}.layer_norm2"), f"{at}.mlp.fc1")
        act = up * torch.sigmoid(1.702 * up).detach()  # quick GELU, identity rule
        x = x + linear(act, f"{at}.mlp.fc2")
    return x, layer_norm


def _reference(model, image, ids, mode="pa-lrp"):
    """Both sides' relevance of the cosine, float64 autograd on the rules; outside pa-lrp the
    positions' relevance is folded into their tokens' (the tables are not split off)."""
    config = model.config
    double = {name: p.detach().double() for name, p in model.named_parameters()}
    pixels = image.double().requires_grad_(True)
    cls = double["vision_model.embeddings.class_embedding"].clone().requires_grad_(True)
    table = double["vision_model.embeddings.position_embedding.weight"].clone().requires_grad_(True)
    conv = torch.nn.functional.conv2d(pixels[None],
                                      double["vision_model.embeddings.patch_embedding.weight"],
                                      stride=config.vision_config.patch_size)
    x = torch.cat([cls[None], conv.flatten(2)[0].T]) + table
    mean = x.mean(-1, keepdim=True)
    std = ((x - mean).pow(2).mean(-1, keepdim=True) + config.vision_config.layer_norm_eps).sqrt()
    x = ((x - mean) / std.detach() * double["vision_model.pre_layrnorm.weight"]
         + double["vision_model.pre_layrnorm.bias"])
    x, layer_norm = _tower(double, "vision_model", config.vision_config, x, causal=False,
                           mode=mode)
    a = layer_norm(x, "vision_model.post_layernorm")[0] @ double["visual_projection.weight"].T
    words = double["text_model.embeddings.token_embedding.weight"][ids].clone().requires_grad_(True)
    places = double["text_model.embeddings.position_embedding.weight"][:len(ids)].clone()
    places.requires_grad_(True)
    y, layer_norm = _tower(double, "text_model", config.text_config, words + places, causal=True,
                           mode=mode)
    position = int((ids == EOS).nonzero()[0, 0])
    b = layer_norm(y, "text_model.final_layer_norm")[position] @ double["text_projection.weight"].T
    dot = (a * b).sum()
    cosine = dot / (a.norm() * b.norm()).detach()
    (0.5 * cosine + 0.5 * cosine.detach()).backward()  # the uniform rule on a·b
    patches = (pixels * pixels.grad).detach().unfold(1, 8, 8).unfold(2, 8, 8).sum((0, 3, 4))
    out = {"cosine": float(cosine.detach()),
           "image_token": torch.cat([(cls * cls.grad).sum().reshape(1), patches.flatten()]).detach(),
           "image_position": (table * table.grad).sum(-1).detach(),
           "text_token": (words * words.grad).sum(-1).detach(),
           "text_position": (places * places.grad).sum(-1).detach()}
    return fold_positions(out, ("image", "text"), mode)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_both_towers_equal_hf(clip):
    model, blocks, image = clip
    with torch.no_grad():
        out = model(input_ids=IDS[None], pixel_values=image[None])
    image_forward, text_forward = run_forward(blocks.vision, image), run_forward(blocks.text, IDS)
    a = torch.nn.functional.normalize(image_embedding(blocks, image_forward), dim=0)
    b = torch.nn.functional.normalize(text_embedding(blocks, text_forward, IDS), dim=0)
    assert (a - out.image_embeds[0]).abs().max() < 1e-5
    assert (b - out.text_embeds[0]).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["pa-lrp", "attnlrp", "cp-lrp"])
def test_similarity_on_both_sides_equals_float64_autograd_and_conserves(clip, mode):
    model, blocks, image = clip
    image_forward, text_forward = run_forward(blocks.vision, image), run_forward(blocks.text, IDS)
    seeds = clip_similarity_seeds(blocks, image_forward, text_forward, IDS)
    sides = {side: relevance(model_blocks, forward.layer_inputs, forward.positions, seed,
                             mode, forward=forward)
             for side, model_blocks, forward, seed in (
                 ("image", blocks.vision, image_forward, seeds.image),
                 ("text", blocks.text, text_forward, seeds.text))}
    reference = _reference(model, image, IDS, mode)
    assert seeds.cosine == pytest.approx(reference["cosine"], abs=1e-5)
    for side, result in sides.items():
        assert float(result.target_logit[0]) == pytest.approx(seeds.cosine / 2, rel=1e-5)
        assert _relative(result.token[0], reference[f"{side}_token"]) < 1e-4, side
        assert _relative(result.position_embedding[0], reference[f"{side}_position"]) < 1e-4, side
        total = result.input_relevance + result.absorbed
        assert torch.allclose(total, result.target_logit, rtol=1e-4, atol=1e-6), side


def test_the_vision_model_alone_equals_the_image_tower(clip):
    from transformers import CLIPVisionModel

    model, blocks, image = clip
    alone = CLIPVisionModel(model.config.vision_config).eval()
    alone.load_state_dict(model.vision_model.state_dict())
    vision = clip_from_hf(alone)
    assert vision.text is None
    with torch.no_grad():
        pooled = alone(pixel_values=image[None]).pooler_output[0]
    assert (run_forward(vision.vision, image).final_hidden[0] - pooled).abs().max() < 1e-5
