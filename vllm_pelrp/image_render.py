"""Renderers of an ``ImageExplanation``, one per medium: ``render_png`` (the image with its
patches' relevance as an overlay, the positions' relevance as a grid beside it) and
``render_html`` (a self-contained page: that PNG, the target and the conservation, and for an
image–text similarity the text's tokens coloured by their relevance). Red is positive, blue
negative; each map is scaled by its own largest |value|, which the page prints."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

from .image_explanation import ImageExplanation, PatchGrid

PANEL = 224  # the shorter side of each panel, in pixels (nearest-neighbour upscaling)
GAP = 12
LABEL = 18


def _colours(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per value: RGB (…, 3) in [0, 1] (red positive, blue negative) and an alpha in [0, 1]
    (|value| / max |value|); and that max."""
    scale = float(np.abs(values).max()) or 1.0
    strength = np.clip(values / scale, -1.0, 1.0)
    rgb = np.zeros((*values.shape, 3))
    rgb[..., 0] = strength > 0
    rgb[..., 2] = strength < 0
    return rgb, np.abs(strength), scale


def _grey(image: Any) -> np.ndarray:
    """(C, H, W) pixel values → (H, W, 3) in [0, 1] (each image min–max scaled)."""
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 2:
        array = array[None]
    array = array.mean(0) if array.shape[0] not in (3,) else array.transpose(1, 2, 0)
    low, high = float(array.min()), float(array.max())
    array = (array - low) / (high - low or 1.0)
    return np.repeat(array[..., None], 3, -1) if array.ndim == 2 else array


def _upscale(array: np.ndarray, factor: int) -> np.ndarray:
    return array.repeat(factor, 0).repeat(factor, 1)


def _grid_values(grid: PatchGrid) -> np.ndarray:
    return np.asarray(grid.values, dtype=np.float64)


def panels(explanation: ImageExplanation, image: Any) -> dict[str, Any]:
    """The two panels as (H, W, 3) uint8 arrays and their scales."""
    height, width = explanation.image_size
    patch = explanation.patch_size
    base = _grey(image)
    if base.shape[:2] != (height, width):
        raise ValueError(f"an image of {base.shape[:2]} pixels for an explanation of "
                         f"{(height, width)}")
    patches = _grid_values(explanation.patch_relevance)
    rgb, alpha, patch_scale = _colours(_upscale(patches, patch))
    overlay = base * (1 - 0.65 * alpha[..., None]) + rgb * 0.65 * alpha[..., None]
    positions = _grid_values(explanation.positional_relevance)
    rgb, alpha, position_scale = _colours(_upscale(positions, patch))
    position_map = 1.0 - alpha[..., None] * (1.0 - rgb)  # white where 0
    factor = max(1, -(-PANEL // min(height, width)))
    return {"patches": (_upscale(overlay, factor) * 255).astype(np.uint8),
            "positions": (_upscale(position_map, factor) * 255).astype(np.uint8),
            "patch_scale": patch_scale, "position_scale": position_scale}


def render_png(explanation: ImageExplanation, image: Any) -> bytes:
    """The image with its patches' relevance overlaid, and the positions' relevance beside it,
    each labelled, as PNG bytes. ``image``: the explained pixels, (C, H, W)."""
    from PIL import Image, ImageDraw

    drawn = panels(explanation, image)
    left, right = drawn["patches"], drawn["positions"]
    height, width = left.shape[:2]
    canvas = Image.new("RGB", (2 * width + GAP, height + LABEL), "white")
    canvas.paste(Image.fromarray(left), (0, LABEL))
    canvas.paste(Image.fromarray(right), (width + GAP, LABEL))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 3), f"patches (max |R| {drawn['patch_scale']:.3g})", fill="black")
    draw.text((width + GAP + 2, 3), f"positions (max |R| {drawn['position_scale']:.3g})",
              fill="black")
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def _token_spans(tokens: list[str], values: list[float]) -> str:
    scale = max((abs(v) for v in values), default=0.0) or 1.0
    spans = []
    for index, (token, value) in enumerate(zip(tokens, values)):
        strength = min(abs(value) / scale, 1.0)
        colour = (f"rgba(220, 40, 40, {strength:.3f})" if value > 0
                  else f"rgba(40, 80, 220, {strength:.3f})")
        spans.append(f'<span class="tok" data-index="{index}" title="{value:.6g}" '
                     f'style="background:{colour}">{html.escape(token)}</span>')
    return " ".join(spans)


def render_html(explanation: ImageExplanation, image: Any) -> str:
    """A self-contained HTML page of the explanation (no external resources)."""
    png = base64.b64encode(render_png(explanation, image)).decode("ascii")
    target = explanation.target
    conservation = explanation.conservation
    rows = [("target", f"{html.escape(target.description)} ({target.value:.6g})"),
            ("model, mode", f"{html.escape(explanation.model)}, {explanation.mode}"),
            ("this side explains", f"{conservation.explained:.6g}"),
            ("patches + positions + class token", f"{conservation.input_sum:.6g}"),
            ("softmax absorbed, biases kept",
             f"{conservation.softmax_absorbed:.6g}, {conservation.bias_absorbed:.6g}")]
    if explanation.class_token_relevance is not None:
        rows.append(("class token", f"{explanation.class_token_relevance:.6g}"))
    table = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows)
    text = ""
    if explanation.text is not None:
        side = explanation.text
        text = (f'<h2>Text (explains {side.conservation.explained:.6g})</h2>'
                f'<p id="text-tokens">{_token_spans(side.tokens, side.token_relevance)}</p>'
                f'<h3>Text positions</h3>'
                f'<p id="text-positions">'
                f'{_token_spans(side.tokens, side.positional_relevance)}</p>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Image explanation</title>
<style>body{{font-family:sans-serif;margin:1.5em;color:#222}}
table{{border-collapse:collapse}}th,td{{text-align:left;padding:2px 10px 2px 0}}
.tok{{padding:1px 3px;border-radius:3px;font-family:monospace}}</style></head>
<body><h1>Why the model scored this image</h1>
<img id="heatmap" alt="patch relevance over the image, positional relevance beside it"
 src="data:image/png;base64,{png}">
<table id="conservation">{table}</table>{text}</body></html>
"""
