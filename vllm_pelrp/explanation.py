"""The public result types. ``Explanation`` is a pydantic model; its JSON is the wire format.

Conventions (documented in docs/wire-format.md):
- every relevance list is indexed by token position, ``len == len(tokens)``;
- relevance is in logit units: ``sum(token_relevance) + sum(positional_relevance)`` approximates
  ``target_logit`` (see ``conservation``);
- ``combined_relevance`` is max-normalised to [-1, 1]; ``combination`` names how it was formed;
- ``positional_relevance`` is the sum of the named ``positional_parts`` (wire format 2);
- ``wire_format_version`` says which version of the format a document follows; a document without
  it is version "1". Within a major version fields are only added, never renamed or removed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from .vocabulary import ENCODER_TARGETS, MODES, Mode  # noqa: F401  (re-exported: the wire names)

# How ``combined_relevance`` joins token and positional relevance (``assemble.combine_parts``):
# each positional component (per layer, the cos and the sin part; an additive position table once)
# is kept signed or made absolute; "single" normalises the sum once (the paper's --single-norm),
# "per-part" max-normalises the token part, each component and the positional sum before adding;
# "-w<weight>" weights the positional sum. The default is the faithfulness study's dev winner over
# two models, 128- and 512-token next-token prediction and multiple choice (docs/faithfulness.md,
# "At scale"): the paper's sum with a quarter of its positional part. "abs-single" is the paper's
# code; "signed-per-part" was the default before the study.
COMBINATIONS: tuple[str, ...] = ("abs-single-w0.25", "abs-single", "abs-per-part", "signed-single",
                                 "signed-per-part")
DEFAULT_COMBINATION = "abs-single-w0.25"
PAPER_COMBINATION = "abs-single"

# The version of the wire format this code writes (docs/wire-format.md, "Versions"). "1" is the
# format before the field existed; a document without ``wire_format_version`` is version "1".
WIRE_FORMAT_VERSION = "2.1"
WIRE_FORMAT_VERSION_1 = "1"

# What kind of position input a positional part is: "rotary" (RoPE's cos/sin in every layer),
# "learned" (one trained table added to the token embedding: BERT, GPT-2) or "absolute" (one
# fixed table added to it, e.g. sinusoidal).
PositionalKind = Literal["rotary", "learned", "absolute"]
POSITIONAL_KINDS: tuple[str, ...] = get_args(PositionalKind)

# ``ENCODER_TARGETS`` (vocabulary.py) are the ``ResolvedTarget.kind`` of an encoder explanation
# (wire format 2.1): all its tokens are input, there is no completion. The views ask
# ``Explanation.is_encoder`` rather than the tuple.


def _not_text(value: Any) -> Any:
    """Whole numbers of the wire format: ``3`` and ``3.0`` (JSON Schema's integers), never
    ``"3"`` or ``true``."""
    if isinstance(value, (str, bytes, bool)):
        raise PydanticCustomError("int_type", "Input should be a valid integer, not {kind}",
                                  {"kind": "true/false" if isinstance(value, bool) else "text"})
    return value


WholeNumber = Annotated[int, BeforeValidator(_not_text)]


def whole_number(**constraints: Any) -> Any:
    """``WholeNumber`` with ``Field`` constraints (``ge=0``) that the JSON schema shows."""
    return Annotated[int, Field(**constraints), BeforeValidator(_not_text)]


class SpanTarget(BaseModel):
    """Sum of the logits of completion tokens ``span[0] <= k < span[1]`` (completion indices)."""

    model_config = ConfigDict(extra="forbid")
    span: tuple[WholeNumber, WholeNumber]  # "3" is refused, not read as 3


class TokenIdTarget(BaseModel):
    """The logit of token ``token_id`` at the last input position ("why this and not that")."""

    model_config = ConfigDict(extra="forbid")
    token_id: WholeNumber


TargetSpec = Union[Literal["next", "completion", "per_token"], SpanTarget, TokenIdTarget]


# ---- encoder targets (embedding, reranking and classification models) ---------------------------
class DimensionTarget(BaseModel):
    """Dimension ``dimension`` of the pooled embedding, before normalisation."""

    model_config = ConfigDict(extra="forbid")
    dimension: WholeNumber


class SimilarityTarget(BaseModel):
    """The cosine similarity of this input's pooled embedding with another text's: ``similarity``
    is that text (offline and on /v1/explain), or on /v1/embeddings the index of another input of
    the same request. Both sides are explained: the other one in ``Explanation.other``."""

    model_config = ConfigDict(extra="forbid")
    similarity: Union[str, WholeNumber, list[WholeNumber]]


class LabelTarget(BaseModel):
    """The logit of label ``label`` (an index, or a name of the model's ``id2label``) of a
    sequence classifier or cross-encoder."""

    model_config = ConfigDict(extra="forbid")
    label: Union[WholeNumber, str]


EncoderTargetSpec = Union[DimensionTarget, SimilarityTarget, LabelTarget]


class Token(BaseModel):
    """One input token. ``start``/``end`` are character offsets into ``Explanation.text``."""

    index: int
    id: int
    text: str
    start: int
    end: int
    role: Literal["prompt", "completion"]


class ResolvedTarget(BaseModel):
    """What the backward started from: the sum of ``logit[position, token_id]`` over ``logits``."""

    kind: Literal["next", "completion", "span", "per_token_row", "token_id", "dimension",
                  "similarity", "label"]
    description: str
    positions: list[int] = Field(description="Positions whose output logits are summed.")
    token_ids: list[int] = Field(description="The token whose logit is taken at each position.")
    span: tuple[int, int] | None = Field(
        None, description="Completion-token span [start, end) for 'completion', 'span' and rows."
    )
    dimension: int | None = Field(None, description="'dimension': the pooled embedding's "
                                  "dimension (positions and token_ids are then empty).")
    label: int | None = Field(None, description="'label': the label's index.")
    value: float | None = Field(
        None, description="Encoder targets: the target's value as the model computes it. For "
        "'similarity' the cosine of the two texts' pooled embeddings; each side's relevance then "
        "conserves half of it (target_logit), the other half is the other text's "
        "(Explanation.other).")


class LayerPositionalRelevance(BaseModel):
    """Relevance of one layer's RoPE inputs, per position: its cos part and its sin part."""

    layer: int
    cos: list[float]
    sin: list[float]


class PositionalPart(BaseModel):
    """Relevance of one named position input, per position (wire format 2). Rotary parts
    (rope_cos, rope_sin) are summed over layers; their per-layer values are the cos / sin lists of
    positional_relevance_per_layer (with per_layer=True), not repeated here."""

    name: str = Field(description="'rope_cos', 'rope_sin' (rotary); 'position_embedding' "
                      "(one additive table per model).")
    kind: PositionalKind = Field(
        description="rotary: RoPE's cos or sin, one input per layer, summed over layers here; "
        "learned: a trained position-embedding table added to the token embedding; absolute: a "
        "fixed (e.g. sinusoidal) table added to it.")
    relevance: list[float] = Field(description="Signed relevance of each position (logit units).")


class Conservation(BaseModel):
    """How much of the target logit reached the inputs (tokens and positions)."""

    target_logit: float
    token_sum: float
    positional_sum: float
    relative_error: float = Field(
        description="|token_sum + positional_sum - target_logit| / |target_logit|"
    )
    softmax_absorbed: float = Field(
        description="Relevance the softmax rule drops (not conservative), summed over layers."
    )
    bias_absorbed: float = Field(
        0.0, description="Relevance the biases keep (ε-rule: a bias b of z = xWᵀ + b keeps "
        "Σ b ⊙ ∂z; a LayerNorm's β likewise), summed over layers and heads; 0 for models without "
        "biases."
    )
    token_type_sum: float = Field(
        0.0, description="Σ token_type_relevance (BERT-family token-type embeddings, booked apart "
        "from tokens and positions); 0 for models without token types.")
    relative_error_excluding_softmax: float = Field(
        description="|token_sum + positional_sum + token_type_sum + softmax_absorbed + "
        "bias_absorbed - target_logit| / |target_logit|: what every other rule loses (ε "
        "stabilisers, rounding)."
    )


class RelevanceRow(BaseModel):
    """Relevance for one target."""

    target: ResolvedTarget
    target_logit: float
    token_relevance: list[float] = Field(description="Signed relevance of each token (embedding).")
    positional_relevance: list[float] = Field(
        description="Relevance of each position: the sum of its positional_parts (for RoPE: sum "
        "over layers of its cos and sin relevance)."
    )
    positional_parts: list[PositionalPart] | None = Field(
        None, description="The positional relevance by named input (wire format 2; null in "
        "version 1): one part per position input the mode attributes relevance to, so [] in "
        "attnlrp and cp-lrp for a rotary model. Σ of the parts' relevance = positional_relevance."
    )
    positional_relevance_per_layer: list[LayerPositionalRelevance] | None = Field(
        None, description="Per layer, the rotary parts' cos and sin relevance; present when asked "
        "(per_layer=True)."
    )
    token_type_relevance: list[float] | None = Field(
        None, description="Relevance of each position's token-type (segment) embedding, in "
        "pa-lrp, for models that have one (BERT family); null otherwise.")
    combined_relevance: list[float] = Field(
        description="Token and positional relevance combined as `combination` says, max-normalised."
    )
    conservation: Conservation


class SourceRelevance(BaseModel):
    """One declared source (a document, a chat message or a span of the prompt) and its share of
    the prompt's relevance mass for the main target (docs/wire-format.md, "Grounding")."""

    index: int
    name: str = Field(description="'document 1'…, 'message i', 'span k' or the caller's name.")
    kind: Literal["document", "message", "span"]
    token_start: int = Field(description="First prompt token of the source (index into tokens).")
    token_end: int = Field(description="One past its last token: tokens [token_start, token_end).")
    char_start: int = Field(description="Character span [char_start, char_end) in `text`.")
    char_end: int
    token_relevance: float = Field(description="Signed Σ token_relevance over its tokens.")
    positional_relevance: float = Field(description="Signed Σ positional_relevance over its positions.")
    share: float = Field(description="(token mass + positional mass on its tokens) / prompt mass.")
    token_share: float = Field(description="Token part of `share`.")
    positional_share: float = Field(description="Positional part of `share`.")


class SentenceSupport(BaseModel):
    """One completion sentence, explained as a span target: which sources support it."""

    index: int
    text: str
    span: tuple[int, int] = Field(description="Completion-token span [i, j) of the sentence.")
    char_start: int = Field(description="Character span [char_start, char_end) in `text`.")
    char_end: int
    target_logit: float = Field(description="Σ of the sentence tokens' logits.")
    source_shares: list[float] = Field(
        description="Per source (order of Grounding.sources): its share of the prompt mass for "
        "this sentence.")
    source_relevance: list[float] = Field(
        default_factory=list,
        description="Per source: its signed token + positional relevance for this sentence.")
    supporting_sources: list[int] = Field(
        description="Indices of the sources that support the sentence, strongest first: positive "
        "signed relevance and a share at least half the strongest source's.")
    grounding_score: float = Field(description="Σ source_shares, in [0, 1].")


class Grounding(BaseModel):
    """How much an output rests on the declared sources rather than on instructions, question
    and positional structure. Shares: Σ sources[].share + instruction_share + positional_share = 1."""

    sources: list[SourceRelevance]
    grounding_score: float = Field(description="Σ of the sources' shares, in [0, 1].")
    instruction_share: float = Field(
        description="Token mass on prompt tokens outside every source (instructions, question, "
        "chat template), / prompt mass.")
    positional_share: float = Field(
        description="Positional mass on prompt positions outside every source, / prompt mass.")
    threshold: float = Field(description="grounding_score below this is low grounding.")
    low_grounding: bool = Field(description="grounding_score < threshold.")
    supporting_sources: list[int] = Field(
        default_factory=list,
        description="Sources that support the whole target, strongest first (rule as for "
        "sentences).")
    sentences: list[SentenceSupport] = Field(
        description="One per completion sentence, all explained in the main target's batched "
        "backward.")
    sentences_truncated: bool = Field(
        False, description="The completion had more sentences than were explained (the cap).")


class Explanation(RelevanceRow):
    """Attribution of a model output to its input position-token pairs (PA-LRP)."""

    wire_format_version: str = Field(
        WIRE_FORMAT_VERSION_1,
        description="Version of this wire format ('2.1' today; absent means '1'). Within a major "
        "version (the part before any '.') fields are only added, never renamed or removed.")
    model: str
    mode: Mode
    # Read as the paper's abs-single when absent: documents written before the field existed
    # all used it. What the library writes by default is DEFAULT_COMBINATION.
    combination: str = Field(
        PAPER_COMBINATION,
        description=f"How combined_relevance was formed: one of {', '.join(COMBINATIONS)}; "
        f"{DEFAULT_COMBINATION} is the library's default, {PAPER_COMBINATION} the paper's code "
        "(and what a document without this field used). See docs/wire-format.md.",
    )
    text: str = Field(description="Decoded prompt + completion; token offsets index into it.")
    prompt_length: int = Field(description="Number of prompt tokens; the rest are completion.")
    tokens: list[Token]
    rows: list[RelevanceRow] | None = Field(
        None,
        description=(
            "For target 'per_token': one row per completion token (its own logit as target). "
            "The top-level fields then hold the 'completion' target, which equals the rows' sum."
        ),
    )

    grounding: Grounding | None = Field(
        None, description="Per-source attribution and grounding score; present when the request "
        "declared sources (documents, messages or spans).")
    id: str | None = Field(
        None, description="Set by the server ('expl-<hex>'): reopens this explanation later.")
    other: "Explanation | None" = Field(
        None, description="Target 'similarity': the other text's explanation (same fields; its "
        "own `other` is null). Its relevance conserves the other half of the cosine.")

    # --- convenience -------------------------------------------------------------------------
    def top_tokens(self, k: int = 10, by: str = "combined_relevance") -> list[tuple[Token, float]]:
        values = getattr(self, by)
        order = sorted(range(len(values)), key=lambda i: -abs(values[i]))[:k]
        return [(self.tokens[i], values[i]) for i in order]

    @property
    def positional_share(self) -> float:
        """Share of the absolute relevance that lands on positions rather than tokens."""
        token = sum(abs(v) for v in self.token_relevance)
        positional = sum(abs(v) for v in self.positional_relevance)
        total = token + positional
        return positional / total if total else 0.0

    @property
    def is_encoder(self) -> bool:
        """An encoder explanation (embedding, similarity or classifier target): no completion."""
        return self.target.kind in ENCODER_TARGETS

    # --- views: the renderers take the explanation; they never import this module -------------
    def to_html(self, *, top_k: int = 10) -> str:
        """A self-contained HTML page: the web view's script and style with this explanation's
        JSON inlined, drawn in the browser; it opens offline (``file://``, nothing fetched)."""
        from .html_page import explanation_page

        return explanation_page(self, top_k=top_k)

    def print(self, console=None, *, field: str = "combined_relevance", top_k: int = 10) -> None:
        """A token heatmap and summary tables in the terminal (rich)."""
        from .terminal import print_explanation

        print_explanation(self, console=console, field=field, top_k=top_k)


Explanation.model_rebuild()
