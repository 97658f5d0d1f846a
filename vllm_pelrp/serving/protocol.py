"""Wire-format additions of the vLLM plugin: the ``explain`` request object, the ``/v1/explain``
request, the compact explanation (``top_k``) and the request models that document them.

Pure pydantic; imported by the API process only (never by the worker).
"""

from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..explanation import MODES, Conservation, Grounding, SpanTarget
from ..grounding import MAX_DOCUMENTS, MAX_SOURCES, SourceSpec, check_documents

EXPLAIN_TARGETS = "'completion', 'per_token' or {'span': [i, j]}"


def _checked_documents(value: list[str] | None) -> list[str] | None:
    """The ``documents`` field of both request models: each document a non-empty string."""
    if value is not None:
        check_documents(value)
    return value


class ExplainOptions(BaseModel):
    """Ask for a PA-LRP explanation of each choice (``extra_body={"explain": {...}}``)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["pa-lrp", "attnlrp", "cp-lrp"] = Field(
        "pa-lrp",
        description="Attribution rules: 'pa-lrp' (positional-aware LRP: relevance reaches RoPE "
        "positions), 'attnlrp' (positions are constants) or 'cp-lrp' (attention weights constant).",
    )
    target: Union[Literal["completion", "per_token"], SpanTarget] = Field(
        "completion",
        description="What is explained: 'completion' (sum of the completion tokens' logits), "
        "'per_token' (one row per completion token, in `rows`) or {'span': [i, j]} (completion "
        "tokens i <= k < j).",
    )
    per_layer: bool = Field(
        False, description="Include the positional relevance of every layer (cos and sin parts)."
    )
    top_k: int | None = Field(
        None, ge=1, le=4096,
        description="Compact form: instead of the full Explanation, return its top_k tokens by "
        "|combined relevance| (a CompactExplanation).",
    )
    documents: list[str] | None = Field(
        None, min_length=1, max_length=MAX_DOCUMENTS,
        description="Retrieved documents. The server renders them into the prompt before "
        "generation with the documented template (chat: into the last user message; completions: "
        "before the prompt text) and reports each one's share in `explanation.grounding`.",
    )
    sources: list[SourceSpec] | None = Field(
        None, min_length=1, max_length=MAX_SOURCES,
        description="Sources already in the prompt: {'message': i} (a chat message), {'text': "
        "'...'} (an exact substring), {'chars': [a, b]} (characters of the prompt as "
        "`explanation.text` shows it), optionally with 'name'; message + text/chars searches "
        "inside that message.",
    )
    grounding_threshold: float | None = Field(
        None, ge=0.0, le=1.0,
        description="`grounding.low_grounding` is set when the grounding score is below this "
        "(default: the server's --grounding-threshold, 0.3).",
    )
    sentences: bool = Field(
        True, description="With sources: explain each completion sentence as a span target (in "
        "the same batched backward) and list the sources that support it.",
    )

    _documents = field_validator("documents")(_checked_documents)


class ExplainRequest(BaseModel):
    """``POST /v1/explain``: explain a given prompt and completion without generating."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Served model name (optional).")
    prompt: str | list[int] | None = Field(
        None, description="Prompt text (tokenised as is, no chat template) or prompt token ids."
    )
    messages: list[dict[str, Any]] | None = Field(
        None, description="Chat messages; rendered with the chat template and generation prompt."
    )
    completion: str | list[int] = Field(
        "", description="Completion text (tokenised without special tokens) or token ids."
    )
    mode: Literal["pa-lrp", "attnlrp", "cp-lrp"] = "pa-lrp"
    target: Union[Literal["completion", "per_token", "next"], SpanTarget] = Field(
        "completion",
        description="As in `explain.target`, plus 'next': the model's argmax next token after "
        "prompt + completion.",
    )
    per_layer: bool = False
    top_k: int | None = Field(None, ge=1, le=4096)
    documents: list[str] | None = Field(
        None, min_length=1, max_length=MAX_DOCUMENTS,
        description="As in `explain.documents`: rendered into the last user message, or before "
        "the prompt text (not with prompt token ids).",
    )
    sources: list[SourceSpec] | None = Field(
        None, min_length=1, max_length=MAX_SOURCES, description="As in `explain.sources`.")
    grounding_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="As in `explain.grounding_threshold`.")
    sentences: bool = Field(True, description="As in `explain.sentences`.")

    _documents = field_validator("documents")(_checked_documents)


class TopToken(BaseModel):
    index: int
    id: int
    text: str
    role: Literal["prompt", "completion"]
    combined_relevance: float
    token_relevance: float
    positional_relevance: float


class CompactExplanation(BaseModel):
    """``explain.top_k``: the explanation reduced to its most relevant tokens."""

    model: str
    mode: str
    target: dict[str, Any]
    target_logit: float
    prompt_length: int
    num_tokens: int
    positional_share: float
    conservation: Conservation
    top_tokens: list[TopToken] = Field(description="top_k tokens by |combined_relevance|.")
    grounding: Grounding | None = Field(
        None, description="As in the full Explanation: present when sources were declared.")


def parse_explain(value: Any, where: str = "explain") -> ExplainOptions:
    """Validate an ``explain`` value (a dict, or a JSON string when sent in ``vllm_xargs``);
    raises ``ValueError`` with a readable message."""
    if isinstance(value, ExplainOptions):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error})") from None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object like {{\"mode\": \"pa-lrp\", "
                         "\"target\": \"completion\"}")
    if "mode" in value and value["mode"] not in MODES:
        raise ValueError(f"{where}.mode: unknown mode {value['mode']!r}; allowed: {', '.join(MODES)}")
    try:
        return ExplainOptions.model_validate(value)
    except ValidationError as error:
        raise ValueError(f"{where}: " + validation_message(error, EXPLAIN_TARGETS)) from None


def validation_message(error: ValidationError, targets: str) -> str:
    parts = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"] if not str(p).startswith(("literal[", "function")))
        if loc.startswith("target"):
            parts.append(f"target: expected {targets}")
        else:
            message = str(item["msg"]).removeprefix("Value error, ")
            parts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(dict.fromkeys(parts))


def extract_explain(body: dict[str, Any]) -> tuple[ExplainOptions | None, dict[str, Any]]:
    """Take ``explain`` out of a request body (top level, or ``vllm_xargs.explain``).

    Returns the options (None if not asked) and the body without them."""
    body = dict(body)
    raw = body.pop("explain", None)
    where = "explain"
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, dict) and "explain" in xargs:
        xargs = dict(xargs)
        from_xargs = xargs.pop("explain")
        body["vllm_xargs"] = xargs or None
        if raw is None:
            raw, where = from_xargs, "vllm_xargs.explain"
    if raw is None or raw is False:
        return None, body
    return parse_explain(raw, where), body
