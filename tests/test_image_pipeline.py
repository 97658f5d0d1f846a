"""The image–text pipeline (``image_pipeline.explain_image``): what the worker serves, offline.
Its wire explanation carries the float64 references' numbers (``test_engine_clip``,
``test_engine_siglip``) on both sides; a dimension target conserves and equals Hugging Face's
embedding; the blocks built from vLLM's parameter names (fused ``qkv_proj``, padded tables)
give the same explanation as Hugging Face's; bad jobs are refused, naming what is allowed;
``pelrp explain-image`` writes what the pipeline gives, as JSON, PNG and HTML, for CLIP and
for a ViT classifier.
Random weights of small models: no CLIP or SigLIP weights ship offline."""

from __future__ import annotations

import pytest
import torch

from test_engine_clip import IDS as CLIP_IDS
from test_engine_clip import _reference as clip_reference
from test_engine_clip import clip  # noqa: F401 - fixture
from test_engine_siglip import IDS as SIGLIP_IDS
from test_engine_siglip import _reference as siglip_reference
from test_engine_siglip import siglip  # noqa: F401 - fixture
from vllm_pelrp.image_pipeline import ImageInputError, ImageJob, ImageModel, explain_image
from vllm_pelrp.pipeline import Float32Array


def _job(image, target, ids=None, mode="pa-lrp") -> ImageJob:
    tokens = None if ids is None else [f"t{int(i)}" for i in ids]
    return ImageJob(pixels=Float32Array.from_tensor(image), target=target, text_tokens=tokens,
                    mode=mode)


def _relative(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _served_names(model, pad_rows: int = 64) -> dict[str, torch.Tensor]:
    """The parameters as vLLM's embedding model holds them: q/k/v fused into ``qkv_proj`` and
    the text tables padded with rows (as ``VocabParallelEmbedding`` does)."""
    state = {name: t.detach().clone() for name, t in model.state_dict().items()
             if not name.endswith("position_ids") and name != "logit_scale"
             and name != "logit_bias"}
    served = {}
    for name, tensor in state.items():
        if ".q_proj." in name:
            parts = [state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            served[name.replace("q_proj", "qkv_proj")] = torch.cat(parts)
        elif ".k_proj." in name or ".v_proj." in name:
            continue
        elif name.startswith("text_model.embeddings.") and name.endswith("embedding.weight"):
            served[name] = torch.cat([tensor, torch.full((pad_rows, tensor.shape[1]), 99.0)])
        else:
            served[name] = tensor
    return served


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_similarity_explanation_carries_the_float64_reference_on_both_sides(family, request):
    model, _, image = request.getfixturevalue(family)
    ids = CLIP_IDS if family == "clip" else SIGLIP_IDS
    reference = (clip_reference if family == "clip" else siglip_reference)(model, image, ids)
    explanation = explain_image(ImageModel.from_hf(model),
                                _job(image, {"similarity": ids.tolist()}, ids), model_name=family)
    assert explanation.target.value == pytest.approx(reference["cosine"], abs=1e-5)
    grid = torch.tensor(explanation.patch_relevance.values).flatten()
    image_token = torch.cat([torch.tensor([explanation.class_token_relevance]), grid]) \
        if family == "clip" else grid
    assert _relative(image_token, reference["image_token"]) < 1e-4
    positions = torch.tensor(explanation.positional_relevance.values).flatten()
    if family == "clip":
        positions = torch.cat([torch.tensor([explanation.class_positional_relevance]), positions])
    assert _relative(positions, reference["image_position"]) < 1e-4
    assert _relative(explanation.text.token_relevance, reference["text_token"]) < 1e-4
    assert _relative(explanation.text.positional_relevance, reference["text_position"]) < 1e-4
    assert explanation.text.tokens == [f"t{int(i)}" for i in ids]
    for side in (explanation.conservation, explanation.text.conservation):
        assert side.explained == pytest.approx(reference["cosine"] / 2, rel=1e-5)
        assert side.relative_error_excluding_softmax < 1e-4


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("mode", ["pa-lrp", "attnlrp", "cp-lrp"])
def test_dimension_target_equals_hf_and_conserves(family, mode, request):
    model, _, image = request.getfixturevalue(family)
    with torch.no_grad():
        embedding = model.get_image_features(pixel_values=image[None])
    embedding = getattr(embedding, "pooler_output", embedding)[0]
    dimension = int(embedding.abs().argmax())
    explanation = explain_image(ImageModel.from_hf(model),
                                _job(image, {"dimension": dimension}, mode=mode),
                                model_name=family)
    assert explanation.target.kind == "dimension" and explanation.target.index == dimension
    assert explanation.target.value == pytest.approx(float(embedding[dimension]), abs=1e-5)
    assert explanation.conservation.relative_error_excluding_softmax < 1e-4
    pixels = torch.tensor(explanation.pixel_relevance)
    assert pixels.shape == image.shape[1:] and pixels.abs().sum() > 0
    if mode != "pa-lrp":  # the positions carry relevance only in pa-lrp
        assert not torch.tensor(explanation.positional_relevance.values).any()


@pytest.mark.parametrize("target", ["dimension", "similarity"])
def test_clip_mean_pooling_is_every_tokens_mean_and_conserves(clip, target):  # noqa: F811
    """image_pooling "mean" (vLLM's MEAN pooling of CLIP): the projection of the mean of every
    token's post-LayerNorm state, the class token included."""
    model, _, image = clip
    explainer = ImageModel.from_hf(model)
    explainer.blocks.image_pooling = "mean"
    with torch.no_grad():
        states = model.vision_model(pixel_values=image[None]).last_hidden_state[0]
        pooled = model.vision_model.post_layernorm(states).mean(0)
        embedding = model.visual_projection(pooled)
        text = model.get_text_features(input_ids=CLIP_IDS[None])
    text = getattr(text, "pooler_output", text)[0]
    job = _job(image, {"dimension": 3}) if target == "dimension" else \
        _job(image, {"similarity": CLIP_IDS.tolist()}, CLIP_IDS)
    explanation = explain_image(explainer, job, model_name="m")
    expected = float(embedding[3]) if target == "dimension" else float(
        torch.nn.functional.cosine_similarity(embedding, text, dim=0))
    assert explanation.target.value == pytest.approx(expected, abs=1e-5)
    assert explanation.conservation.relative_error_excluding_softmax < 1e-4
    cls = explain_image(ImageModel.from_hf(model), job, model_name="m")
    assert explanation.target.value != pytest.approx(cls.target.value, abs=1e-4)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_blocks_from_vllm_names_explain_as_hf(family, request):
    model, _, image = request.getfixturevalue(family)
    ids = CLIP_IDS if family == "clip" else SIGLIP_IDS
    served = ImageModel.from_served(_served_names(model), model.config)
    job = _job(image, {"similarity": ids.tolist()}, ids)
    ours, theirs = explain_image(served, job, model_name="m"), \
        explain_image(ImageModel.from_hf(model), job, model_name="m")
    assert ours == theirs


def test_bad_jobs_are_refused_naming_what_is_allowed(clip):  # noqa: F811
    model, _, image = clip
    explainer = ImageModel.from_hf(model)
    with pytest.raises(ImageInputError, match=r"out of range.*has 8 \(0\.\.7\)"):
        explain_image(explainer, _job(image, {"dimension": 8}), model_name="m")
    with pytest.raises(ImageInputError, match="takes 16×16"):
        explain_image(explainer, _job(torch.zeros(3, 32, 32), {"dimension": 0}), model_name="m")
    with pytest.raises(ImageInputError, match="no end-of-text token"):
        explain_image(explainer, _job(image, {"similarity": [3, 4]}, torch.tensor([3, 4])),
                      model_name="m")
    with pytest.raises(ValueError, match="one token per id"):
        ImageJob(pixels=Float32Array.from_tensor(image), target={"similarity": [3, 4]})


def test_cli_explain_image_writes_the_pipelines_explanation(tmp_path, capsys):
    import io
    import json

    from PIL import Image
    from tiny_vision import save_tiny_clip

    from vllm_pelrp import cli
    from vllm_pelrp.image_explanation import ImageExplanation
    from vllm_pelrp.image_pipeline import ImageExplainer

    save_tiny_clip(tmp_path)
    picture = tmp_path / "picture.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(picture)
    out = {kind: tmp_path / f"out.{kind}" for kind in ("json", "png", "html")}
    status = cli.main(["explain-image", str(picture), "--model", str(tmp_path), "--similarity",
                       "a red cat", "--json", str(out["json"]), "--png", str(out["png"]),
                       "--html", str(out["html"])])
    assert status == 0
    written = ImageExplanation.model_validate(json.loads(out["json"].read_text()))
    expected, _ = ImageExplainer(str(tmp_path)).explain(Image.open(picture),
                                                        {"similarity": "a red cat"})
    assert written == expected
    assert Image.open(io.BytesIO(out["png"].read_bytes())).size[0] > 0
    assert "a&lt;/w&gt;" in out["html"].read_text()  # the tokens, escaped
    assert "conservation" in capsys.readouterr().out
    assert cli.main(["explain-image", str(picture), "--model", str(tmp_path),
                     "--dimension", "512"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_cli_explains_a_vit_classifier(tmp_path, capsys):
    """ViT and DeiT go through the same pipeline offline: a class logit equals HF's and its
    explanation is the engine's (``vit_seed``, ``relevance``); a mean-pooled dimension equals
    HF's patch mean; similarity is refused naming the ViT targets."""
    import json

    from PIL import Image
    from tiny_vision import IMAGE, hf_vit
    from transformers import ViTImageProcessor

    from vllm_pelrp import cli
    from vllm_pelrp.engine.driver import relevance, run_forward
    from vllm_pelrp.image_explanation import ImageExplanation
    from vllm_pelrp.image_pipeline import ImageExplainer
    from vllm_pelrp.models.vit import vit_seed

    model = hf_vit()
    model.config.architectures = ["ViTForImageClassification"]
    model.save_pretrained(tmp_path)
    processor = ViTImageProcessor(size={"height": IMAGE, "width": IMAGE})
    processor.save_pretrained(tmp_path)
    picture = tmp_path / "picture.png"
    generator = torch.Generator().manual_seed(5)
    Image.fromarray(torch.randint(0, 256, (20, 24, 3), generator=generator,
                                  dtype=torch.uint8).numpy()).save(picture)
    out = tmp_path / "out.json"
    assert cli.main(["explain-image", str(picture), "--model", str(tmp_path), "--label", "2",
                     "--json", str(out)]) == 0
    written = ImageExplanation.model_validate(json.loads(out.read_text()))
    pixels = processor(Image.open(picture), return_tensors="pt").pixel_values
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits[0]
        hidden = model.vit(pixel_values=pixels).last_hidden_state[0]
    assert written.target.kind == "label" and written.target.index == 2
    assert written.target.value == pytest.approx(float(logits[2]), abs=1e-5)
    explainer = ImageExplainer(str(tmp_path))
    forward = run_forward(explainer.model.vision, pixels[0])
    result = relevance(explainer.model.vision, forward.layer_inputs, forward.positions,
                       vit_seed(explainer.model.blocks, forward.final_hidden, {"label": 2}),
                       "pa-lrp", forward=forward)
    _, grid = explainer.model.vision.embedding.grid(result.token[0])
    assert _relative(torch.tensor(written.patch_relevance.values), grid) < 1e-6
    assert written.conservation.relative_error_excluding_softmax < 1e-4
    mean, _ = explainer.explain(Image.open(picture), {"mean_dimension": 4})
    assert mean.target.value == pytest.approx(float(hidden[1:].mean(0)[4]), abs=1e-5)
    assert cli.main(["explain-image", str(picture), "--model", str(tmp_path), "--similarity",
                     "a cat"]) == 2
    assert "{'label': i}" in capsys.readouterr().err
