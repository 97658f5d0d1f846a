"""The HTTP side of encoder explanations: BERT-family embedding and reranking models served by
vLLM's pooling runner (``pelrp serve`` adds ``--runner pooling`` for them).

Wraps vLLM's ``POST /v1/embeddings``, ``/score`` (``/v1/score``) and ``/rerank`` (``/v1/rerank``,
``/v2/rerank``) where vLLM serves them. A request without ``explain`` (absent, null or false)
goes to vLLM's own route handler, untouched: same parsing, same answer, byte for byte. A request
with it is answered by vLLM's handler first, and then each returned item gains an
``explanation``, the wire-format ``Explanation`` of ``pipeline.assemble_encoder`` (or its
compact form with ``top_k``):

- ``/v1/embeddings``: ``explain: {"target": ..., "mode": ..., "top_k": ...}``; the target is
  ``{"dimension": k}``, ``{"similarity": j}`` (input j of the same request: every other input
  is explained against it, and its own item's explanation is null), ``{"similarity": "text"}``
  (or token ids) or, on a sequence classifier, ``{"label": i}``.
- ``/score`` and ``/rerank``: ``explain: true`` or ``{"mode": ..., "top_k": ...}``: each score
  is explained. A bi-encoder's score is the cosine of the query's and the document's pooled
  embeddings: the explanation is the query's, its ``other`` the document's, each conserving half
  of the cosine (``target.value`` is the score). A cross-encoder's (a sequence classifier with
  one label) is the pair's label-0 logit (``target.value``; the score is its sigmoid).
- ``/v1/embeddings`` on an image–text model (CLIP, SigLIP): an image in chat ``messages``,
  explained by ``image_api.py``.
- ``POST /v1/explain`` on an encoder server takes ``prompt`` (text or token ids), an encoder
  ``target`` and, for a cross-encoder, ``text_pair``.

Errors are 400s in OpenAI's shape naming what is allowed; nothing heavy runs on the event loop
(tokenizing, planning and assembling run on the service's threads, the relevance on the worker:
``encoder_worker.py``).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Annotated, Any, Sequence

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest, EmbeddingRequest
from vllm.entrypoints.pooling.scoring.protocol import RerankRequest, ScoreRequest
from vllm.entrypoints.serve.utils.api_utils import validate_json_request, with_cancellation

from .. import pipeline
from ..engine.cost import explanation_gflop
from ..errors import ExplainInputError, PromptError, TargetError
from ..explanation import EncoderTargetSpec, Explanation
from .budget import GFLOP_ENV, encoder_need, shown_gflop
from .http import call_vllm, dumps, error_response, refused
from .image_api import image_embeddings
from .image_worker import IMAGE_KIND
from .metrics import get_metrics, observed
from .protocol import (
    ENCODER_KIND,
    USER_DESCRIPTION,
    CompactExplanation,
    Mode,
    TokenId,
    TopK,
    describe_errors,
)
from .service import ChoiceError, ExplainError, ExplainService, compact
from .webview import owner_of

logger = logging.getLogger("vllm_pelrp.serving")

# vLLM's pooling routes this module wraps, by the kind of request they take
ROUTES = {"/v1/embeddings": "embeddings", "/score": "score", "/v1/score": "score",
          "/rerank": "rerank", "/v1/rerank": "rerank", "/v2/rerank": "rerank"}
CANONICAL = {"embeddings": "/v1/embeddings", "score": "/score", "rerank": "/rerank"}
ENCODER_ROUTES_TEXT = "/v1/embeddings, /score, /rerank and /v1/explain"
EMBEDDING_TARGETS = ("{'dimension': k}, {'similarity': i} (input i of this request), "
                     "{'similarity': 'text'} (or token ids), or {'label': i} (a sequence "
                     "classifier)")
EXPLAIN_TARGETS = ("{'dimension': k}, {'similarity': 'text'} (or token ids) or {'label': i} "
                   "(a sequence classifier)")


# ---- request shapes ------------------------------------------------------------------------
class EmbeddingExplainOptions(BaseModel):
    """``explain`` on ``/v1/embeddings``."""

    model_config = ConfigDict(extra="forbid")

    target: EncoderTargetSpec = Field(
        description="{'dimension': k} (of the pooled embedding, before normalisation), "
        "{'similarity': i} (input i of the same request), {'similarity': 'text'} (or token ids) "
        "or {'label': i} (a sequence classifier).")
    mode: Mode = Field("pa-lrp", description="'pa-lrp', 'attnlrp' or 'cp-lrp'.")
    top_k: TopK | None = Field(None, description="Compact form: the top_k tokens by "
                               "|combined relevance| (and the other text's, for 'similarity').")


class ScoreExplainOptions(BaseModel):
    """``explain`` on ``/score`` and ``/rerank`` (``true`` means all defaults)."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = Field("pa-lrp", description="'pa-lrp', 'attnlrp' or 'cp-lrp'.")
    top_k: TopK | None = Field(None, description="Compact form (see /v1/embeddings).")


class EncoderExplainRequest(BaseModel):
    """``POST /v1/explain`` on a server of an encoder: explain one text's target."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = Field(None, description="Served model name (optional).")
    prompt: Annotated[StrictStr, Field(min_length=1)] | Annotated[
        list[TokenId], Field(min_length=1)] = Field(
        description="The text (tokenized with the model's special tokens, as vLLM does) or its "
        "token ids (taken as they are).")
    text_pair: Annotated[StrictStr, Field(min_length=1)] | None = Field(
        None, description="A cross-encoder's second text (with {'label': i}).")
    target: EncoderTargetSpec = Field(description=EXPLAIN_TARGETS)
    mode: Mode = "pa-lrp"
    top_k: TopK | None = None
    user: StrictStr | None = Field(None, description=USER_DESCRIPTION)


class EncoderCompactExplanation(CompactExplanation):
    """``top_k`` of an encoder explanation: the other text's too, for 'similarity'."""

    other: CompactExplanation | None = None


OPTION_FIELDS = {"explain": list(EmbeddingExplainOptions.model_fields)}
SCORE_FIELDS = {"explain": list(ScoreExplainOptions.model_fields)}


def parse_options(raw: Any, kind: str) -> EmbeddingExplainOptions | ScoreExplainOptions:
    """The ``explain`` value of a request of ``kind``; ``ExplainError`` (400) naming the field."""
    if kind == "embeddings":
        if raw is True or raw == {}:
            raise ExplainError(f"explain.target is required on /v1/embeddings; allowed: "
                               f"{EMBEDDING_TARGETS}", param="explain.target")
        model, fields = EmbeddingExplainOptions, OPTION_FIELDS
    else:
        raw = {} if raw is True else raw
        model, fields = ScoreExplainOptions, SCORE_FIELDS
    if not isinstance(raw, dict):
        raise ExplainError("explain must be an object like " + (
            '{"target": {"similarity": 1}, "mode": "pa-lrp"}' if kind == "embeddings"
            else '{"mode": "pa-lrp", "top_k": 5}, or true'), param="explain")
    if kind != "embeddings" and "target" in raw:
        raise ExplainError(f"explain.target is not taken on /{kind}: each score is explained "
                           "(a bi-encoder's cosine, a cross-encoder's logit); allowed fields: "
                           f"{', '.join(fields['explain'])}", param="explain.target")
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        errors = error.errors()
        loc = [str(p) for p in errors[0].get("loc") or () if isinstance(p, str)]
        raise ExplainError(describe_errors(errors, "explain", fields=fields,
                                           allowed={"target": EMBEDDING_TARGETS}),
                           param="explain" + ("." + loc[0] if loc else "")) from None


# ---- the routes ----------------------------------------------------------------------------
def serves_encoder(app: Any) -> bool:
    """Whether vLLM serves a pooling model on ``app`` (its pooling routes are there)."""
    paths = {route.path for route in app.routes if isinstance(route, APIRoute)}
    return "/pooling" in paths or bool(paths & set(ROUTES))


async def _asks_for_explanation(request: Request) -> bool:
    """Whether the body has a top-level ``explain`` that is not null or false (anything else,
    unparsable bodies included, is vLLM's)."""
    body = await request.body()  # cached: vLLM's handler reads it again
    if b'"explain"' not in body:
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("explain") not in (None, False)


def _pass_through_route(base: type[APIRoute], vllm_route: APIRoute) -> type[APIRoute]:
    """A route class whose requests without ``explain`` run vLLM's own ``vllm_route``."""

    class PassThroughRoute(base):  # type: ignore[misc, valid-type]
        original = vllm_route

        def get_route_handler(self):
            ours = super().get_route_handler()
            theirs = self.original.get_route_handler()

            async def route_handler(request: Request):
                if await _asks_for_explanation(request):
                    return await ours(request)
                return await theirs(request)

            return route_handler

    return PassThroughRoute


def attach(app: Any, router: APIRouter, route_class: type[APIRoute], responses: dict) -> bool:
    """Add the encoder routes to ``router`` where vLLM serves a pooling model on ``app``: the
    wrapped pooling routes and the encoder ``/v1/explain`` (which replaces the decoder one).
    Returns whether it did."""
    if not serves_encoder(app):
        return False
    handlers = EncoderHandlers()
    vllm_routes = {route.path: route for route in app.routes if isinstance(route, APIRoute)
                   and "POST" in route.methods and route.path in ROUTES}
    for kind, path in CANONICAL.items():
        if path in vllm_routes:
            endpoint = vllm_routes[path].endpoint
            # vLLM's handler without its own disconnect listener: ours covers the whole call
            handlers.original[kind] = getattr(endpoint, "__wrapped__", endpoint)

    @with_cancellation
    async def create_embedding(request: EmbeddingRequest, raw_request: Request):
        return await handlers.embeddings(request, raw_request)

    @with_cancellation
    async def create_score(request: ScoreRequest, raw_request: Request):
        return await handlers.scores(request, raw_request, "score")

    @with_cancellation
    async def create_rerank(request: RerankRequest, raw_request: Request):
        return await handlers.scores(request, raw_request, "rerank")

    endpoints = {"embeddings": create_embedding, "score": create_score, "rerank": create_rerank}
    for path, route in vllm_routes.items():
        kind = ROUTES[path]
        if kind not in handlers.original:
            continue
        router.add_api_route(
            path, endpoints[kind], methods=["POST"],
            dependencies=[Depends(validate_json_request)],
            responses={**(route.responses or {}), **{k: v for k, v in responses.items()
                                                     if k in (400, 401, 500)}},
            summary=route.summary, description=(route.description or "") + (
                "\n\nvllm-pelrp: add `explain` to explain each returned item "
                "(docs/serving.md, encoder models)."),
            route_class_override=_pass_through_route(route_class, route))

    router.routes[:] = [r for r in router.routes
                        if not (isinstance(r, APIRoute) and r.path == "/v1/explain")]

    class EncoderExplainRoute(route_class):  # type: ignore[misc, valid-type]
        def described(self):
            return {"": list(EncoderExplainRequest.model_fields)}, {"target": EXPLAIN_TARGETS}

    @with_cancellation
    async def explain(request: EncoderExplainRequest, raw_request: Request):
        """Explain one text's target (an encoder: dimension, similarity or label)."""
        return await handlers.explain_given(request, raw_request)

    router.add_api_route(
        "/v1/explain", explain, methods=["POST"], route_class_override=EncoderExplainRoute,
        responses={200: {"model": Explanation | EncoderCompactExplanation},
                   **{k: v for k, v in responses.items() if k in (400, 401, 500)}})
    return True


def decoder_route_refused(path: str, explain: Any) -> Response:
    """``/v1/completions`` or ``/v1/chat/completions`` on a server that does not serve them (a
    pooling model): vLLM's own 404 without ``explain``, a 400 naming the encoder routes with."""
    if explain is None:
        return JSONResponse({"detail": "Not Found"}, status_code=404)
    return error_response(
        f"{path} is not served here: this server runs an encoder (vLLM's pooling runner), "
        f"which generates nothing to explain; explanations are on {ENCODER_ROUTES_TEXT} "
        f"(targets {EXPLAIN_TARGETS})", 400, "explain")


# ---- the handlers --------------------------------------------------------------------------
def _service(raw_request: Request) -> ExplainService | None:
    return getattr(raw_request.app.state, "pelrp_service", None)


def _check_encoder(service: ExplainService) -> None:
    service.check_available()
    if service.info.get("kind") != ENCODER_KIND:
        raise ExplainError("this server's model is not an encoder; encoder explanations "
                           "(embeddings, scores) need BertModel, RobertaModel, XLMRobertaModel "
                           "or BertForSequenceClassification", param="explain")


def _text_or_ids(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value))


def embedding_inputs(request: Any) -> list[str | list[int]]:
    """The inputs of an embeddings request, as vLLM splits them (one text, texts, one list of
    token ids, lists of token ids); ``ExplainError`` for what an explanation cannot follow."""
    if not isinstance(request, EmbeddingCompletionRequest):
        raise ExplainError("explain needs `input` (text, texts or token ids); chat `messages` "
                           "are not explained", param="explain")
    for name, value, allowed in (("dimensions", request.dimensions, None),
                                 ("truncate_prompt_tokens", request.truncate_prompt_tokens, None),
                                 ("add_special_tokens", request.add_special_tokens, True)):
        if value != allowed:
            raise ExplainError(f"{name}={value!r} is not supported with explain (the explanation "
                               f"follows the full, untruncated input); leave {name} out",
                               param=name)
    if request.padding == "max_length":
        raise ExplainError("padding='max_length' is not supported with explain", param="padding")
    value = request.input
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(i, int) for i in value):
        return [list(value)]
    return [v if isinstance(v, str) else list(v) for v in value]


def score_pairs(request: Any, kind: str) -> list[tuple[str | list[int], str | list[int]]]:
    """(query, document) of each score, as vLLM pairs them: one query with every document, or
    the i-th with the i-th."""
    if kind == "rerank":
        queries, documents = request.query, request.documents
    else:
        queries, documents = request.data_1, request.data_2
    queries = queries if isinstance(queries, list) and not _text_or_ids(queries) else [queries]
    documents = documents if isinstance(documents, list) and not _text_or_ids(documents) \
        else [documents]
    for name, items in (("queries", queries), ("documents", documents)):
        if not all(isinstance(item, str) for item in items):
            raise ExplainError(f"explain needs text {name}; multimodal or other inputs are not "
                               "explained", param=name)
    for name in ("max_tokens_per_query", "max_tokens_per_doc"):
        if getattr(request, name, 0):
            raise ExplainError(f"{name} is not supported with explain (the explanation follows "
                               f"the full, untruncated texts); leave {name} out", param=name)
    if len(queries) != 1 and len(queries) != len(documents):
        return []  # vLLM refuses it (its own message)
    return [(queries[0 if len(queries) == 1 else i], document)
            for i, document in enumerate(documents)]


def check_target(target: dict[str, Any], info: dict[str, Any], inputs: int | None) -> None:
    """What can be told before anything runs: an index of another input, a dimension or a label
    out of range, a label on a model without a classifier head (``TargetError``)."""
    kind, value = next(iter(target.items()))
    if kind == "similarity" and isinstance(value, int) and not isinstance(value, bool):
        if inputs is None:
            raise TargetError("{'similarity': i} (another input of the request) is for "
                              "/v1/embeddings; here give the other text: {'similarity': 'text'}")
        if not 0 <= value < inputs:
            raise TargetError(f"similarity index {value} is out of range: the request has "
                              f"{inputs} input{'s' if inputs != 1 else ''}, allowed 0 to "
                              f"{inputs - 1}")
        if inputs < 2:
            raise TargetError("{'similarity': i} compares with another input of the request, "
                              "but it has only one; give {'similarity': 'text'} instead")
    if kind == "dimension":
        size = int(info.get("hidden_size") or 0)
        if size and not 0 <= value < size:
            raise TargetError(f"dimension {value} is out of range: the embedding has {size} "
                              f"dimensions, allowed 0 to {size - 1}")
    if kind == "label":
        labels = int(info.get("num_labels") or 0)
        if not labels:
            architectures = ", ".join(info.get("architectures") or []) or "this model"
            raise TargetError(f"{architectures} has no sequence-classification head, so "
                              "{'label': i} cannot be explained; allowed here: {'dimension': k} "
                              "or {'similarity': ...}")
        names = info.get("id2label") or {}
        if isinstance(value, int) and not 0 <= value < labels:
            shown = ", ".join(f"{i}: {names[i]!r}" for i in sorted(names)) if names else ""
            raise TargetError(f"label {value} is out of range: the classifier has {labels} "
                              f"labels, allowed 0 to {labels - 1}" + (f" ({shown})" if shown
                                                                      else ""))


def _prefixed(error: ExplainInputError, field: str, prefix: str = "explain.") -> ExplainError:
    """The 400 of a planning error, its param as the route names it (the text: ``field``)."""
    param = error.param
    param = field if param in ("text", "prompt") else prefix + param if param != field else param
    return ExplainError(str(error), 400, param)


class EncoderHandlers:
    """The encoder routes' work (one per app)."""

    def __init__(self) -> None:
        self.original: dict[str, Any] = {}  # vLLM's endpoint functions by kind

    # ---- /v1/embeddings ----------------------------------------------------------------------
    async def embeddings(self, request: Any, raw_request: Request):
        raw = (request.model_extra or {}).pop("explain", None)
        service = _service(raw_request)
        if service is None:
            return error_response("explanations are not initialised on this server", 500)
        if service.info.get("kind") == IMAGE_KIND:  # CLIP, SigLIP: an image (image_api.py)
            return await image_embeddings(service, self.original["embeddings"], request,
                                          raw_request, raw)
        try:
            options = parse_options(raw, "embeddings")
            _check_encoder(service)
            inputs = embedding_inputs(request)
            target = options.target.model_dump()
            check_target(target, service.info, len(inputs))
            _check_chars(service, sum(len(i) for i in inputs) + _target_chars(target), "input")
            plans = await service.offload(_plan_embeddings, service, inputs, options)
            _check_cost(service, [p for p in plans if p is not None])
        except ExplainInputError as error:
            return refused(_prefixed(error, "input"))
        except ExplainError as error:
            return refused(error)
        response = await call_vllm(self.original["embeddings"], request, raw_request)
        if not isinstance(response, JSONResponse) or response.status_code != 200:
            return response
        return await self._respond(service, response, "data", "index",
                                   dict(enumerate(plans)), options, raw_request, _user(request))

    # ---- /score and /rerank ----------------------------------------------------------------
    async def scores(self, request: Any, raw_request: Request, kind: str):
        raw = (request.model_extra or {}).pop("explain", None)
        service = _service(raw_request)
        if service is None:
            return error_response("explanations are not initialised on this server", 500)
        try:
            options = parse_options(raw, kind)
            _check_encoder(service)
            pairs = score_pairs(request, kind)
            _check_chars(service, sum(len(q) + len(d) for q, d in pairs), "documents")
            plans = await service.offload(_plan_pairs, service, pairs, options)
            _check_cost(service, plans if kind == "score" or not request.top_n else [])
        except ExplainInputError as error:
            return refused(_prefixed(error, "documents"))
        except ExplainError as error:
            return refused(error)
        response = await call_vllm(self.original[kind], request, raw_request)
        if not isinstance(response, JSONResponse) or response.status_code != 200:
            return response
        items = "data" if kind == "score" else "results"
        return await self._respond(service, response, items, "index", dict(enumerate(plans)),
                                   options, raw_request, _user(request))

    async def _respond(self, service: ExplainService, response: JSONResponse, items: str,
                       key: str, plans: dict[int, Any], options: Any, raw_request: Request,
                       user: str | None = None):
        body = json.loads(response.body)
        returned = [item.get(key) for item in body.get(items) or []]
        wanted = {i: plans[i] for i in returned if plans.get(i) is not None}
        if items == "results":  # rerank's top_n: only the returned documents cost anything
            try:
                _check_cost(service, list(wanted.values()))
            except ExplainError as error:
                return refused(error)
        try:
            explained = await explain_encoder(service, wanted, options,
                                              owner=owner_of(raw_request),
                                              user=user)
        except ExplainError as error:
            return refused(error)
        failed = [e for e in explained.values() if "error" in e]
        if failed and len(failed) == len(explained) and getattr(failed[0], "cause", None):
            return refused(failed[0].cause, "explain.")  # the request's fault, every item
        for item in body.get(items) or []:
            item["explanation"] = explained.get(item.get(key))
        headers = {k: v for k, v in response.headers.items()
                   if k.lower() not in ("content-length", "content-type")}
        return Response(await service.offload(dumps, body), media_type="application/json",
                        headers=headers)

    # ---- /v1/explain -------------------------------------------------------------------------
    async def explain_given(self, request: EncoderExplainRequest, raw_request: Request):
        service = _service(raw_request)
        if service is None:
            return error_response("explanations are not initialised on this server", 500)
        try:
            _check_encoder(service)
            target = request.target.model_dump()
            check_target(target, service.info, None)
            _check_chars(service, len(request.prompt) + len(request.text_pair or "")
                         + _target_chars(target), "prompt")
            plan = await service.offload(_plan, service, request.prompt, target, request.mode,
                                         request.text_pair)
            _check_cost(service, [plan])
        except ExplainInputError as error:
            return refused(_prefixed(error, "prompt", ""))
        except ExplainError as error:
            return refused(error)
        try:
            explained = await explain_encoder(service, {0: plan}, request,
                                              owner=owner_of(raw_request),
                                              user=_user(request))
        except ExplainError as error:
            return refused(error)
        result = explained[0]
        if "error" in result:
            cause = getattr(result, "cause", None)
            if cause is not None:
                return refused(cause)
            return error_response(result["error"], 500)
        return Response(await service.offload(dumps, result), media_type="application/json")


def _user(request: Any) -> str | None:
    """OpenAI's end-user field, where the request carries one (recorded with the explanations:
    the operator listing filters by it)."""
    user = getattr(request, "user", None)
    if user is None:
        user = (getattr(request, "model_extra", None) or {}).get("user")
    return user if isinstance(user, str) else None


def _target_chars(target: dict[str, Any]) -> int:
    value = next(iter(target.values()))
    return len(value) if isinstance(value, (str, list)) else 0


def _check_chars(service: ExplainService, chars: int, param: str) -> None:
    """Refuse, before tokenizing, text that surely costs more than the cap (``_check_cost``): a
    token is at most ``max_token_chars`` characters, so ``chars`` need at least
    ``chars / max_token_chars`` tokens (a token id counts as one character)."""
    shape = service.shape
    if shape is None:
        return
    least = -(-chars // service.max_token_chars)
    # work grows faster than the tokens (attention): `least` one-token texts cost the least
    gflop = least * explanation_gflop(shape, 1, 1, from_ids=True)
    if gflop > service.max_gflop:
        raise ExplainError(
            f"{param}: {chars:,} characters to explain, at least {least:,} tokens and "
            f"{shown_gflop(gflop)} GFLOP of forward and backward passes, over the server's cap "
            f"of {shown_gflop(service.max_gflop)} GFLOP ({GFLOP_ENV}); explain fewer or "
            "shorter texts", param=param)


# ---- plans, jobs, results ------------------------------------------------------------------
def _plan(service: ExplainService, text: str | list[int], target: dict[str, Any], mode: str,
          text_pair: str | None = None) -> pipeline.EncoderPlan:
    info = service.info
    limits = [int(v) for v in (info.get("max_model_len"), info.get("max_positions")) if v]
    return pipeline.plan_encoder(
        service.tokenizer, text, target, mode=mode, text_pair=text_pair,
        vocab_size=int(info["vocab_size"]), max_length=min(limits) if limits else None,
        has_token_types=bool(info.get("type_vocab_size")),
        label_names={int(k): v for k, v in (info.get("id2label") or {}).items()} or None)


def _plan_embeddings(service: ExplainService, inputs: Sequence[str | list[int]],
                     options: EmbeddingExplainOptions) -> list[pipeline.EncoderPlan | None]:
    """Each input's plan; the input that a {'similarity': i} target names gets None."""
    target = options.target.model_dump()
    kind, value = next(iter(target.items()))
    index = value if kind == "similarity" and isinstance(value, int) else None
    plans: list[pipeline.EncoderPlan | None] = []
    for number, text in enumerate(inputs):
        if number == index:
            plans.append(None)
            continue
        resolved = {"similarity": inputs[index]} if index is not None else target
        try:
            plans.append(_plan(service, text, resolved, options.mode))
        except PromptError as error:
            if error.param == "target" and index is not None:  # the other text is an input
                number = index
            raise PromptError(f"input {number}: {error}", "text") from None
    return plans


def _plan_pairs(service: ExplainService, pairs: Sequence[tuple[Any, Any]],
                options: ScoreExplainOptions) -> list[pipeline.EncoderPlan]:
    """Each pair's plan: the cosine of a bi-encoder, label 0 of a cross-encoder."""
    cross = bool(service.info.get("num_labels"))
    plans = []
    for number, (query, document) in enumerate(pairs):
        try:
            if cross:
                plans.append(_plan(service, query, {"label": 0}, options.mode, document))
            else:
                plans.append(_plan(service, query, {"similarity": document}, options.mode))
        except PromptError as error:
            raise PromptError(f"pair {number}: {error}", "text") from None
    return plans


def _check_cost(service: ExplainService, plans: Sequence[pipeline.EncoderPlan]) -> None:
    """Refuse work over the server's cap (``VLLM_PELRP_MAX_EXPLAIN_GFLOP``): each encoder text
    costs one forward and one backward over its tokens, with one target row, but a query that
    several documents share (``pipeline.encoder_passes``): once, with a row per document."""
    shape = service.shape
    if shape is None:
        return
    passes = [p for group in pipeline.encoder_passes(plans) for p in group]
    gflop = sum(explanation_gflop(shape, rows, tokens, from_ids=True) for rows, tokens in passes)
    if gflop > service.max_gflop:
        raise ExplainError(
            f"explaining this request costs {shown_gflop(gflop)} GFLOP of forward and backward "
            f"passes ({len(plans)} explanations, {sum(t for _, t in passes):,} tokens), over the "
            f"server's cap of {shown_gflop(service.max_gflop)} GFLOP ({GFLOP_ENV}); explain "
            "fewer or shorter texts (rerank: top_n)", param="explain")


async def run_encoder_jobs(service: ExplainService, jobs: list[pipeline.EncoderJob]
                           ) -> list[pipeline.EncoderResult | dict[str, Any]]:
    """The jobs on the worker (``pelrp_encoder_submit``, then ``pelrp_poll``): each an
    ``EncoderResult`` or the worker's ``{"error", "input_error", "param"}``."""
    reply = await service.on_worker("pelrp_encoder_submit", jobs)

    def parse() -> list[pipeline.EncoderResult | dict[str, Any]]:
        out: list[pipeline.EncoderResult | dict[str, Any]] = []
        for item in reply["results"]:
            queued = item.pop("queue_seconds", None)
            if queued is not None:
                get_metrics().queue_wait.observe(queued)
            out.append(item if "error" in item else pipeline.EncoderResult.model_validate(item))
        return out

    return await service.offload(parse)


@observed  # metrics, ids and the web view's store (serving/metrics.py)
async def explain_encoder(service: ExplainService, plans: dict[int, pipeline.EncoderPlan],
                          options: Any, owner: str | None = None, user: str | None = None,
                          ) -> dict[int, dict[str, Any]]:
    """Explanations (wire dicts) by item index; an item whose job failed gets a
    ``ChoiceError`` (``cause``: the request's ``ExplainInputError``, when it was at fault)."""
    if not plans:
        return {}
    indices = list(plans)
    key = uuid.uuid4().hex  # holds the memory budget while the jobs run
    shape = service.shape
    if shape is not None:
        service.admit_memory(key, (), need=encoder_need(
            shape, pipeline.encoder_passes([plans[i] for i in indices])))
    try:
        results = await run_encoder_jobs(service, [pipeline.encoder_job(plans[i])
                                                   for i in indices])
    finally:
        service.unreserve(key)

    def wire() -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for index, result in zip(indices, results):
            if isinstance(result, dict):
                cause = None
                if result.get("input_error"):
                    cause = TargetError(result["error"], "target")
                out[index] = ChoiceError(result["error"], cause)
                continue
            explanation = pipeline.assemble_encoder(plans[index], result,
                                                    model=service.model_name)
            out[index] = to_wire(explanation, getattr(options, "top_k", None))
        return out

    return await service.offload(wire)


def to_wire(explanation: Explanation, top_k: int | None) -> dict[str, Any]:
    if not top_k:
        return explanation.model_dump(mode="json")
    short = compact(explanation, top_k)
    other = compact(explanation.other, top_k) if explanation.other is not None else None
    return EncoderCompactExplanation(**short.model_dump(), other=other).model_dump(mode="json")
