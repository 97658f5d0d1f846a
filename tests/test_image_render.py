"""The image explanation's wire format and its renderers, on a random CLIP's image–text
explanation (both sides) and a random ViT's class logit: the JSON round-trips, the numbers are
the engine's, the PNG has both panels, and the HTML page shows the image, the conservation and
the text's tokens in a browser (a screenshot, kept in tests/artifacts)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from test_engine_clip import IDS, clip  # noqa: F401  (the fixture)
from vllm_pelrp.engine.driver import relevance, run_forward
from vllm_pelrp.image_explanation import (
    ImageExplanation,
    ImageTarget,
    build_image_explanation,
    text_side,
)
from vllm_pelrp.image_render import PANEL, render_html, render_png
from vllm_pelrp.models.clip import clip_similarity_seeds

ARTIFACTS = Path(__file__).parent / "artifacts"
TOKENS = ["<a>", "cat", "&", "dog", "<b>", "</s>", "x"]  # markup-like text, escaped on the page


@pytest.fixture(scope="module")
def clip_explanation(clip):  # noqa: F811
    _, blocks, image = clip
    image_forward, text_forward = run_forward(blocks.vision, image), run_forward(blocks.text, IDS)
    seeds = clip_similarity_seeds(blocks, image_forward, text_forward, IDS)
    image_result = relevance(blocks.vision, image_forward.layer_inputs, image_forward.positions,
                             seeds.image, "pa-lrp", forward=image_forward)
    text_result = relevance(blocks.text, text_forward.layer_inputs, text_forward.positions,
                            seeds.text, "pa-lrp", forward=text_forward)
    target = ImageTarget(kind="similarity", value=seeds.cosine,
                         description="cosine of the image's and the text's embeddings")
    explanation = build_image_explanation(image_result, blocks.vision.embedding, model="clip",
                                          mode="pa-lrp", target=target)
    explanation.text = text_side(text_result, TOKENS)
    return explanation, image_result, text_result, image


def test_wire_format_round_trips_and_carries_the_engine_numbers(clip_explanation):
    explanation, image_result, text_result, _ = clip_explanation
    again = ImageExplanation.model_validate(json.loads(explanation.model_dump_json()))
    assert again == explanation
    grid = explanation.patch_relevance
    assert (grid.rows, grid.columns) == (2, 2) and explanation.patch_size == 8
    assert grid.values[1][0] == pytest.approx(float(image_result.token[0, 3]))  # row 1, col 0
    assert explanation.class_token_relevance == pytest.approx(float(image_result.token[0, 0]))
    assert explanation.positional_relevance.values[0][1] == pytest.approx(
        float(image_result.position_embedding[0, 2]))
    assert len(explanation.pixel_relevance) == 16 and len(explanation.pixel_relevance[0]) == 16
    for side in (explanation.conservation, explanation.text.conservation):
        assert side.explained == pytest.approx(explanation.target.value / 2, rel=1e-5)
        assert side.relative_error_excluding_softmax < 1e-4
    assert explanation.text.token_relevance == pytest.approx(text_result.token[0].tolist())


def test_png_has_the_overlay_and_the_position_map(clip_explanation):
    from PIL import Image

    explanation, _, _, image = clip_explanation
    png = Image.open(io.BytesIO(render_png(explanation, image)))
    assert png.size[0] > 2 * PANEL and png.size[1] > PANEL
    with pytest.raises(ValueError, match="an image of"):
        render_png(explanation, torch.zeros(3, 8, 8))


def test_html_page_in_a_browser(clip_explanation):
    from playwright.sync_api import sync_playwright

    from test_webview import CHROMIUM, CHROMIUM_ARGS

    explanation, _, _, image = clip_explanation
    page_html = render_html(explanation, image)
    assert "<a>" not in page_html and "&lt;a&gt;" in page_html
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "clip_explanation.html"
    path.write_text(page_html)
    (ARTIFACTS / "clip_explanation.png").write_bytes(render_png(explanation, image))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 900, "height": 700})
        requested = []
        page.on("request", lambda request: requested.append(request.url))
        page.goto(path.as_uri())
        width = page.eval_on_selector("#heatmap", "img => img.naturalWidth")
        assert width > 2 * PANEL  # the PNG decoded in the browser
        assert page.locator("#text-tokens .tok").count() == len(TOKENS)
        assert page.inner_text("#text-tokens .tok >> nth=0") == "<a>"
        assert f"{explanation.conservation.input_sum:.6g}" in page.inner_text("#conservation")
        page.screenshot(path=str(ARTIFACTS / "clip_explanation_page.png"), full_page=True)
        browser.close()
    assert all(url.startswith(("file:", "data:")) for url in requested), requested
