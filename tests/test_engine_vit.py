"""A ViT through the block engine (a new embedding block, ``PatchEmbedding``; everything else is
the blocks the encoders use): the forward against Hugging Face, the relevance against an
independent float64 autograd implementation of the same rules, conservation, and the patch grid.
Random weights of a small ``ViTForImageClassification`` (no ViT weights ship offline)."""

from __future__ import annotations

import pytest
import torch

from vllm_pelrp.engine.driver import relevance, run_forward
from vllm_pelrp.models.vit import classifier_logits, vit_from_hf, vit_seed

MODES = ("pa-lrp", "attnlrp", "cp-lrp")


@pytest.fixture(scope="module")
def vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, image_size=(24, 16), patch_size=8, num_channels=3,
                       num_labels=5, layer_norm_eps=1e-6)
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():  # HF initialises the class token and position table to ~0
        model.vit.embeddings.cls_token.normal_(0, 0.5)
        model.vit.embeddings.position_embeddings.normal_(0, 0.5)
    image = torch.randn(3, 24, 16, generator=torch.Generator().manual_seed(1))
    return model, vit_from_hf(model), image


def _reference(model, image: torch.Tensor, label: int, mode: str, prefix: str = "vit"
               ) -> dict[str, torch.Tensor]:
    """The rules as autograd on a float64 copy of HF's computation (LXT's efficient AttnLRP):
    LayerNorm with σ detached, GELU by x·(gelu(x)/x) detached, the uniform rule on Q·Kᵀ and
    A·V by halving their gradient (cp-lrp: A detached), the softmax by its plain gradient;
    relevance = input ⊙ gradient at the pixels, the class token and the position table."""
    double = {name: p.detach().double() for name, p in model.named_parameters()}
    config = model.config

    def halve(t):
        return 0.5 * t + 0.5 * t.detach()

    def layer_norm(x, prefix):
        mean = x.mean(-1, keepdim=True)
        std = ((x - mean).pow(2).mean(-1, keepdim=True) + config.layer_norm_eps).sqrt()
        return (x - mean) / std.detach() * double[f"{prefix}.weight"] + double[f"{prefix}.bias"]

    def linear(x, prefix):
        return x @ double[f"{prefix}.weight"].T + double[f"{prefix}.bias"]

    pixels = image.double().requires_grad_(True)
    names = ["cls_token"] + (["distillation_token"] if prefix == "deit" else [])
    tokens = [double[f"{prefix}.embeddings.{name}"].reshape(-1).clone().requires_grad_(True)
              for name in names]
    table = double[f"{prefix}.embeddings.position_embeddings"][0].clone().requires_grad_(True)
    conv = torch.nn.functional.conv2d(pixels[None],
                                      double[f"{prefix}.embeddings.patch_embeddings.projection.weight"],
                                      double[f"{prefix}.embeddings.patch_embeddings.projection.bias"],
                                      stride=config.patch_size)
    x = torch.cat([torch.stack(tokens), conv.flatten(2)[0].T]) + table
    heads = config.num_attention_heads
    for index in range(config.num_hidden_layers):
        at = f"{prefix}.layers.{index}"
        h = layer_norm(x, f"{at}.layernorm_before")
        q, k, v = (linear(h, f"{at}.attention.{name}").view(len(h), heads, -1).transpose(0, 1)
                   for name in ("q_proj", "k_proj", "v_proj"))
        scores = halve(q @ k.transpose(1, 2)) / q.shape[-1] ** 0.5
        probs = torch.softmax(scores, -1)
        attended = probs.detach() @ v if mode == "cp-lrp" else halve(probs @ v)
        x = x + linear(attended.transpose(0, 1).reshape(len(h), -1), f"{at}.attention.o_proj")
        up = linear(layer_norm(x, f"{at}.layernorm_after"), f"{at}.mlp.fc1")
        act = up * (torch.nn.functional.gelu(up) / up).detach()
        x = x + linear(act, f"{at}.mlp.fc2")
    final = layer_norm(x, f"{prefix}.layernorm")
    heads = [(0, "classifier")] if prefix == "vit" else [(0, "cls_classifier"),
                                                          (1, "distillation_classifier")]
    logit = sum(final[token] @ double[f"{name}.weight"][label] + double[f"{name}.bias"][label]
                for token, name in heads) / len(heads)
    logit.backward()
    patch = config.patch_size
    pixel = (pixels * pixels.grad).detach()
    patches = pixel.unfold(1, patch, patch).unfold(2, patch, patch).sum((0, 3, 4)).flatten()
    token = torch.cat([torch.stack([(t * t.grad).sum() for t in tokens]), patches])
    position = (table * table.grad).sum(-1)
    if mode != "pa-lrp":
        token, position = token + position, torch.zeros_like(position)
    return {"logit": logit.detach(), "token": token.detach(), "position": position.detach(),
            "pixel": pixel}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_forward_equals_hf(vit):
    model, vision, image = vit
    forward = run_forward(vision.blocks, image)
    with torch.no_grad():
        expected = model(pixel_values=image[None]).logits[0]
    assert (classifier_logits(vision, forward.final_hidden) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_relevance_equals_float64_autograd_on_the_rules_and_conserves(vit, mode):
    model, vision, image = vit
    forward = run_forward(vision.blocks, image)
    label = 3
    seed = vit_seed(vision, forward.final_hidden, {"label": label})
    result = relevance(vision.blocks, forward.layer_inputs, forward.positions, seed, mode,
                       forward=forward)
    reference = _reference(model, image, label, mode)
    assert float(result.target_logit[0]) == pytest.approx(float(reference["logit"]), rel=1e-5)
    assert _relative(result.token[0], reference["token"]) < 1e-4
    assert _relative(result.pixel[0], reference["pixel"]) < 1e-4
    if mode == "pa-lrp":
        assert _relative(result.position_embedding[0], reference["position"]) < 1e-4
    else:
        assert result.position_embedding.abs().max() == 0
    if mode == "pa-lrp":  # a patch's relevance is the sum of its pixels'
        cls, grid = vision.embedding.grid(result.token[0])
        pooled = torch.nn.functional.avg_pool2d(result.pixel[0].sum(0)[None], 8)[0] * 64
        assert torch.allclose(grid, pooled, rtol=1e-4, atol=1e-7)
    # conservation, the softmax's and the biases' shares booked apart
    total = result.input_relevance + result.absorbed
    assert torch.allclose(total, result.target_logit, rtol=1e-4, atol=1e-5)
    if mode == "cp-lrp":
        assert result.softmax_absorbed.abs().max() == 0


def test_pa_lrp_splits_what_attnlrp_gives_the_patch(vit):
    _, vision, image = vit
    forward = run_forward(vision.blocks, image)
    seed = vit_seed(vision, forward.final_hidden, {"dimension": 7})
    pa = relevance(vision.blocks, forward.layer_inputs, forward.positions, seed, "pa-lrp",
                   forward=forward)
    attn = relevance(vision.blocks, forward.layer_inputs, forward.positions, seed, "attnlrp",
                     forward=forward)
    assert torch.allclose(pa.token + pa.position_embedding, attn.token, rtol=1e-5, atol=1e-6)
    assert pa.position_embedding.abs().sum() > 0
    cls, grid = vision.embedding.grid(pa.position_embedding[0])
    assert grid.shape == (3, 2) and cls.shape == ()


def test_mean_pooling_dimension_equals_hf_and_conserves(vit):
    """{'mean_dimension': k}: the patch tokens' mean of HF's last_hidden_state (BEiT's and MAE's
    pooling), 1/N at each patch; the prefix tokens get relevance only through attention."""
    model, vision, image = vit
    with torch.no_grad():
        hidden = model.vit(pixel_values=image[None]).last_hidden_state[0]
    expected = hidden[1:].mean(0)[7]
    forward = run_forward(vision.blocks, image)
    seed = vit_seed(vision, forward.final_hidden, {"mean_dimension": 7})
    result = relevance(vision.blocks, forward.layer_inputs, forward.positions, seed, "pa-lrp",
                       forward=forward)
    assert float(result.target_logit[0]) == pytest.approx(float(expected), abs=1e-5)
    total = result.input_relevance + result.absorbed
    assert torch.allclose(total, result.target_logit, rtol=1e-4, atol=1e-5)


def test_bad_inputs_name_what_is_allowed(vit):
    _, vision, image = vit
    with pytest.raises(ValueError, match=r"this model takes \(3, 24, 16\).*not interpolated"):
        run_forward(vision.blocks, torch.zeros(3, 32, 32))
    hidden = run_forward(vision.blocks, image).final_hidden
    with pytest.raises(ValueError, match="label 5 is out of range: allowed 0 to 4"):
        vit_seed(vision, hidden, {"label": 5})
    with pytest.raises(ValueError, match=r"allowed: \{'label': i\}"):
        vit_seed(vision, hidden, {"similarity": 1})


def test_cp_lrp_equals_lxt_main_torchvision_vit_rules():
    """Our cp-lrp (fp32) on a ViT whose weights map one to one onto torchvision's layout equals
    LXT main's torchvision-ViT rules (``cp_LRP``, LRP-0 on conv and linear layers; float64,
    stored with its commit in tests/artifacts/lxt_main_vit_cp.json by
    references/lxt_main_vit.py), at every pixel; plain gradient×input differs from both."""
    import json
    from pathlib import Path

    from tiny_vision import hf_vit, image, torchvision_vit

    art = json.loads((Path(__file__).parent / "artifacts" / "lxt_main_vit_cp.json").read_text())
    model = hf_vit(art["seed"])
    vision = vit_from_hf(model)
    pixels = image()
    forward = run_forward(vision.blocks, pixels)
    with torch.no_grad():
        assert (classifier_logits(vision, forward.final_hidden)
                - torchvision_vit(art["seed"])(pixels[None])[0]).abs().max() < 1e-5
    seed = vit_seed(vision, forward.final_hidden, {"label": art["label"]})
    result = relevance(vision.blocks, forward.layer_inputs, forward.positions, seed, "cp-lrp",
                       forward=forward)
    lxt = torch.tensor(art["pixel_relevance"], dtype=torch.float64)
    assert float(result.target_logit[0]) == pytest.approx(art["logit"], rel=1e-5)
    assert _relative(result.pixel[0], lxt) < 1e-5
    plain = pixels.clone().requires_grad_(True)
    model(pixel_values=plain[None]).logits[0, art["label"]].backward()
    assert _relative((plain * plain.grad).detach(), lxt) > 1e-2  # the rules are not the plain gradient


def test_deit_with_its_distillation_token_and_teacher_head():
    """DeiT: a distillation token after the class token, and the mean of two classifiers (one
    on each): its logits equal HF's, its relevance the float64 autograd reference in every mode,
    both prefix tokens' relevance apart from the patches'."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    from vllm_pelrp.image_explanation import ImageTarget, build_image_explanation

    torch.manual_seed(0)
    model = DeiTForImageClassificationWithTeacher(DeiTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=8, num_labels=4, layer_norm_eps=1e-6)).eval()
    with torch.no_grad():
        for name in ("cls_token", "distillation_token", "position_embeddings"):
            getattr(model.deit.embeddings, name).normal_(0, 0.5)
    vision = vit_from_hf(model)
    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(2))
    forward = run_forward(vision.blocks, image)
    with torch.no_grad():
        expected = model(pixel_values=image[None]).logits[0]
    assert (classifier_logits(vision, forward.final_hidden) - expected).abs().max() < 1e-5
    for mode in MODES:
        seed = vit_seed(vision, forward.final_hidden, {"label": 1})
        result = relevance(vision.blocks, forward.layer_inputs, forward.positions, seed, mode,
                           forward=forward)
        reference = _reference(model, image, 1, mode, prefix="deit")
        assert _relative(result.token[0], reference["token"]) < 1e-4, mode
        assert _relative(result.pixel[0], reference["pixel"]) < 1e-4, mode
        total = result.input_relevance + result.absorbed
        assert torch.allclose(total, result.target_logit, rtol=1e-4, atol=1e-6), mode
    explanation = build_image_explanation(
        result, vision.embedding, model="deit", mode="cp-lrp",
        target=ImageTarget(kind="label", index=1, value=float(expected[1]), description="label 1"))
    assert explanation.distillation_token_relevance == pytest.approx(float(result.token[0, 1]))
    assert explanation.patch_relevance.rows == 2 and explanation.patch_relevance.columns == 2
