"""From raw engine relevance to the wire-format ``Explanation``: target resolution and assembly.

Pure functions of token ids, a tokenizer and numbers, with no model: the offline ``Explainer``
and the vLLM plugin's HTTP side both call them.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch

from .engine.driver import RelevanceResult
from .errors import ExplainInputError
from .explanation import (
    COMBINATIONS,
    DEFAULT_COMBINATION,
    PAPER_COMBINATION,  # noqa: F401  (re-exported)
    POSITIONAL_KINDS,
    WIRE_FORMAT_VERSION,
    Conservation,
    Explanation,
    LayerPositionalRelevance,
    PositionalPart,
    RelevanceRow,
    ResolvedTarget,
    Token,
)

from .grounding import GroundingPlan, SentenceRelevance, build_grounding
from .targets import span_target

if TYPE_CHECKING:
    from .explanation import Grounding

DECODE_WINDOW = 6  # earlier tokens decoded alongside each token, for spaces and byte merges


def token_spans(tokenizer: Any, ids: Sequence[int], prompt_length: int) -> tuple[str, list[Token]]:
    """Decoded text and each token's text with character offsets into it."""
    pieces: list[str] = []
    for index in range(len(ids)):
        context = list(ids[max(0, index - DECODE_WINDOW) : index])
        before = tokenizer.decode(context) if context else ""
        both = tokenizer.decode(context + [ids[index]])
        if both.startswith(before):
            pieces.append(both[len(before) :])
        else:  # a multi-byte character split across tokens: fall back to the lone token
            pieces.append(tokenizer.decode([ids[index]]))
    tokens, offset = [], 0
    for index, (token_id, piece) in enumerate(zip(ids, pieces)):
        role = "prompt" if index < prompt_length else "completion"
        tokens.append(Token(index=index, id=int(token_id), text=piece, start=offset,
                            end=offset + len(piece), role=role))
        offset += len(piece)
    return "".join(pieces), tokens


# COMBINATIONS, DEFAULT_COMBINATION and PAPER_COMBINATION live with the wire format
# (explanation.py) and are imported from here too, where combine_parts implements them.


def _max_normalise(x: torch.Tensor) -> torch.Tensor:
    peak = x.abs().max()
    return x / peak if peak > 0 else x


def combination_rule(combination: str) -> tuple[bool, bool, float]:
    """(signed, per_part, positional weight) of a combination name: ``{signed|abs}-{single|
    per-part}``, optionally ``-w<weight>`` (the positional part's weight; 1 without it)."""
    name, _, weight = combination.partition("-w")
    sign, _, norm = name.partition("-")
    if sign not in ("signed", "abs") or norm not in ("single", "per-part"):
        raise ValueError(f"not a combination name: {combination!r}")
    return sign == "signed", norm == "per-part", float(weight) if weight else 1.0


def combine_parts(token: torch.Tensor, components: Iterable[torch.Tensor],
                  combination: str = DEFAULT_COMBINATION) -> torch.Tensor:
    """Combined relevance (T,) from token relevance (T,) and positional components (each (T,)):
    every layer of a rotary part is one component, an additive position table is one.

    "single" sums the (signed or absolute) components with the token part and max-normalises
    once; "per-part" max-normalises each component, their sum P and the token part before adding.
    "-w<weight>" scales the positional sum before it is added.
    """
    if combination not in COMBINATIONS:
        raise ExplainInputError(f"unknown combination {combination!r}; allowed: "
                                f"{', '.join(COMBINATIONS)}", "combination")
    return combine_by_rule(token, components, *combination_rule(combination))


def combine_by_rule(token: torch.Tensor, components: Iterable[torch.Tensor], signed: bool,
                    per_part: bool, weight: float = 1.0) -> torch.Tensor:
    """R̂ = norm(T + w·P) with T = R_tok and P = Σ_c c (signed) or Σ_c |c|; per part, T, P and
    every component c are max-normalised first (``combine_parts`` for the named ones)."""
    positional = torch.zeros_like(token)
    for component in components:
        value = component if signed else component.abs()
        positional = positional + (_max_normalise(value) if per_part else value)
    if per_part:
        token, positional = _max_normalise(token), _max_normalise(positional)
    return _max_normalise(token + weight * positional)


def combine_relevance(token: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      combination: str = DEFAULT_COMBINATION) -> torch.Tensor:
    """Combined relevance (T,) from token (T,) and per-layer cos/sin (L, T), max-normalised.

    abs-single (the paper): (R_tok + Σ_l |R_cos,l| + |R_sin,l|) / max|·|; abs-single-w0.25 (the
    default): (R_tok + ¼ Σ_l |R_cos,l| + |R_sin,l|) / max|·|.
    signed-per-part: R_tok/max|R_tok| + P/max|P|, P = Σ_l R_cos,l/max|R_cos,l| + R_sin,l/max|R_sin,l|.
    """
    return combine_parts(token, [*cos, *sin], combination)


@dataclass(frozen=True)
class LayerSums:
    """What the explanation needs of a rotary part's layers when they were not sent
    (``pipeline.BackwardJob.per_layer``): Σ_l |R_l| per row (B, T), and the same of the rows'
    sum (T,) for a per-token explanation's top level (None when there is none)."""

    absolute: torch.Tensor
    summary_absolute: torch.Tensor | None = None


@dataclass(frozen=True)
class PositionalInput:
    """Raw relevance of one named position input: ``relevance`` is (L, T), one row per layer, for
    a rotary input (RoPE's cos or sin), or (T,) for an additive position table (one per model).
    A rotary input summed over its layers is (T,) too, with ``absolute`` = Σ_l |R_l| (T,): what
    an abs combination adds in place of the layers."""

    kind: str  # one of explanation.POSITIONAL_KINDS
    relevance: torch.Tensor
    absolute: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in POSITIONAL_KINDS:
            raise ValueError(f"unknown positional kind {self.kind!r}; allowed: "
                             f"{', '.join(POSITIONAL_KINDS)}")
        if self.relevance.dim() not in (1, 2):
            raise ValueError(f"positional relevance must be (L, T) or (T,), got "
                             f"{tuple(self.relevance.shape)}")

    @property
    def components(self) -> torch.Tensor:
        """(L, T): the rows that ``combine_parts`` normalises one by one."""
        return self.relevance if self.relevance.dim() == 2 else self.relevance.unsqueeze(0)

    def combined(self, signed: bool) -> torch.Tensor:
        """(T,): what a "single" combination adds of this input, Σ_c c or Σ_c |c| over its
        components."""
        if signed:
            return self.components.sum(0)
        return self.absolute if self.absolute is not None else self.components.abs().sum(0)


# The named position inputs: wire name → (RelevanceResult attribute, kind). build_explanation puts
# a part on the wire when the result has the attribute (not None) and the mode attributes
# relevance to its kind; a new kind of position input is one more entry here.
POSITIONAL_INPUTS: dict[str, tuple[str, str | None]] = {
    "rope_cos": ("positional_cos", "rotary"),
    "rope_sin": ("positional_sin", "rotary"),
    # an additive table (BERT, GPT-2): its kind, learned or absolute, is the result's position_kind
    "position_embedding": ("position_embedding", None),
}


def attributes_positions(mode: str, kind: str) -> bool:
    """Whether ``mode`` treats position inputs of ``kind`` as inputs of the explanation: only
    pa-lrp does. attnlrp and cp-lrp hold RoPE's cos/sin constant and give an additive position
    table's share to the token, so their parts are left off, not sent as zeros."""
    return mode == "pa-lrp"


def rotary_parts(cos: torch.Tensor, sin: torch.Tensor) -> dict[str, PositionalInput]:
    """The RoPE parts from per-layer cos/sin relevance (L, T)."""
    return {"rope_cos": PositionalInput("rotary", cos), "rope_sin": PositionalInput("rotary", sin)}


def _positional_totals(token: torch.Tensor,
                       parts: Mapping[str, PositionalInput]) -> tuple[torch.Tensor, float]:
    """Σ over the parts, per position (T,) and in all. Per-layer parts are added layer by layer
    before the sum over layers, ``(cos + sin).sum(0)``: for RoPE the numbers of wire format 1."""
    layered = [p.relevance for p in parts.values() if p.relevance.dim() == 2]
    if layered:
        stacked = functools.reduce(operator.add, layered)
        per_position, total = stacked.sum(0), float(stacked.sum())
    else:
        per_position, total = torch.zeros_like(token), 0.0
    for part in parts.values():
        if part.relevance.dim() == 1:
            per_position, total = per_position + part.relevance, total + float(part.relevance.sum())
    return per_position, total


def relevance_row(target: ResolvedTarget, token: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, target_logit: float, absorbed: float,
                  per_layer: bool, combination: str = DEFAULT_COMBINATION,
                  bias_absorbed: float = 0.0, *,
                  parts: Mapping[str, PositionalInput] | None = None,
                  token_type: torch.Tensor | None = None) -> RelevanceRow:
    """One row from token relevance (T,), the position inputs' relevance and the bookkeeping
    (``absorbed``: the softmax rule's loss; ``bias_absorbed``: what biases keep).

    ``parts``: every position input the row attributes relevance to, by wire name (in wire order);
    positional relevance, its sum, the combination and ``positional_parts`` come from them.
    Default: the rotary parts ``rope_cos``/``rope_sin`` of ``cos``/``sin`` (L, T), which also give
    ``positional_relevance_per_layer`` with ``per_layer``.
    """
    if parts is None:
        parts = rotary_parts(cos, sin)
    token_sum = float(token.sum())
    positional, positional_sum = _positional_totals(token, parts)
    token_type_sum = float(token_type.sum()) if token_type is not None else 0.0
    inputs_sum = token_sum + positional_sum + token_type_sum
    scale = max(abs(target_logit), 1e-12)
    conservation = Conservation(
        target_logit=target_logit,
        token_sum=token_sum,
        positional_sum=positional_sum,
        relative_error=abs(inputs_sum - target_logit) / scale,
        softmax_absorbed=absorbed,
        bias_absorbed=bias_absorbed,
        token_type_sum=token_type_sum,
        relative_error_excluding_softmax=abs(
            inputs_sum + absorbed + bias_absorbed - target_logit) / scale,
    )
    summed = any(part.absolute is not None for part in parts.values())
    layers = None
    if per_layer:
        if summed:
            raise ValueError("per_layer output needs the rotary parts layer by layer")
        layers = [LayerPositionalRelevance(layer=index, cos=cos[index].tolist(), sin=sin[index].tolist())
                  for index in range(cos.shape[0])]
    if summed:  # the layers were summed on the worker: only a "single" combination applies
        if combination not in COMBINATIONS:
            raise ExplainInputError(f"unknown combination {combination!r}; allowed: "
                                    f"{', '.join(COMBINATIONS)}", "combination")
        signed, per_part, weight = combination_rule(combination)
        if per_part:
            raise ValueError(f"the {combination} combination needs the rotary parts layer by "
                             "layer")
        term = functools.reduce(operator.add, (p.combined(signed) for p in parts.values()),
                                torch.zeros_like(token))
        combined = combine_by_rule(token, [term], True, False, weight)
    else:
        components = [row for part in parts.values() for row in part.components]
        combined = combine_parts(token, components, combination)
    return RelevanceRow(
        target=target,
        target_logit=target_logit,
        token_relevance=token.tolist(),
        positional_relevance=positional.tolist(),
        positional_parts=[PositionalPart(name=name, kind=part.kind,
                                         relevance=part.components.sum(0).tolist())
                          for name, part in parts.items()],
        positional_relevance_per_layer=layers,
        token_type_relevance=None if token_type is None else token_type.tolist(),
        combined_relevance=combined.tolist(),
        conservation=conservation,
    )


def build_explanation(
    result: RelevanceResult,
    targets: Sequence[ResolvedTarget],
    ids: Sequence[int],
    prompt_length: int,
    tokenizer: Any,
    *,
    model: str,
    mode: str,
    per_layer: bool = False,
    per_token: bool = False,
    combination: str = DEFAULT_COMBINATION,
    spans: tuple[str, list[Token]] | None = None,
    layer_sums: Mapping[str, LayerSums] | None = None,
) -> Explanation:
    """Assemble the wire-format ``Explanation`` from the engine's raw relevance (one row per target).

    With ``per_token`` the rows are kept and the top level is the whole completion, i.e. the
    rows' sum (the modified backward is linear in its seed). ``spans``: ``token_spans``' result
    when the caller already has it. Rows beyond ``targets`` (e.g. grounding's sentence rows) are
    ignored here. ``layer_sums``: the rotary parts were summed over layers on the worker
    (``result.positional_cos/sin`` are then (B, 1, T)); by attribute, what replaces their layers.
    """
    text, tokens = spans if spans is not None else token_spans(tokenizer, ids, prompt_length)
    def present(attribute: str) -> bool:  # an additive model's cos/sin have no layers: (B, 0, T)
        value = getattr(result, attribute, None)
        return value is not None and not (value.dim() == 3 and value.shape[1] == 0)

    inputs = {name: (attribute, kind or result.position_kind)
              for name, (attribute, kind) in POSITIONAL_INPUTS.items()
              if present(attribute) and attributes_positions(mode, kind or result.position_kind)}
    with_type = result.token_type is not None and mode == "pa-lrp"
    names = {"token", "positional_cos", "positional_sin", "target_logit", "softmax_absorbed",
             *(attribute for attribute, _ in inputs.values()), *(["token_type"] * with_type)}
    cpu = {name: getattr(result, name).detach().float().cpu()[: len(targets)] for name in names}
    # every bias's share per row (B, 1): the layers', the embedding norm's and the head's
    bias = torch.zeros(cpu["softmax_absorbed"].shape[0], 1)
    for part in (result.bias_absorbed, result.embedding_bias_absorbed, result.head_bias_absorbed):
        if part is not None:
            part = part.detach().float().cpu()[: len(targets)]
            bias = bias + (part.sum(-1, keepdim=True) if part.dim() == 2 else part[:, None])
    cpu["bias_absorbed"] = bias

    sums = layer_sums or {}

    def parts(select: Callable[[torch.Tensor], torch.Tensor],
              absolute: Callable[[LayerSums], torch.Tensor | None]) -> dict[str, PositionalInput]:
        out = {}
        for name, (attribute, kind) in inputs.items():
            if attribute in sums:  # (1, T): the sum over layers
                out[name] = PositionalInput(kind, select(cpu[attribute])[0],
                                            absolute(sums[attribute]))
            else:
                out[name] = PositionalInput(kind, select(cpu[attribute]))
        return out

    def summary_absolute(part: LayerSums) -> torch.Tensor:
        if part.summary_absolute is None:
            raise ValueError("a per-token explanation's top level needs the summed rows' "
                             "Σ_l |R| (BackwardJob.summary_rows)")
        return part.summary_absolute

    rows = [
        relevance_row(target, cpu["token"][b], cpu["positional_cos"][b], cpu["positional_sin"][b],
                      float(cpu["target_logit"][b]), float(cpu["softmax_absorbed"][b].sum()), per_layer,
                      combination, float(cpu["bias_absorbed"][b].sum()),
                      parts=parts(lambda x, b=b: x[b], lambda p, b=b: p.absolute[b]),
                      token_type=cpu["token_type"][b] if with_type else None)
        for b, target in enumerate(targets)
    ]
    if per_token:
        summary = relevance_row(
            span_target(0, len(ids) - prompt_length, prompt_length, list(ids[prompt_length:]),
                        "completion"),
            cpu["token"].sum(0), cpu["positional_cos"].sum(0), cpu["positional_sin"].sum(0),
            float(cpu["target_logit"].sum()), float(cpu["softmax_absorbed"].sum()), per_layer,
            combination, float(cpu["bias_absorbed"].sum()),
            parts=parts(lambda x: x.sum(0), summary_absolute),
            token_type=cpu["token_type"].sum(0) if with_type else None,
        )
    else:
        summary, rows = rows[0], None
    return Explanation(**summary.model_dump(), wire_format_version=WIRE_FORMAT_VERSION, model=model,
                       mode=mode, combination=combination, text=text, prompt_length=prompt_length,
                       tokens=tokens, rows=rows)


def ground(explanation: Explanation, result: RelevanceResult, plan: GroundingPlan,
           sentence_row: Sequence[int]) -> "Grounding":
    """The explanation's ``Grounding``: the main target is the explanation's top level, each
    sentence is row ``sentence_row[s]`` of the batched backward's ``result``."""
    token = result.token.detach().float().cpu()
    positional = result.positional.detach().float().cpu()
    logits = result.target_logit.detach().float().cpu()
    rows = [SentenceRelevance(token[b].tolist(), positional[b].tolist(), float(logits[b]))
            for b in sentence_row]
    return build_grounding(plan.sources, explanation.token_relevance,
                           explanation.positional_relevance, explanation.prompt_length,
                           plan.sentences, rows, plan.threshold, plan.sentences_truncated)
