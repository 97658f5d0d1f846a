"""The wire format of an image explanation (``ImageExplanation``, versioned apart from the text
``Explanation``: ``IMAGE_WIRE_FORMAT_VERSION``), built from the engine's raw relevance of a
patch-embedding model (``models/vit.py``, ``clip.py``, ``siglip.py``).

The patches' relevance and the positions' relevance come as grids (rows × columns of patches,
row-major as the image), the class token's apart; the pixels' relevance as an H×W map (summed
over the channels). For an image–text similarity (CLIP, SigLIP) ``text`` carries the text
side: its tokens, their relevance and their positions' relevance, each side conserving half
the cosine. Plain data only: no tensors cross this boundary (``build_image_explanation`` reads
them once)."""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

IMAGE_WIRE_FORMAT_VERSION = "1.1"  # 1.1 adds `id` (the web view's) and `image`


class PatchGrid(BaseModel):
    """Values per patch, ``rows`` × ``columns``, row-major as the image."""

    model_config = ConfigDict(extra="forbid")

    rows: int
    columns: int
    values: list[list[float]]


class ImageTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["label", "dimension", "similarity"]
    index: int | None = Field(None, description="The label or the dimension; None for "
                              "'similarity'.")
    value: float = Field(description="The target's value; for 'similarity' the cosine, half of "
                         "which each side explains.")
    description: str


class ImageConservation(BaseModel):
    """input_sum + softmax_absorbed + bias_absorbed = explained, up to rounding."""

    model_config = ConfigDict(extra="forbid")

    explained: float = Field(description="What this side's relevance sums to: the target, or "
                             "half the cosine.")
    input_sum: float = Field(description="Σ of the patches', the class token's and the "
                             "positions' relevance.")
    softmax_absorbed: float
    bias_absorbed: float = Field(description="The layers', the projection's, the norms' and "
                                 "the head's biases (and a pooling head's probe).")
    relative_error_excluding_softmax: float


class TextSide(BaseModel):
    """The text side of an image–text similarity."""

    model_config = ConfigDict(extra="forbid")

    tokens: list[str]
    token_relevance: list[float]
    positional_relevance: list[float]
    conservation: ImageConservation


class ImageExplanation(BaseModel):
    """Why an image model gave its target (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    wire_format_version: str = IMAGE_WIRE_FORMAT_VERSION
    id: str | None = Field(None, description="The server's id of a served explanation: open it "
                           "in the web view (GET /pelrp?id=…, /v1/explanations/{id}); null "
                           "offline.")
    model: str
    mode: Literal["pa-lrp", "attnlrp", "cp-lrp"]
    target: ImageTarget
    image_size: tuple[int, int] = Field(description="(height, width) in pixels.")
    patch_size: int
    patch_relevance: PatchGrid = Field(description="Each patch's pixels' relevance (outside "
                                       "pa-lrp, with its position's).")
    positional_relevance: PatchGrid = Field(description="Each patch position's relevance "
                                            "(the learned table's; 0 outside pa-lrp).")
    class_token_relevance: float | None = None
    class_positional_relevance: float | None = None
    distillation_token_relevance: float | None = Field(None, description="DeiT's second "
                                                       "prefix token, with its position's.")
    distillation_positional_relevance: float | None = None
    pixel_relevance: list[list[float]] = Field(description="H × W, summed over the channels.")
    conservation: ImageConservation
    text: TextSide | None = None
    image: str | None = Field(None, description="The image as the model saw it (after its "
                              "processor's resizing and cropping, before normalisation), a PNG "
                              "data URL the grids overlay: patch (r, c) covers its pixels "
                              "[r·patch_size, (r+1)·patch_size) × [c·patch_size, …).")


def _conservation(result, row: int, explained: float) -> ImageConservation:
    input_sum = float(result.input_relevance[row])
    softmax = float(result.softmax_absorbed[row].sum())
    bias = float(result.absorbed[row]) - softmax
    scale = max(abs(explained), 1e-12)
    return ImageConservation(
        explained=explained, input_sum=input_sum, softmax_absorbed=softmax, bias_absorbed=bias,
        relative_error_excluding_softmax=abs(input_sum + softmax + bias - explained) / scale)


def _grid(values) -> PatchGrid:
    return PatchGrid(rows=values.shape[0], columns=values.shape[1],
                     values=values.double().tolist())


def build_image_explanation(result, embedding, *, model: str, mode: str, target: ImageTarget,
                            row: int = 0) -> ImageExplanation:
    """Row ``row`` of the engine's ``RelevanceResult`` of a ``PatchEmbedding`` model."""
    token = result.token[row].detach().cpu()
    position = result.position_embedding[row].detach().cpu()
    cls, patches = embedding.grid(token)
    cls_position, positions = embedding.grid(position)
    distilled = embedding.prefix > 1
    return ImageExplanation(
        model=model, mode=mode, target=target, image_size=tuple(embedding.image_size),
        patch_size=embedding.patch, patch_relevance=_grid(patches),
        positional_relevance=_grid(positions),
        class_token_relevance=None if cls is None else float(cls),
        class_positional_relevance=None if cls_position is None else float(cls_position),
        distillation_token_relevance=float(token[1]) if distilled else None,
        distillation_positional_relevance=float(position[1]) if distilled else None,
        pixel_relevance=result.pixel[row].detach().cpu().sum(0).double().tolist(),
        conservation=_conservation(result, row, float(result.target_logit[row])))


def text_side(result, tokens: Sequence[str], row: int = 0) -> TextSide:
    """The text side of a similarity from the text tower's ``RelevanceResult``."""
    return TextSide(tokens=list(tokens), token_relevance=result.token[row].double().tolist(),
                    positional_relevance=result.position_embedding[row].double().tolist(),
                    conservation=_conservation(result, row, float(result.target_logit[row])))
