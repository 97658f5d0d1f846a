"""Wire-format additions of the vLLM plugin: the ``explain`` request object, the ``/v1/explain``
request, the compact explanation (``top_k``) and the request models that document them.

Pure pydantic; imported by the API process only (never by the worker).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from ..explanation import MODES, Conservation, Grounding, SpanTarget, whole_number
from ..grounding import MAX_DOCUMENTS, MAX_SOURCES, SourceSpec
from .keys import RESERVED_PREFIX

# ``ExplainService.info["kind"]`` of a worker that explains encoders (encoder_worker.py)
ENCODER_KIND = "encoder"

EXPLAIN_TARGETS = "'completion', 'per_token' or {'span': [i, j]}"
EXPLAIN_REQUEST_TARGETS = "'next', 'completion', 'per_token' or {'span': [i, j]}"

# Strict types throughout: a string where a number or true/false belongs is refused, not
# converted ("3" is not 3; 3.0 is JSON Schema's integer 3), and NaN or infinity is no number.
Document = Annotated[StrictStr, StringConstraints(pattern=r"\S")]
Documents = Annotated[list[Document], Field(min_length=1, max_length=MAX_DOCUMENTS)]
Sources = Annotated[list[SourceSpec], Field(min_length=1, max_length=MAX_SOURCES)]
Threshold = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False, strict=True)]
TopK = whole_number(ge=1, le=4096)
TokenId = whole_number(ge=0)
Mode = Literal["pa-lrp", "attnlrp", "cp-lrp"]

# What each field allows, appended to its validation error ("allowed: ...").
ALLOWED = {
    "mode": ", ".join(repr(m) for m in MODES),
    "target": EXPLAIN_TARGETS,
    "per_layer": "true or false",
    "sentences": "true or false",
    "top_k": "a whole number from 1 to 4096, or null",
    "grounding_threshold": "a number from 0 to 1, or null",
    "documents": f"a list of 1 to {MAX_DOCUMENTS} strings, each with some non-space text",
    "sources": f"a list of 1 to {MAX_SOURCES} objects, each with 'message' (a message index), "
               "'text' (an exact substring) or 'chars' ([start, end]), and an optional 'name'",
    "role": "'system', 'user', 'assistant', 'tool' or 'developer'",
    "content": "a string, or a list of {'type': 'text', 'text': ...} parts",
    "prompt": "a string or a list of token ids (whole numbers >= 0)",
    "completion": "a string or a list of token ids (whole numbers >= 0)",
}


class ExplainOptions(BaseModel):
    """Ask for a PA-LRP explanation of each choice (``extra_body={"explain": {...}}``)."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = Field(
        "pa-lrp",
        description="Attribution rules: 'pa-lrp' (positional-aware LRP: relevance reaches RoPE "
        "positions), 'attnlrp' (positions are constants) or 'cp-lrp' (attention weights constant).",
    )
    target: Union[Literal["completion", "per_token"], SpanTarget] = Field(
        "completion",
        description="What is explained: 'completion' (sum of the completion tokens' logits), "
        "'per_token' (one row per completion token, in `rows`; at most 64, so max_tokens must "
        "not exceed 64) or {'span': [i, j]} (completion tokens i <= k < j).",
    )
    per_layer: StrictBool = Field(
        False, description="Include the positional relevance of every layer (cos and sin parts)."
    )
    top_k: TopK | None = Field(
        None,
        description="Compact form: instead of the full Explanation, return its top_k tokens by "
        "|combined relevance| (a CompactExplanation).",
    )
    documents: Documents | None = Field(
        None,
        description="Retrieved documents. The server renders them into the prompt before "
        "generation with the documented template (chat: into the last user message; completions: "
        "before the prompt text) and reports each one's share in `explanation.grounding`.",
    )
    sources: Sources | None = Field(
        None,
        description="Sources already in the prompt: {'message': i} (a chat message), {'text': "
        "'...'} (an exact substring), {'chars': [a, b]} (characters of the prompt as "
        "`explanation.text` shows it), optionally with 'name'; message + text/chars searches "
        "inside that message.",
    )
    grounding_threshold: Threshold | None = Field(
        None,
        description="`grounding.low_grounding` is set when the grounding score is below this "
        "(default: the server's --grounding-threshold, 0.3).",
    )
    sentences: StrictBool = Field(
        True, description="With sources: explain each completion sentence as a span target (in "
        "the same batched backward) and list the sources that support it.",
    )


class TextPart(BaseModel):
    """A text content part of a chat message (OpenAI's ``{"type": "text", "text": ...}``)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ExplainMessage(BaseModel):
    """A chat message of ``/v1/explain``: rendered with the model's chat template."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[TextPart] = Field(
        description="The text, or text parts (joined with a newline, as vLLM joins them).")
    name: StrictStr | None = None

    def as_template_input(self) -> dict[str, Any]:
        content = self.content if isinstance(self.content, str) else "\n".join(
            part.text for part in self.content)
        message = {"role": self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        return message


USER_DESCRIPTION = ("OpenAI's end-user field: who, behind the API key, asked. Recorded with the "
                    "explanation; the operator listing (GET /v1/explanations?user=…) filters by "
                    "it.")


class ExplainRequest(BaseModel):
    """``POST /v1/explain``: explain a given prompt and completion without generating.

    Exactly one of ``prompt`` and ``messages``. Without ``completion`` the target defaults to
    ``'next'``; every other target needs a completion."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            # what the server enforces beyond the fields' own types
            "oneOf": [{"required": ["prompt"], "not": {"required": ["messages"]}},
                      {"required": ["messages"], "not": {"required": ["prompt"]}}],
            "if": {"required": ["target"],
                   "properties": {"target": {"not": {"const": "next"}}}},
            "then": {"required": ["completion"]},
        },
    )

    model: StrictStr | None = Field(None, description="Served model name (optional).")
    # no None in the type: null is refused, as the schema says; absent means not given
    prompt: Annotated[StrictStr, Field(min_length=1)] | Annotated[
        list[TokenId], Field(min_length=1)] = Field(
        None, description="Prompt text (tokenised as is, no chat template) or prompt token ids.",
        validate_default=False)
    messages: Annotated[list[ExplainMessage], Field(min_length=1)] = Field(
        None, description="Chat messages; rendered with the chat template and generation prompt.",
        validate_default=False)
    completion: Annotated[StrictStr, Field(min_length=1)] | Annotated[
        list[TokenId], Field(min_length=1)] = Field(
        None, description="Completion text (tokenised without special tokens) or token ids. "
        "Without it, only the target 'next' can be explained.", validate_default=False)
    mode: Mode = "pa-lrp"
    target: Union[Literal["completion", "per_token", "next"], SpanTarget] = Field(
        None,
        description="As in `explain.target`, plus 'next': the model's argmax next token after "
        "prompt + completion. Default: 'completion' when a completion is given, else 'next'.",
        validate_default=False,
    )
    per_layer: StrictBool = False
    top_k: TopK | None = None
    documents: Documents | None = Field(
        None, description="As in `explain.documents`: rendered into the last user message, or "
        "before the prompt text (not with prompt token ids).")
    sources: Sources | None = Field(None, description="As in `explain.sources`.")
    grounding_threshold: Threshold | None = Field(
        None, description="As in `explain.grounding_threshold`.")
    sentences: StrictBool = Field(True, description="As in `explain.sentences`.")
    user: StrictStr | None = Field(None, description=USER_DESCRIPTION)

    @model_validator(mode="after")
    def _consistent(self) -> "ExplainRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages"
                             + ("" if self.prompt is None else ", not both"))
        if self.target is None:
            self.target = "completion" if self.completion is not None else "next"
        if self.target != "next" and self.completion is None:
            raise ValueError(f"target {_show(self.target)} needs a completion; give "
                             "completion, or use target 'next'")
        if self.documents is not None and isinstance(self.prompt, list):
            raise ValueError("documents are rendered into a text prompt or messages; with "
                             "prompt token ids, mark the sources with sources=[{'chars': [a, b]}]")
        if self.messages is None and any(s.message is not None for s in self.sources or []):
            raise ValueError("sources: 'message' needs messages; with a prompt, mark the sources "
                             "with 'text' or 'chars'")
        return self

    def template_messages(self) -> list[dict[str, Any]] | None:
        return None if self.messages is None else [m.as_template_input() for m in self.messages]


def _show(target: Any) -> str:
    return repr(target) if isinstance(target, str) else json.dumps(target.model_dump())


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


class ExplainValueError(ValueError):
    """A bad ``explain`` value; its message already names the field (``explain.…``), and
    ``param`` is that field."""

    def __init__(self, message: str, param: str = "explain") -> None:
        super().__init__(message)
        self.param = param


def parse_explain(value: Any, where: str = "explain") -> ExplainOptions:
    """Validate an ``explain`` value (a dict, or a JSON string when sent in ``vllm_xargs``);
    raises ``ExplainValueError`` with a readable message that names the field."""
    if isinstance(value, ExplainOptions):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ExplainValueError(f"{where}: not valid JSON ({error})", where) from None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ExplainValueError(f"{where} must be an object like {{\"mode\": \"pa-lrp\", "
                                "\"target\": \"completion\"}")
    if "mode" in value and value["mode"] not in MODES:
        raise ExplainValueError(f"{where}.mode: unknown mode {_summary(value['mode'])}; "
                                f"allowed: {ALLOWED['mode']}", f"{where}.mode")
    try:
        return ExplainOptions.model_validate(value)
    except ValidationError as error:
        errors = error.errors()
        raise ExplainValueError(describe_errors(errors, where),
                                _loc(tuple(errors[0]["loc"]), where).split("[")[0]) from None


def extract_explain(body: dict[str, Any]) -> tuple[ExplainOptions | None, dict[str, Any]]:
    """Take ``explain`` out of a request body (top level, or ``vllm_xargs.explain``) and drop
    every client-sent ``pelrp_*`` field of ``vllm_xargs`` (those are the server's own: the
    worker records only requests the server tagged itself, ``keys.py``).

    Returns the options (None if not asked) and the body without them. Refuses an ``explain``
    given in both places unless the two are the same."""
    body = dict(body)
    raw = body.pop("explain", None)
    where = "explain"
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, dict):
        xargs = {k: v for k, v in xargs.items() if not str(k).startswith(RESERVED_PREFIX)}
        if "explain" in xargs:
            from_xargs = xargs.pop("explain")
            if raw is None or raw is False:
                raw, where = from_xargs, "vllm_xargs.explain"
            elif from_xargs is not None and from_xargs is not False:
                if parse_explain(raw) != parse_explain(from_xargs, "vllm_xargs.explain"):
                    raise ExplainValueError(
                        "explain is given twice, as explain and as vllm_xargs.explain, and the "
                        "two differ; give it once", "vllm_xargs.explain")
        body["vllm_xargs"] = xargs or None
    if raw is None or raw is False:
        return None, body
    return parse_explain(raw, where), body


# ---- readable validation errors -----------------------------------------------------------
# pydantic-core's names for the schema layers it passes through; not field names
_INTERNAL_LOC = {"function-after", "function-before", "function-wrap", "function-plain",
                 "json-or-python", "lax-or-strict", "chain", "tagged-union", "union",
                 "nullable", "default", "str", "int", "float", "bool", "list", "dict", "tuple",
                 "none", "body", "constrained-str", "constrained-list", "literal"}
# fields whose type is a union: one message for all the branches' errors
UNION_FIELDS = ("target", "prompt", "completion", "content")
MAX_REPORTED = 5


def _loc(parts: tuple[Any, ...], where: str | None) -> str:
    out = where or ""
    for number, part in enumerate(parts):
        if part in UNION_FIELDS and not any(isinstance(p, str) and p in UNION_FIELDS
                                            for p in parts[:number]):
            return f"{out}.{part}" if out else str(part)  # the union's own place
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = str(part)
        if (text in _INTERNAL_LOC or any(c in text for c in "[(,'")
                or text[:1].isupper()):  # a layer, a union branch or a model name
            continue
        out = f"{out}.{text}" if out else text
    return out


def _summary(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str) if len(value) <= 8 else \
            f"a {type(value).__name__} of {len(value)} items"
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_errors(errors: list[dict[str, Any]], where: str | None = None,
                    fields: dict[str, list[str]] | None = None,
                    allowed: dict[str, str] | None = None) -> str:
    """A plain message from pydantic's (or FastAPI's) validation errors: each names the field,
    what was wrong with the value and, for the explain fields, what is allowed. ``fields``:
    the field names of the objects at some places (for unknown fields), by place."""
    fields = {"explain": list(ExplainOptions.model_fields),
              "vllm_xargs.explain": list(ExplainOptions.model_fields), **(fields or {})}
    allowed = {**ALLOWED, **(allowed or {})}
    grouped: dict[str, list[dict[str, Any]]] = {}
    for item in errors:
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, ExplainValueError):  # already a full message
            grouped.setdefault(str(cause), [])
            continue
        grouped.setdefault(_loc(tuple(item.get("loc") or ()), where), []).append(item)
    parts = []
    for loc, items in list(grouped.items())[:MAX_REPORTED]:
        if not items:
            parts.append(loc)
            continue
        first = items[0]
        if first.get("type") == "json_invalid":
            error = (first.get("ctx") or {}).get("error", "")
            parts.append(f"the request body is not valid JSON ({error}); send a JSON object")
            continue
        field = loc.rsplit(".", 1)[-1].split("[", 1)[0]
        if first.get("type") == "extra_forbidden":
            parent = loc.rsplit(".", 1)[0] if "." in loc else ""
            text = "unknown field"
            if parent in fields:
                text += f"; allowed fields: {', '.join(fields[parent])}"
            parts.append(f"{loc}: {text}")
            continue
        if field in UNION_FIELDS and field in allowed:  # one message for every branch
            text = f"expected {allowed[field]}"
            shown = next((i["input"] for i in items if len(i.get("loc") or ()) and
                          i["loc"][-1] in UNION_FIELDS), first.get("input"))
            text += f" (got {_summary(shown)})" if first.get("type") != "missing" else \
                " (missing)"
            parts.append(f"{loc}: {text}")
            continue
        if first.get("type") == "string_pattern_mismatch" and field == "documents":
            number = int(loc.rsplit("[", 1)[-1].rstrip("]")) + 1 if loc.endswith("]") else 1
            parts.append(f"{loc}: document {number} is empty or only spaces; allowed: "
                         f"{allowed['documents']}")
            continue
        messages = dict.fromkeys(str(i["msg"]).removeprefix("Value error, ") for i in items)
        text = " or ".join(m[:1].lower() + m[1:] for m in messages)
        if "input" in first and first.get("type") not in ("missing", "value_error"):
            text += f" (got {_summary(first['input'])})"
        if field in allowed and first.get("type") != "value_error":
            text += f"; allowed: {allowed[field]}"
        parts.append(f"{loc}: {text}" if loc else text)
    if len(grouped) > MAX_REPORTED:
        parts.append(f"and {len(grouped) - MAX_REPORTED} more")
    return "; ".join(parts)
