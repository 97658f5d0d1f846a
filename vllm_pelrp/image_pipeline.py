"""The one explain pipeline of image models (ViT and DeiT classifiers offline; CLIP and SigLIP
offline and on a worker): an ``ImageJob`` (the image's pixels as the model's processor gives
them, a target, a mode) in, an ``ImageExplanation`` (``image_explanation.py``) out. No vLLM
and no HTTP here: the worker (``serving/image_worker.py``) builds the model from the served
weights and calls ``explain_image``; the API (``serving/image_api.py``) decodes the image and
makes the job with ``image_job``, as the offline ``ImageExplainer`` (and ``pelrp
explain-image``) does.

Targets, as the text encoders' (``{'dimension': k}``, ``{'similarity': text}``):
- ``{"dimension": k}``: dimension k of the image embedding before normalisation (CLIP: the
  projected class token, or every token's mean as vLLM's MEAN pooling; SigLIP: the
  attention-pooling head's output, whose probe and biases keep their share);
- ``{"similarity": ids}``: the cosine of the image's and the text's embeddings, half of it
  explained on each side (``clip_similarity_seeds``, ``siglip_similarity_seeds``); the text's
  relevance comes in ``text``;
- ViT and DeiT: ``{"label": i}`` (a class logit; DeiT with the teacher, the mean of its two
  classifiers), ``{"dimension": k}`` (of the class token's final state) or
  ``{"mean_dimension": k}`` (of the patch tokens' mean) (``models/vit.py``: ``vit_seed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .engine.driver import BlockModel, ForwardPass, HiddenSeed, relevance, run_forward
from .engine.spec import UnsupportedModelError
from .image_explanation import ImageExplanation, ImageTarget, build_image_explanation, text_side
from .models import clip as clip_model
from .models import siglip as siglip_model
from .models import vit as vit_model
from .pipeline import Float32Array

# Hugging Face architectures served as image–text embedding models (vLLM's pooling runner)
IMAGE_TEXT_ARCHITECTURES = {"CLIPModel": "clip", "SiglipModel": "siglip"}
# and the image classifiers and encoders explained offline (vLLM serves none of them)
VIT_ARCHITECTURES = vit_model.ARCHITECTURES


def image_text_family(config: Any) -> str | None:
    """"clip" or "siglip" for a config of an image–text model explained here, else None."""
    names = getattr(config, "architectures", None)
    if not names:  # a config made in code: by its model type
        return getattr(config, "model_type", None) if getattr(config, "model_type", None) in (
            "clip", "siglip") else None
    for name in names:
        if name in IMAGE_TEXT_ARCHITECTURES:
            return IMAGE_TEXT_ARCHITECTURES[name]
    return None


@dataclass
class ImageModel:
    """An image model's blocks (CLIP, SigLIP, ViT/DeiT), behind one interface for the
    pipeline."""

    family: Literal["clip", "siglip", "vit"]
    blocks: clip_model.CLIPBlocks | siglip_model.SiglipBlocks | vit_model.VisionModel

    @classmethod
    def from_hf(cls, model: Any) -> "ImageModel":
        """Views of a Hugging Face ``CLIPModel``, ``SiglipModel`` or ViT/DeiT model."""
        if set(getattr(model.config, "architectures", None) or ()) & set(VIT_ARCHITECTURES) \
                or type(model).__name__ in VIT_ARCHITECTURES:
            return cls("vit", vit_model.vit_from_hf(model))
        family = image_text_family(model.config)
        if family == "clip":
            return cls(family, clip_model.clip_from_hf(model))
        if family == "siglip":
            return cls(family, siglip_model.siglip_from_hf(model))
        raise UnsupportedModelError(_unsupported(model.config))

    @classmethod
    def from_served(cls, served: dict[str, torch.Tensor], config: Any,
                    image_pooling: str = "cls") -> "ImageModel":
        """vLLM's ``CLIPEmbeddingModel`` or ``SiglipEmbeddingModel``, from its parameters
        (``image_pooling``: CLIP's, "cls" or "mean"; SigLIP pools with its head)."""
        family = image_text_family(config)
        if family == "clip":
            return cls(family, clip_model.clip_from_served(served, config, image_pooling))
        if family == "siglip":
            return cls(family, siglip_model.siglip_from_served(served, config))
        raise UnsupportedModelError(_unsupported(config))

    @property
    def vision(self) -> BlockModel:
        return self.blocks.blocks if self.family == "vit" else self.blocks.vision

    @property
    def text(self) -> BlockModel | None:
        return None if self.family == "vit" else self.blocks.text

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.vision.embedding.image_size)

    @property
    def embedding_size(self) -> int:
        if self.family == "clip":
            return int(self.blocks.visual_projection.shape[0])
        return int(self.vision.embedding.position.shape[-1])

    def vit_seed(self, image: ForwardPass, target: dict[str, int]) -> tuple[HiddenSeed, float]:
        """A ViT's or DeiT's seed (``vit_seed``) and the target's value."""
        try:
            seed = vit_model.vit_seed(self.blocks, image.final_hidden, target)
        except ValueError as error:  # an index out of range, a label without a classifier
            raise ImageInputError(str(error), "target") from None
        value = float((seed.gradient[0] * image.final_hidden.float()).sum())
        if seed.head_bias is not None:
            value += float(seed.head_bias.sum())
        return seed, value

    def dimension_seed(self, image: ForwardPass, dimension: int, mode: str
                       ) -> tuple[HiddenSeed, float]:
        """The seed of dimension ``dimension`` of the image embedding, and its value."""
        hidden = image.final_hidden
        if self.family == "clip":
            projection = self.blocks.visual_projection
            weights = clip_model.image_pooling_weights(self.blocks, image)
            gradient = (weights[:, None] * projection[dimension].float())[None]
            value = float(clip_model.image_embedding(self.blocks, image)[dimension])
            return HiddenSeed(gradient), value
        pooling = self.blocks.pooling
        pooled = siglip_model.image_embedding(self.blocks, image)
        onehot = torch.zeros_like(pooled)
        onehot[dimension] = 1.0
        gradient = pooling.backward(hidden, onehot, mode)
        value = float(pooled[dimension])
        kept = value - float((gradient * hidden.float()).sum())
        return HiddenSeed(gradient, torch.tensor([kept])), value

    def similarity_seeds(self, image: ForwardPass, text: ForwardPass, ids: torch.Tensor,
                         mode: str):
        if self.family == "clip":
            return clip_model.clip_similarity_seeds(self.blocks, image, text, ids)
        return siglip_model.siglip_similarity_seeds(self.blocks, image, text, mode)


def _unsupported(config: Any) -> str:
    names = list(getattr(config, "architectures", None) or [])
    return (f"architecture {names[0] if names else getattr(config, 'model_type', None)} is not "
            f"an image model explained here; supported: {', '.join(IMAGE_TEXT_ARCHITECTURES)} "
            f"(served and offline), {', '.join(VIT_ARCHITECTURES)} (offline)")


# ---- the message from the API to the worker ---------------------------------------------------
class ImageJob(BaseModel):
    """One image to explain (API → worker, ``pelrp_image_submit``)."""

    model_config = ConfigDict(extra="forbid")

    pixels: Float32Array = Field(description="(channels, height, width), as the model's image "
                                 "processor gives them (what vLLM embeds).")
    target: dict[Literal["dimension", "similarity", "label", "mean_dimension"],
                 Annotated[int, Field(ge=0)] | list[int]]
    text_tokens: list[str] | None = Field(None, description="'similarity': the text's tokens "
                                          "as shown (one per id).")
    mode: Literal["pa-lrp", "attnlrp", "cp-lrp"] = "pa-lrp"

    @model_validator(mode="after")
    def _one_target(self) -> "ImageJob":
        if len(self.target) != 1:
            raise ValueError("a job has exactly one target")
        kind, value = next(iter(self.target.items()))
        if (kind == "similarity") != isinstance(value, list):
            raise ValueError("'dimension' takes an index, 'similarity' the text's token ids")
        if kind == "similarity" and (not value or self.text_tokens is None
                                     or len(self.text_tokens) != len(value)):
            raise ValueError("'similarity' needs the text's ids and one token per id")
        if len(self.pixels.shape) != 3:
            raise ValueError("pixels are (channels, height, width)")
        return self


class ImageInputError(ValueError):
    """The job asks for something the model cannot give (the request's fault: a 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def image_job(image: Any, target: dict[str, int | str], mode: str, *, processor: Any,
              tokenizer: Any, max_text_tokens: int | None = None) -> ImageJob:
    """The job of a PIL ``image`` (converted to RGB, then the model's Hugging Face image
    processor: what vLLM embeds) and ``target`` (``{"dimension": k}`` or ``{"similarity":
    "text"}``, the text tokenized with its special tokens, at most ``max_text_tokens``)."""
    if len(target) != 1 or next(iter(target)) not in (
            "dimension", "similarity", "label", "mean_dimension"):
        raise ImageInputError("the target is one of {'dimension': k} or {'similarity': 'text'} "
                              "(CLIP, SigLIP), {'label': i}, {'dimension': k} or "
                              "{'mean_dimension': k} (ViT, DeiT)", "target")
    pixels = processor(image.convert("RGB"), return_tensors="np")["pixel_values"][0]
    kind, value = next(iter(target.items()))
    tokens = None
    if kind == "similarity":
        if tokenizer is None:
            raise ImageInputError("this model has no text tower for {'similarity': 'text'}: a "
                                  "vision tower takes {'dimension': k}, a ViT or DeiT "
                                  "{'label': i}, {'dimension': k} or {'mean_dimension': k}",
                                  "target")
        ids = list(tokenizer(value)["input_ids"])
        if max_text_tokens and len(ids) > max_text_tokens:
            raise ImageInputError(f"the text is {len(ids)} tokens; this model's text tower "
                                  f"takes at most {max_text_tokens}", "target.similarity")
        value, tokens = ids, [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    return ImageJob(pixels=Float32Array.model_construct(
        shape=list(pixels.shape), data=pixels.astype("<f4").tobytes()),
        target={kind: value}, text_tokens=tokens, mode=mode)


def processed_image_url(image: Any, processor: Any) -> str:
    """The image as the model sees it (the processor's resizing and cropping, not its
    normalisation) as a PNG data URL: what an explanation's grids overlay."""
    import base64
    import io

    from PIL import Image

    pixels = processor(image.convert("RGB"), do_rescale=False, do_normalize=False,
                       return_tensors="np")["pixel_values"][0]
    buffer = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0).clip(0, 255).astype("uint8")).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class ImageExplainer:
    """Offline: a CLIP, SigLIP, ViT or DeiT checkpoint directory (Hugging Face's files),
    explained by the same pipeline as the server (``image_job``, ``explain_image``)."""

    def __init__(self, path: str, image_pooling: str = "cls") -> None:
        import transformers
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        config = AutoConfig.from_pretrained(path)
        names = list(getattr(config, "architectures", None) or [])
        vit = [n for n in names if n in VIT_ARCHITECTURES]
        if image_text_family(config) is None and not vit:
            raise UnsupportedModelError(_unsupported(config))
        self.name = str(path)
        loader = getattr(transformers, vit[0]) if vit else AutoModel
        self.model = ImageModel.from_hf(loader.from_pretrained(path).eval())
        if image_pooling not in ("cls", "mean"):
            raise ValueError(f"image pooling {image_pooling!r}; allowed: cls, mean")
        if self.model.family == "clip":
            self.model.blocks.image_pooling = image_pooling
        self.processor = AutoImageProcessor.from_pretrained(path)
        has_text = self.model.text is not None
        self.tokenizer = AutoTokenizer.from_pretrained(path) if has_text else None
        self.max_text_tokens = int(self.model.text.embedding.position.shape[0]) \
            if has_text else None

    def job(self, image: Any, target: dict[str, int | str], mode: str = "pa-lrp") -> ImageJob:
        return image_job(image, target, mode, processor=self.processor,
                         tokenizer=self.tokenizer, max_text_tokens=self.max_text_tokens)

    def explain(self, image: Any, target: dict[str, int | str], mode: str = "pa-lrp"
                ) -> tuple[ImageExplanation, torch.Tensor]:
        """The explanation of ``target`` on the PIL ``image``, and the processed pixels (C, H, W)
        it explains (what ``image_render`` draws)."""
        job = self.job(image, target, mode)
        explanation = explain_image(self.model, job, model_name=self.name)
        explanation.image = processed_image_url(image, self.processor)
        return explanation, job.pixels.to_tensor()


@torch.no_grad()
def explain_image(model: ImageModel, job: ImageJob, *, model_name: str,
                  checkpoint: Any = None) -> ImageExplanation:
    """The explanation of ``job``'s target on ``model`` (see the module docstring)."""
    pixels = job.pixels.to_tensor().to(model.vision.device)
    size = tuple(pixels.shape[1:])
    if size != model.image_size:
        raise ImageInputError(f"the processed image is {size[0]}×{size[1]} pixels; this model "
                              f"takes {model.image_size[0]}×{model.image_size[1]}", "image")
    kind, value = next(iter(job.target.items()))
    image = run_forward(model.vision, pixels)
    text_result = None
    if model.family == "vit":
        if kind == "similarity":
            raise ImageInputError("a ViT has no text tower: the target is {'label': i}, "
                                  "{'dimension': k} or {'mean_dimension': k}", "target")
        seed, target_value = model.vit_seed(image, {kind: value})
        names = model.blocks.label_names or {}
        what = {"label": f"logit of label {value}"
                + (f" ({names[value]!r})" if value in names else ""),
                "dimension": f"dimension {value} of the class token's final state",
                "mean_dimension": f"dimension {value} of the patch tokens' mean final state"}[kind]
        target = ImageTarget(kind="label" if kind == "label" else "dimension", index=value,
                             value=target_value, description=f"{what}: {target_value:.4f}")
    elif kind in ("label", "mean_dimension"):
        raise ImageInputError(f"{{'{kind}': ...}} is a ViT's target; this model takes "
                              "{'dimension': k} or {'similarity': 'text'}", "target")
    elif kind == "dimension":
        if value >= model.embedding_size:
            raise ImageInputError(f"dimension {value} is out of range: the image embedding has "
                                  f"{model.embedding_size} (0..{model.embedding_size - 1})",
                                  "target.dimension")
        seed, target_value = model.dimension_seed(image, value, job.mode)
        target = ImageTarget(kind="dimension", index=value, value=target_value,
                             description=f"dimension {value} of the image embedding (before "
                             f"normalisation): {target_value:.4f}")
    else:
        if model.text is None:
            raise ImageInputError("this model has no text tower: 'similarity' needs one",
                                  "target.similarity")
        ids = torch.tensor(value, device=model.vision.device)
        text = run_forward(model.text, ids)
        try:
            seeds = model.similarity_seeds(image, text, ids, job.mode)
        except ValueError as error:  # no end-of-text token, an embedding of norm 0
            raise ImageInputError(str(error), "target.similarity") from None
        seed = seeds.image
        text_result = relevance(model.text, text.layer_inputs, text.positions, seeds.text,
                                job.mode, checkpoint, forward=text)
        target = ImageTarget(kind="similarity", value=seeds.cosine,
                             description=f"cosine similarity {seeds.cosine:.4f} of the image's "
                             "and the text's embeddings; each side explains half of it (norms "
                             "held, uniform rule)")
    result = relevance(model.vision, image.layer_inputs, image.positions, seed, job.mode,
                       checkpoint, forward=image)
    explanation = build_image_explanation(result, model.vision.embedding, model=model_name,
                                          mode=job.mode, target=target)
    if text_result is not None:
        explanation.text = text_side(text_result, job.text_tokens)
    return explanation
