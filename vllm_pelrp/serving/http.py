"""What every route of the plugin shares: OpenAI's error shape and the route class that answers
in it, for the decoder routes (``api.py``), the encoder routes (``encoder_api.py``) and the web
view's data routes (``webview.py``).

Errors are ``{"error": {"message", "type", "param", "code"}}``. A user's error (4xx) names the
field at fault and what is allowed; an internal failure (5xx: an exception of the worker, the
engine or this package) reaches the client as a generic message with an error id, its text and
traceback only the server's log (``failures.py``).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException  # what FastAPI raises (fastapi's subclasses it)

from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from ..errors import ExplainInputError
from .failures import internal_failure
from .protocol import EXPLAIN_REQUEST_TARGETS, UNION_FIELDS, ExplainRequest, describe_errors
from .service import ExplainError

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
               404: "NotFoundError", 429: "TooManyRequests", 500: "InternalServerError"}


def error_response(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": ERROR_TYPES.get(
        status, "BadRequestError"), "param": param, "code": status}}, status_code=status)


def internal_error_response(what: str, error: BaseException | None = None) -> JSONResponse:
    """A 500 for an internal failure: the client gets a generic message and an error id; the
    log gets the id, the exception's text and its traceback."""
    return error_response(internal_failure(what, error), 500)


def refused(error: ExplainError | ExplainInputError, prefix: str = "") -> JSONResponse:
    """The answer to a refused request: an ``ExplainError`` as it says; the user's
    ``ExplainInputError`` (by its type, whatever its message) a 400 naming its field, under
    ``prefix`` (where the route keeps the explain fields: "explain." in a completions request)."""
    if isinstance(error, ExplainInputError):
        error = ExplainError.of_input(error, prefix)
    return error_response(error.message, error.status, error.param)


class UnauthorizedResponse(BaseModel):
    """vLLM's answer to a request under ``/v1`` without a valid ``--api-key`` bearer token."""

    error: str = Field(description="'Unauthorized'")


ERRORS = {  # the 4xx/5xx answers of the plugin's routes, documented in the OpenAPI schema
    400: {"model": ErrorResponse, "description": "The request is invalid: the message names the "
          "field, what was wrong and what is allowed."},
    401: {"model": UnauthorizedResponse, "description": "The server runs with --api-key and the "
          "request has no valid `Authorization: Bearer` key (vLLM's own answer)."},
    403: {"model": ErrorResponse, "description": "Not allowed (the operator listing)."},
    404: {"model": ErrorResponse, "description": "No such explanation that the caller may read."},
    429: {"model": ErrorResponse, "description": "The recording memory or the explanation memory "
          "budget is held by other explanations in flight; retry later."},
    500: {"model": ErrorResponse, "description": "The explanation failed inside the server: a "
          "generic message with an error id (the server's log has the details under it)."},
}


def documented_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: ERRORS[code] for code in codes}


def _vllms_errors() -> tuple[type[BaseException], ...]:
    """vLLM's own error types, which its exception handlers answer: ``VLLMError`` (a request
    that vLLM's request models refuse while the body is read, say, a 400 naming the parameter)
    and the engine's errors (a dead engine stops the server). Never swallowed here: the plugin
    raises none of them."""
    found: list[type[BaseException]] = []
    try:
        from vllm.exceptions import VLLMError

        found.append(VLLMError)
    except ImportError:  # pragma: no cover - another vLLM layout
        pass
    try:
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        found += [EngineDeadError, EngineGenerateError]
    except ImportError:  # pragma: no cover - another vLLM layout
        pass
    return tuple(found)


VLLM_ERROR = "pelrp_vllm_error"  # request.state: what vLLM's own endpoint raised


async def call_vllm(endpoint: Any, request: Any, raw_request: Request) -> Any:
    """vLLM's own ``endpoint`` for ``request``: what it raises stays vLLM's to answer, by its
    app's exception handlers as without the plugin (a 400 for a ValueError, say), not by the
    route class's generic 500."""
    try:
        return await endpoint(request, raw_request)
    except Exception as error:
        setattr(raw_request.state, VLLM_ERROR, error)
        raise


class OpenAIErrorRoute(APIRoute):
    """The plugin's routes: a body that cannot be parsed or validated is answered in OpenAI's
    error shape with a plain message that names the field, not with FastAPI's ``{"detail":
    ...}`` or a Python repr of pydantic's errors; an unexpected exception of the plugin is a 500
    with an error id, its text kept for the log. vLLM's own errors (``VLLMError``, the engine's)
    and whatever vLLM's endpoint raises (``call_vllm``) go on to vLLM's exception handlers."""

    def described(self) -> tuple[dict[str, list[str]], dict[str, str]]:
        """The body's fields by place, and what a field allows, for the messages."""
        if self.path == "/v1/explain":
            return {"": list(ExplainRequest.model_fields)}, {"target": EXPLAIN_REQUEST_TARGETS}
        return {}, {}

    def get_route_handler(self):
        handler = super().get_route_handler()
        fields, allowed = self.described()
        vllms_errors = _vllms_errors()
        path = self.path

        async def route_handler(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as error:
                errors = list(error.errors())
                message = describe_errors(errors, fields=fields, allowed=allowed)
                return error_response(message or "the request is invalid", 400,
                                      _first_param(errors))
            except HTTPException as error:  # e.g. "There was an error parsing the body"
                if error.status_code >= 500:
                    return internal_error_response(f"{request.method} {path}", error)
                return error_response(f"{error.detail}: the request body must be a JSON object "
                                      "in UTF-8 (Content-Type: application/json)"
                                      if error.status_code == 400 else str(error.detail),
                                      error.status_code)
            except Exception as error:  # noqa: BLE001 - answered without its text
                if isinstance(error, vllms_errors) or \
                        getattr(request.state, VLLM_ERROR, None) is error:
                    raise  # vLLM's: its exception handlers answer, as without the plugin
                return internal_error_response(f"{request.method} {path}", error)

        return route_handler


def _first_param(errors: list[dict[str, Any]]) -> str | None:
    for item in errors:
        cause = (item.get("ctx") or {}).get("error")
        if getattr(cause, "param", None):
            return cause.param
        names = [str(p) for p in item.get("loc") or () if isinstance(p, str) and p != "body"
                 and p.isidentifier()]
        if names and names[0] in UNION_FIELDS:  # not a branch of the union ("SpanTarget")
            return names[0]
        if names:
            return ".".join(names[:2])
    return None


def dumps(body: Any) -> str:
    """JSON as FastAPI's JSONResponse writes it (run on the service's threads: an explanation
    can be large)."""
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
