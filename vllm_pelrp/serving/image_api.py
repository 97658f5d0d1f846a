"""The HTTP side of image explanations: ``POST /v1/embeddings`` on a server of CLIP or SigLIP
(vLLM's pooling runner), where an image comes as a chat ``messages`` request with one
``image_url`` part holding a data URL. With ``explain`` the returned embedding gains an
``explanation``: the wire-format ``ImageExplanation`` (``image_explanation.py``, versioned apart
from the text ``Explanation``) of

- ``{"target": {"dimension": k}}``: dimension k of the image embedding before normalisation, or
- ``{"target": {"similarity": "a photo of a cat"}}``: the cosine of the image's and the text's
  embeddings, half explained on each side (the text's tokens in ``explanation.text``),

with ``mode`` ('pa-lrp', 'attnlrp', 'cp-lrp'). The request is answered by vLLM's handler first
(its embedding, untouched); then the image is decoded and processed here as vLLM processes it
(the model's Hugging Face image processor), the text tokenized with the model's tokenizer, and
the worker computes the explanation (``image_worker.py``). Decoding, processing and tokenizing
run on the service's threads, never on the event loop; no torch tensor is built here (the pixels
travel as a ``Float32Array`` message). The metrics count image explanations like any other,
and the web view keeps them for the request's API key like any other (its ``id``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest

from ..image_explanation import ImageExplanation
from ..image_pipeline import ImageInputError, ImageJob, image_job, processed_image_url
from .http import call_vllm, dumps, error_response, refused
from .metrics import observed
from .protocol import Mode, describe_errors
from .service import ExplainError, ExplainService
from .webview import owner_of

IMAGE_TARGETS = "{'dimension': k} (of the image embedding) or {'similarity': 'text'}"
DATA_URL = "data:image/png;base64,..."


class ImageExplainOptions(BaseModel):
    """``explain`` on ``/v1/embeddings`` of an image–text model."""

    model_config = ConfigDict(extra="forbid")

    target: dict[Literal["dimension", "similarity"],
                 Annotated[int, Field(ge=0, strict=True)]
                 | Annotated[StrictStr, Field(min_length=1)]] = Field(
        description=f"{IMAGE_TARGETS}: one of them.")
    mode: Mode = Field("pa-lrp", description="'pa-lrp', 'attnlrp' or 'cp-lrp'.")


FIELDS = {"explain": list(ImageExplainOptions.model_fields)}


def parse_options(raw: Any) -> ImageExplainOptions:
    if not isinstance(raw, dict) or "target" not in raw:
        raise ExplainError(f"explain must be an object with a target, {IMAGE_TARGETS}, like "
                           '{"target": {"similarity": "a photo of a cat"}, "mode": "pa-lrp"}',
                           param="explain.target" if isinstance(raw, dict) else "explain")
    try:
        options = ImageExplainOptions.model_validate(raw)
    except ValidationError as error:
        errors = error.errors()
        loc = [str(p) for p in errors[0].get("loc") or () if isinstance(p, str)]
        raise ExplainError(describe_errors(errors, "explain", fields=FIELDS,
                                           allowed={"target": IMAGE_TARGETS}),
                           param="explain" + ("." + loc[0] if loc else "")) from None
    if len(options.target) != 1:
        raise ExplainError(f"explain.target takes one of {IMAGE_TARGETS}",
                           param="explain.target")
    kind, value = next(iter(options.target.items()))
    if (kind == "dimension") != isinstance(value, int):
        raise ExplainError("{'dimension': k} takes an index, {'similarity': 'text'} a text",
                           param=f"explain.target.{kind}")
    return options


def image_url(request: Any) -> str:
    """The one image of a chat embeddings request, as a data URL; ``ExplainError`` naming what
    an explanation takes for anything else."""
    if isinstance(request, EmbeddingCompletionRequest):
        raise ExplainError("explanations on this image–text model explain an image: send it as "
                           f"`messages` with one image_url part holding a data URL ({DATA_URL})"
                           "; text inputs are explained as the text side of "
                           "explain.target.similarity", param="input")
    urls: list[str] = []
    for message in request.messages or []:
        content = message.get("content") if isinstance(message, dict) else None
        parts = content if isinstance(content, list) else []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                url = part.get("image_url")
                urls.append(url.get("url") if isinstance(url, dict) else url)
            elif kind not in (None, "text"):
                raise ExplainError(f"a {kind!r} part is not explained; explain takes one "
                                   "image_url part", param="messages")
    if len(urls) != 1:
        raise ExplainError(f"explain takes exactly one image (an image_url part), found "
                           f"{len(urls)}", param="messages")
    url = urls[0]
    if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
        raise ExplainError(f"explain takes the image as a base64 data URL ({DATA_URL}); the "
                           "server fetches no image of its own to explain", param="messages")
    return url


@functools.lru_cache(maxsize=1)
def image_processor(path: str) -> Any:
    """The served model's Hugging Face image processor, loaded once (it keeps no state between
    calls, so the service's threads share it)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path)


def make_job(service: ExplainService, url: str, options: ImageExplainOptions
             ) -> tuple[ImageJob, str]:
    """The worker's job: the data URL's image decoded, then ``image_pipeline.image_job`` (the
    model's image processor, as vLLM's; the text tokenized with the model's tokenizer); and the
    image as the model sees it (``processed_image_url``), which the explanation carries."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        image = Image.open(io.BytesIO(data))
        image.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as error:
        raise ExplainError(f"the image data URL does not hold an image ({type(error).__name__})"
                           f"; send {DATA_URL}", param="messages") from None
    processor = image_processor(service.engine.model_config.model)
    try:
        job = image_job(image, dict(options.target), options.mode, processor=processor,
                        tokenizer=service.tokenizer if service.info.get("has_text") else None,
                        max_text_tokens=int(service.info.get("max_text_tokens") or 0))
        return job, processed_image_url(image, processor)
    except ImageInputError as error:
        raise ExplainError(str(error), param=f"explain.{error.param}") from None


@observed  # metrics, and the web view's store under the request's key (serving/metrics.py)
async def explain_image_job(service: ExplainService, job: ImageJob, options: ImageExplainOptions,
                            image: str, owner: str | None = None, user: str | None = None
                            ) -> dict[str, Any]:
    """The worker's reply to ``job``: an ``ImageExplanation`` dict with ``image`` (given its
    ``id`` by the store) or ``{"error", "param", "input_error"}``."""
    reply = (await service.on_worker("pelrp_image_submit", [job]))["results"][0]
    if "error" not in reply:
        reply["image"] = image
    return reply


async def image_embeddings(service: ExplainService, vllm_handler: Any, request: Any,
                           raw_request: Request, raw: Any) -> Response:
    """``/v1/embeddings`` with ``explain`` on an image–text model (see the module docstring)."""
    try:
        service.check_available()
        options = parse_options(raw)
        url = image_url(request)
        job, seen = await service.offload(make_job, service, url, options)
    except ExplainError as error:
        return refused(error)
    response = await call_vllm(vllm_handler, request, raw_request)
    if not isinstance(response, JSONResponse) or response.status_code != 200:
        return response
    try:
        reply = await explain_image_job(service, job, options, seen,
                                        owner=owner_of(raw_request),
                                        user=getattr(request, "user", None))
    except ExplainError as error:
        return refused(error)
    if "error" in reply:
        if reply.get("input_error"):
            param = reply.get("param")
            return error_response(reply["error"], 400,
                                  "messages" if param == "image" else f"explain.{param}")
        return error_response(reply["error"], 500)
    explanation = await service.offload(ImageExplanation.model_validate, reply)
    body = await service.offload(json.loads, response.body)
    for item in body.get("data") or []:
        item["explanation"] = explanation.model_dump(mode="json")
    headers = {k: v for k, v in response.headers.items()
               if k.lower() not in ("content-length", "content-type")}
    return Response(await service.offload(dumps, body), media_type="application/json",
                    headers=headers)
