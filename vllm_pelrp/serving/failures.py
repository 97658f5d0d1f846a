"""Internal failures, told apart from the user's errors: what a client sees of them and what the
server's log keeps.

A user's error (a 400) names the field and what is allowed: the client can act on it. An internal
failure (an exception of the worker, the engine or this package) is no business of the client,
and its text can carry paths, tensor shapes or parts of other requests: the client gets a generic
message with an error id, and the log gets the id with the full text and traceback
(``internal_failure``), so the operator can find one from the other. Used in the API process and on
the workers (whose log lines go where vLLM's go). No HTTP and no tensors here.
"""

from __future__ import annotations

import logging
import secrets
import sys

logger = logging.getLogger("vllm_pelrp.serving")
ERROR_ID_PREFIX = "err-"


class JobCancelled(Exception):
    """Raised at a checkpoint of a backward whose client went away (``pelrp_cancel``)."""


class SetupError(RuntimeError):
    """The server is set up in a way that cannot serve explanations (pipeline parallelism, a
    compiled model without the recording op, ...): the message is meant for its clients, who get
    it in every refused request."""


def new_error_id() -> str:
    return ERROR_ID_PREFIX + secrets.token_hex(8)


def internal_failure(what: str, error: BaseException | None = None) -> str:
    """Log ``error`` (default: the exception being handled), with its traceback, under a new
    error id, and return the message a client gets instead of its text. ``what``: what failed,
    in a few words ("the explanation", "setting up explanations")."""
    if error is None:
        error = sys.exc_info()[1]
    error_id = new_error_id()
    logger.error("vllm-pelrp: %s failed (error id %s): %s", what, error_id,
                 "" if error is None else f"{type(error).__name__}: {error}", exc_info=error)
    return client_message(what, error_id)


def client_message(what: str, error_id: str) -> str:
    return (f"internal server error: {what} failed (error id {error_id}); the server's log has "
            "the details under this id")
