"""RAG grounding: which declared sources (documents, messages, spans) an output rests on.

Pure functions of text, tokens and relevance numbers: no model, no vLLM, no HTTP. The offline
``Explainer`` and the server's ``ExplainService`` both call them, in this order:

1. ``render_documents`` puts a ``documents`` list into the prompt (the documented template);
2. ``locate_sources`` maps each declared source to a character span of ``Explanation.text`` and
   to the prompt tokens it covers;
3. ``completion_sentences`` splits the completion into sentences, each a completion-token span
   (explained as a span target, all sentences as rows of the same batched backward);
4. ``build_grounding`` turns the relevance of the main target and of each sentence row into the
   wire-format ``Grounding``.

Mass (docs/wire-format.md, "Grounding"): over prompt positions only,
``mass(i) = |token_relevance[i]| + |positional_relevance[i]|``; every share is a part of that mass
divided by the total prompt mass, so
``Σ source shares + instruction_share + positional_share == 1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Sequence

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from . import settings
from .errors import GroundingError
from .explanation import Grounding, SentenceSupport, SourceRelevance, Token, whole_number
from .targets import span_target

DEFAULT_GROUNDING_THRESHOLD = settings.SETTINGS["VLLM_PELRP_GROUNDING_THRESHOLD"].default
MAX_DOCUMENTS = 64
MAX_SOURCES = 64
# Sentence rows join the main target in one batched backward; a longer completion explains its
# first MAX_SENTENCES sentences (Grounding.sentences_truncated says so).
MAX_SENTENCES = 32
# A source supports a sentence when its signed relevance for that sentence is positive and its
# share is at least this fraction of the strongest source's share.
SUPPORT_FRACTION = 0.5

# The documented template (docs/wire-format.md): an instruction, each document under a numbered
# header, then the question. A source's span is the document's own text, not its header.
DOCUMENT_INSTRUCTION = "Answer the question using the documents below."
DOCUMENT_HEADER = "Document {number}:\n"
QUESTION_HEADER = "Question: "
SEPARATOR = "\n\n"


def render_documents(question: str, documents: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The prompt text holding ``documents`` and ``question``, and each document's character
    span ``[start, end)`` in it::

        Answer the question using the documents below.

        Document 1:
        <documents[0]>

        Document 2:
        <documents[1]>

        Question: <question>
    """
    check_documents(documents)
    parts = [DOCUMENT_INSTRUCTION]
    offset = len(DOCUMENT_INSTRUCTION)
    spans = []
    for number, document in enumerate(documents, start=1):
        header = SEPARATOR + DOCUMENT_HEADER.format(number=number)
        start = offset + len(header)
        parts += [header, document]
        spans.append((start, start + len(document)))
        offset = start + len(document)
    parts += [SEPARATOR, QUESTION_HEADER, question]
    return "".join(parts), spans


def check_documents(documents: Sequence[str]) -> None:
    if not isinstance(documents, (list, tuple)) or not documents:
        raise GroundingError("documents must be a non-empty list of strings", "documents")
    if len(documents) > MAX_DOCUMENTS:
        raise GroundingError(f"{len(documents)} documents given; at most {MAX_DOCUMENTS} are "
                             "allowed", "documents")
    for number, document in enumerate(documents, start=1):
        if not isinstance(document, str) or not document.strip():
            raise GroundingError(f"document {number} is empty or not a string; every document "
                                 "must be non-empty text", "documents")


def documents_into_messages(messages: Sequence[dict], documents: Sequence[str]) -> list[dict]:
    """A copy of ``messages`` whose last user message is rendered with ``documents``."""
    out = [dict(m) for m in messages]
    for message in reversed(out):
        if message.get("role") == "user":
            content = message.get("content")
            if not isinstance(content, str):
                raise GroundingError("documents go into the last user message, whose content "
                                     "must be a string (not a list of content parts)", "documents")
            message["content"] = render_documents(content, documents)[0]
            return out
    raise GroundingError("documents go into the last user message, but the messages have no "
                         "message with role 'user'", "documents")


# ---- sources ----------------------------------------------------------------------------------
class SourceSpec(BaseModel):
    """A declared source: a whole chat message, an exact substring, or a character span.

    - ``{"message": i}``: the content of ``messages[i]``;
    - ``{"text": "..."}``: the first occurrence of this exact text in the prompt;
    - ``{"chars": [a, b]}``: characters ``a <= c < b`` of the prompt as ``Explanation.text``
      shows it;
    - ``{"message": i, "text": "..."}`` / ``{"message": i, "chars": [a, b]}``: the same, inside
      the content of ``messages[i]``.

    ``name`` is shown in the explanation (default: "message i" or "span k").
    """

    # the schema states the rules below (one locator at least; text or chars) as far as JSON
    # Schema can; absent fields are not null
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "anyOf": [{"required": ["message"]}, {"required": ["text"]}, {"required": ["chars"]}],
        "not": {"required": ["text", "chars"]}})

    # a string where a number belongs (or the reverse) is refused, not converted
    message: whole_number(ge=0) = Field(
        None, description="Index into the chat messages.", validate_default=False)
    text: Annotated[StrictStr, Field(min_length=1)] = Field(
        None, description="Exact substring of the prompt.", validate_default=False)
    chars: tuple[whole_number(ge=0), whole_number(ge=1)] = Field(
        None, description="Character span [start, end), start < end.", validate_default=False)
    name: Annotated[StrictStr, Field(max_length=200)] = Field(
        None, description="Shown name of the source.", validate_default=False)

    @model_validator(mode="after")
    def _one_locator(self) -> "SourceSpec":
        if self.text is not None and self.chars is not None:
            raise ValueError("give text or chars, not both")
        if self.message is None and self.text is None and self.chars is None:
            raise ValueError("a source needs message, text or chars")
        if self.chars is not None and not 0 <= self.chars[0] < self.chars[1]:
            raise ValueError(f"chars {list(self.chars)}: need 0 <= start < end")
        return self


@dataclass
class LocatedSource:
    """A source placed in ``Explanation.text`` and on the prompt tokens ``[token_start, token_end)``."""

    index: int
    name: str
    kind: str  # "document", "message" or "span"
    char_start: int
    char_end: int
    token_start: int = 0
    token_end: int = 0


def parse_sources(sources: Sequence[SourceSpec | dict] | None) -> list[SourceSpec]:
    out = []
    for number, source in enumerate(sources or []):
        if isinstance(source, SourceSpec):
            out.append(source)
        elif isinstance(source, dict):
            try:
                out.append(SourceSpec.model_validate(source))
            except ValueError as error:
                raise GroundingError(f"sources[{number}]: {_first_error(error)}; a source is "
                                     "{'message': i}, {'text': '...'} or {'chars': [a, b]}, "
                                     "optionally with 'name'") from None
        else:
            raise GroundingError(f"sources[{number}] must be an object like {{'message': 0}}, "
                                 "{'text': '...'} or {'chars': [a, b]}")
    if len(out) > MAX_SOURCES:
        raise GroundingError(f"{len(out)} sources given; at most {MAX_SOURCES} are allowed")
    return out


def _first_error(error: Exception) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        items = errors()
        if items:
            loc = ".".join(str(p) for p in items[0]["loc"])
            message = str(items[0]["msg"]).removeprefix("Value error, ")
            return f"{loc}: {message}" if loc else message
    return str(error)


def message_spans(text: str, prompt_end: int,
                  message_contents: Sequence[str | None]) -> list[tuple[int, int] | None]:
    """Character span of each message's content in ``text[:prompt_end]``, found in order (the
    chat template renders messages in order; a template's default system prompt comes first).
    A content that templates trim (Llama 3) is found without its outer whitespace."""
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    for content in message_contents:
        start = text.find(content, cursor, prompt_end) if content and content.strip() else -1
        if start < 0 and content and content.strip():
            content = content.strip()
            start = text.find(content, cursor, prompt_end)
        if start < 0:
            spans.append(None)
            continue
        spans.append((start, start + len(content)))
        cursor = start + len(content)
    return spans


def locate_sources(
    text: str,
    tokens: Sequence[Token],
    prompt_length: int,
    specs: Sequence[SourceSpec] = (),
    *,
    documents: Sequence[str] | None = None,
    message_contents: Sequence[str | None] | None = None,
) -> list[LocatedSource]:
    """Place the rendered ``documents`` (first, as "document 1"…) and the declared ``specs`` in
    ``text`` and on the prompt tokens. Raises ``GroundingError`` naming the source that cannot be
    found, is empty of tokens, or overlaps another."""
    prompt_end = tokens[prompt_length - 1].end if prompt_length else 0
    located: list[LocatedSource] = []
    if documents:
        located += _locate_documents(text, prompt_end, documents)
    spans_of_messages = None
    for number, spec in enumerate(specs):
        where = f"sources[{number}]"
        base, limit = 0, prompt_end
        if spec.message is not None:
            if message_contents is None:
                raise GroundingError(f"{where}: 'message' needs a chat prompt (messages); this "
                                     "prompt is plain text or token ids, so use 'text' or 'chars'")
            if spec.message >= len(message_contents):
                count = len(message_contents)
                raise GroundingError(f"{where}: message {spec.message} does not exist; the request "
                                     f"has {count} messages (0..{count - 1})")
            if spans_of_messages is None:
                spans_of_messages = message_spans(text, prompt_end, message_contents)
            span = spans_of_messages[spec.message]
            if span is None:
                raise GroundingError(f"{where}: the content of message {spec.message} is empty, "
                                     "not text, or not found verbatim in the rendered prompt")
            base, limit = span
        if spec.text is not None:
            start = text.find(spec.text, base, limit)
            if start < 0:
                inside = f"message {spec.message}" if spec.message is not None else "the prompt"
                raise GroundingError(f"{where}: text {_short(spec.text)!r} does not occur in "
                                     f"{inside}")
            span = (start, start + len(spec.text))
        elif spec.chars is not None:
            start, end = base + spec.chars[0], base + spec.chars[1]
            if end > limit:
                inside = (f"message {spec.message}'s content" if spec.message is not None
                          else "the prompt text")
                raise GroundingError(f"{where}: chars {list(spec.chars)} reach beyond {inside}, "
                                     f"which has {limit - base} characters")
            span = (start, end)
        else:
            span = (base, limit)
        kind = "message" if spec.message is not None and spec.text is None and spec.chars is None \
            else "span"
        default = f"message {spec.message}" if kind == "message" else f"span {number + 1}"
        located.append(LocatedSource(index=len(located), name=spec.name or default, kind=kind,
                                     char_start=span[0], char_end=span[1]))
    _check_disjoint(located)
    _assign_tokens(located, tokens, prompt_length)
    return located


def _locate_documents(text: str, prompt_end: int, documents: Sequence[str]) -> list[LocatedSource]:
    """The rendered block (last occurrence in the prompt), else each document in order."""
    rendered, spans = render_documents("", documents)
    block = rendered[: len(rendered) - len(QUESTION_HEADER)]  # the question is not part of it
    start = text.rfind(block, 0, prompt_end)
    if start >= 0:
        spans = [(start + a, start + b) for a, b in spans]
    else:
        spans, cursor = [], 0
        for number, document in enumerate(documents, start=1):
            found = text.find(document, cursor, prompt_end)
            if found < 0:
                raise GroundingError(f"document {number} was not found verbatim in the decoded "
                                     "prompt (the tokenizer does not round-trip its text)")
            spans.append((found, found + len(document)))
            cursor = found + len(document)
    return [LocatedSource(index=i, name=f"document {i + 1}", kind="document", char_start=a,
                          char_end=b) for i, (a, b) in enumerate(spans)]


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_disjoint(sources: Sequence[LocatedSource]) -> None:
    ordered = sorted(sources, key=lambda s: s.char_start)
    for left, right in zip(ordered, ordered[1:]):
        if right.char_start < left.char_end:
            raise GroundingError(f"sources overlap: {left.name!r} (characters {left.char_start}-"
                                 f"{left.char_end}) and {right.name!r} ({right.char_start}-"
                                 f"{right.char_end}); every prompt token may belong to one "
                                 "source only")


def _assign_tokens(sources: list[LocatedSource], tokens: Sequence[Token], prompt_length: int) -> None:
    """Each prompt token goes to the source its characters overlap most (at most one source)."""
    members: dict[int, list[int]] = {s.index: [] for s in sources}
    ordered = sorted(sources, key=lambda s: s.char_start)
    for token in tokens[:prompt_length]:
        best, best_overlap = None, 0
        for source in ordered:
            if source.char_start >= token.end:
                break
            overlap = min(token.end, source.char_end) - max(token.start, source.char_start)
            if overlap > best_overlap:
                best, best_overlap = source, overlap
        if best is not None:
            members[best.index].append(token.index)
    for source in sources:
        indices = members[source.index]
        if not indices:
            raise GroundingError(f"source {source.name!r} covers no prompt token")
        source.token_start, source.token_end = indices[0], indices[-1] + 1


# ---- sentences --------------------------------------------------------------------------------
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")
_ABBREVIATIONS = {"e.g.", "i.e.", "etc.", "vs.", "mr.", "mrs.", "ms.", "dr.", "st.", "no.", "cf."}


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the sentences of ``text``, whitespace trimmed: a
    sentence ends at '.', '!' or '?' followed by whitespace (not after "e.g.", "i.e.", "etc."
    and similar), or at a line break."""
    spans, start = [], 0
    for match in _BOUNDARY.finditer(text):
        words = text[start:match.start()].split()
        if "\n" not in match.group(0) and words and words[-1].lower() in _ABBREVIATIONS:
            continue
        spans.append((start, match.start() + len(match.group(0).rstrip())))
        start = match.end()
    spans.append((start, len(text)))
    out = []
    for a, b in spans:
        piece = text[a:b]
        stripped = piece.strip()
        if stripped:
            a += len(piece) - len(piece.lstrip())
            out.append((a, a + len(stripped)))
    return out


@dataclass
class SentenceSpan:
    """A completion sentence: its text, characters in ``Explanation.text`` and completion tokens."""

    index: int
    text: str
    char_start: int
    char_end: int
    span: tuple[int, int]  # completion-token span [i, j)


def completion_sentences(
    text: str,
    tokens: Sequence[Token],
    prompt_length: int,
    skip_token_ids: Sequence[int] = (),
    max_sentences: int = MAX_SENTENCES,
) -> tuple[list[SentenceSpan], bool]:
    """The completion's sentences as completion-token spans, and whether more than
    ``max_sentences`` were found (only the first ``max_sentences`` are returned).

    Special tokens (``skip_token_ids``, e.g. EOS) belong to no sentence and end the one before
    them; a token belongs to the sentence that holds its first non-space character, and a
    whitespace-only token to the sentence before it."""
    completion = list(tokens[prompt_length:])
    if not completion:
        return [], False
    skip = set(int(t) for t in skip_token_ids)
    base = completion[0].start
    chars = list(text[base:completion[-1].end])
    for token in completion:  # special tokens become line breaks: they end a sentence
        if token.id in skip:
            chars[token.start - base : token.end - base] = "\n" * (token.end - token.start)
    masked = "".join(chars)
    spans = [(a + base, b + base) for a, b in split_sentences(masked)]
    members: list[list[int]] = [[] for _ in spans]
    current = -1
    for k, token in enumerate(completion):
        if token.id in skip:
            continue
        piece = text[token.start:token.end]
        lead = len(piece) - len(piece.lstrip())
        if lead == len(piece):  # whitespace only: joins the sentence before it
            if current >= 0:
                members[current].append(k)
            continue
        first = token.start + lead
        while current + 1 < len(spans) and spans[current + 1][0] <= first:
            current += 1
        if current >= 0:
            members[current].append(k)
    sentences = []
    for (a, b), ks in zip(spans, members):
        if not ks:
            continue
        sentences.append(SentenceSpan(index=len(sentences), text=text[a:b], char_start=a,
                                      char_end=b, span=(ks[0], ks[-1] + 1)))
    truncated = len(sentences) > max_sentences
    return sentences[:max_sentences], truncated


# ---- shares -----------------------------------------------------------------------------------
@dataclass
class _Shares:
    token: list[float]       # per source
    positional: list[float]  # per source
    signed_token: list[float]
    signed_positional: list[float]
    outside_token: float
    outside_positional: float


def _shares(sources: Sequence[LocatedSource], token_relevance: Sequence[float],
            positional_relevance: Sequence[float], prompt_length: int) -> _Shares:
    token_mass = [abs(float(v)) for v in token_relevance[:prompt_length]]
    positional_mass = [abs(float(v)) for v in positional_relevance[:prompt_length]]
    total = sum(token_mass) + sum(positional_mass)
    scale = 1.0 / total if total > 0 else 0.0
    token, positional, signed_token, signed_positional = [], [], [], []
    inside_token = inside_positional = 0.0
    for source in sources:
        a, b = source.token_start, source.token_end
        t, p = sum(token_mass[a:b]), sum(positional_mass[a:b])
        inside_token, inside_positional = inside_token + t, inside_positional + p
        token.append(t * scale)
        positional.append(p * scale)
        signed_token.append(float(sum(token_relevance[a:b])))
        signed_positional.append(float(sum(positional_relevance[a:b])))
    return _Shares(token, positional, signed_token, signed_positional,
                   (sum(token_mass) - inside_token) * scale,
                   (sum(positional_mass) - inside_positional) * scale)


def supporting(shares: Sequence[float], signed: Sequence[float],
               fraction: float = SUPPORT_FRACTION) -> list[int]:
    """Indices of the supporting sources, strongest first: positive signed relevance and a share
    of at least ``fraction`` × the largest share."""
    if not shares:
        return []
    top = max(shares)
    chosen = [i for i, (share, value) in enumerate(zip(shares, signed))
              if value > 0 and share > 0 and share >= fraction * top]
    return sorted(chosen, key=lambda i: -shares[i])


@dataclass
class SentenceRelevance:
    """The relevance of one sentence row (span target) of the batched backward."""

    token_relevance: Sequence[float]
    positional_relevance: Sequence[float]
    target_logit: float


def build_grounding(
    sources: Sequence[LocatedSource],
    token_relevance: Sequence[float],
    positional_relevance: Sequence[float],
    prompt_length: int,
    sentences: Sequence[SentenceSpan] = (),
    sentence_rows: Sequence[SentenceRelevance] = (),
    threshold: float = DEFAULT_GROUNDING_THRESHOLD,
    sentences_truncated: bool = False,
) -> Grounding:
    """The wire-format ``Grounding`` from the main target's relevance and one row per sentence."""
    if len(sentences) != len(sentence_rows):
        raise ValueError("one relevance row per sentence is needed")
    main = _shares(sources, token_relevance, positional_relevance, prompt_length)
    relevances = []
    for i, source in enumerate(sources):
        relevances.append(SourceRelevance(
            index=i, name=source.name, kind=source.kind,
            token_start=source.token_start, token_end=source.token_end,
            char_start=source.char_start, char_end=source.char_end,
            token_relevance=main.signed_token[i], positional_relevance=main.signed_positional[i],
            share=main.token[i] + main.positional[i],
            token_share=main.token[i], positional_share=main.positional[i],
        ))
    score = sum(r.share for r in relevances)
    supports = []
    for sentence, row in zip(sentences, sentence_rows):
        part = _shares(sources, row.token_relevance, row.positional_relevance, prompt_length)
        shares = [t + p for t, p in zip(part.token, part.positional)]
        signed = [t + p for t, p in zip(part.signed_token, part.signed_positional)]
        supports.append(SentenceSupport(
            index=sentence.index, text=sentence.text, span=sentence.span,
            char_start=sentence.char_start, char_end=sentence.char_end,
            target_logit=float(row.target_logit), source_shares=shares,
            source_relevance=signed, supporting_sources=supporting(shares, signed),
            grounding_score=_clip(sum(shares)),
        ))
    score = _clip(score)
    return Grounding(
        sources=relevances,
        grounding_score=score,
        instruction_share=main.outside_token,
        positional_share=main.outside_positional,
        threshold=threshold,
        low_grounding=score < threshold,
        supporting_sources=supporting([r.share for r in relevances],
                                      [r.token_relevance + r.positional_relevance
                                       for r in relevances]),
        sentences=supports,
        sentences_truncated=sentences_truncated,
    )


def _clip(value: float) -> float:
    return min(1.0, max(0.0, value))


GROUNDING_THRESHOLD_ENV = "VLLM_PELRP_GROUNDING_THRESHOLD"  # pelrp serve --grounding-threshold


def grounding_threshold_from_env() -> float:
    """The server's default threshold: ``$VLLM_PELRP_GROUNDING_THRESHOLD`` or 0.3."""
    return settings.get(GROUNDING_THRESHOLD_ENV)


def check_threshold(threshold: float) -> float:
    value = float(threshold)
    if not 0.0 <= value <= 1.0:
        raise GroundingError(f"grounding_threshold {threshold!r} is out of range; allowed: 0 to 1",
                             "grounding_threshold")
    return value


# ---- one explanation's plan: sources, sentences, the extra target rows ------------------------
@dataclass
class GroundingPlan:
    """What an explanation with sources computes besides its main target."""

    sources: list[LocatedSource]
    sentences: list[SentenceSpan]
    sentences_truncated: bool
    threshold: float


def plan_grounding(
    text: str,
    tokens: Sequence[Token],
    prompt_length: int,
    *,
    specs: Sequence[SourceSpec] = (),
    documents: Sequence[str] | None = None,
    message_contents: Sequence[str | None] | None = None,
    skip_token_ids: Sequence[int] = (),
    threshold: float = DEFAULT_GROUNDING_THRESHOLD,
    sentences: bool = True,
) -> GroundingPlan:
    sources = locate_sources(text, tokens, prompt_length, specs, documents=documents,
                             message_contents=message_contents)
    found, truncated = (completion_sentences(text, tokens, prompt_length, skip_token_ids)
                        if sentences else ([], False))
    return GroundingPlan(sources, found, truncated, check_threshold(threshold))


def sentence_rows(main_targets: Sequence, plan: GroundingPlan, prompt_length: int,
                  completion_ids: Sequence[int]) -> tuple[list, list[int]]:
    """The targets of the batched backward (main rows first, then one span row per sentence not
    already among them) and, per sentence, the index of its row."""

    targets = list(main_targets)
    keys = {(tuple(t.positions), tuple(t.token_ids)): b for b, t in enumerate(targets)}
    rows = []
    for sentence in plan.sentences:
        target = span_target(*sentence.span, prompt_length, completion_ids, "span")
        key = (tuple(target.positions), tuple(target.token_ids))
        if key not in keys:
            keys[key] = len(targets)
            targets.append(target)
        rows.append(keys[key])
    return targets, rows
