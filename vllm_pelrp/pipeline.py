"""One explanation, from token ids to the wire-format ``Explanation``, in four steps that the
offline ``Explainer`` and the vLLM plugin both call:

1. ``plan``: validate the request and resolve everything that needs no model: the target rows,
   the decoded tokens, the grounding plan and its sentence rows. The target 'next' is the one
   target that needs the model (the argmax next token): the plan then says ``next_first`` (the
   first row is the argmax next token, decided by whoever runs the forward), and
   ``complete_next`` fills it in from the returned token id.
2. ``job``: the plan as a ``BackwardJob`` message (token ids, seed rows, mode, recording key).
3. ``compute``: layer inputs (given, or from a forward it runs) + the job's seed rows → a
   ``BackwardResult`` message of raw relevance (fp32 arrays as bytes); the next-token argmax happens here. The
   vLLM worker calls it after picking its recording (``serving/worker.py``); the offline
   ``Explainer`` calls it in-process.
4. ``assemble``: plan + result → ``Explanation`` (``assemble.build_explanation`` and the
   grounding).

Messages cross vLLM's ``collective_rpc`` (msgpack) as ``model_dump()`` dicts and are validated on
the other side (``BackwardJob.model_validate``, ``backward_reply``). Errors the user causes are
``ExplainInputError`` (``TargetError``, ``CostError``, ``PromptError``, ``GroundingError``), each
with the request field at fault in ``param``; a server answers 400 for them by type.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from .assemble import (
    DEFAULT_COMBINATION,
    LayerSums,
    build_explanation,
    combination_rule,
    ground,
    token_spans,
)
from .errors import CostError, ExplainInputError, GroundingError, PromptError, TargetError
from .targets import (
    MAX_PER_TOKEN_ROWS,
    check_mode,
    needs_next_token,
    parse_target,
    resolve_targets,
)
from .engine.additive import (
    AdditiveWeights,
    additive_model,
    relevance_from_forward,
    sequence_classification_logits,
)
from .engine.additive import run_forward as run_additive_forward
from .engine.backward import rotary_model
from .engine.driver import (
    DEFAULT_CACHE_BUDGET_BYTES,
    ForwardPass,
    HiddenSeed,
    LogitSeeds,
    RelevanceResult,
    relevance,
)
from .engine.driver import run_forward as run_block_forward
from .engine.heads import (
    ClassifierHead,
    HeadTargetError,
    Pooling,
    dimension_seed,
    label_seed,
    pool,
    similarity_seeds,
)
from .explanation import Explanation, Mode, ResolvedTarget, SpanTarget, Token, TokenIdTarget
from .prompts import message_contents
from .grounding import (
    DEFAULT_GROUNDING_THRESHOLD,
    GroundingPlan,
    SourceSpec,
    check_threshold,
    parse_sources,
    plan_grounding,
    sentence_rows,
)

__all__ = [
    "BackwardFailure", "BackwardJob", "BackwardResult", "CostError", "ExplainInputError",
    "Float32Array", "LayeredRelevance",
    "GroundingError", "Plan", "PromptError", "TargetError", "assemble", "backward_reply",
    "check_token_ids", "complete_next", "compute", "job", "message_contents", "plan",
    "EncoderJob", "EncoderPlan", "EncoderResult", "assemble_encoder", "compute_encoder",
    "compute_similarities", "encoder_job", "encoder_passes", "plan_encoder", "shared_query_groups",
]


# ---- 1. the plan ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Everything about one explanation that needs no model.

    ``targets``: the main targets (the explanation's top level, or its per-token rows); empty
    while ``next_first``. ``rows``: every row of the batched backward, main targets first, then
    the grounding's sentence rows; ``sentence_row[s]``: the row of sentence s. With
    ``next_first`` the argmax next token's row comes before all of ``rows`` once known
    (``complete_next``)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    target: str | SpanTarget | TokenIdTarget
    mode: str
    vocab_size: int
    targets: list[ResolvedTarget]
    rows: list[ResolvedTarget]
    sentence_row: list[int]
    grounding: GroundingPlan | None
    spans: tuple[str, list[Token]]
    next_first: bool = False

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids)

    @property
    def per_token(self) -> bool:
        return self.target == "per_token"

    @property
    def num_rows(self) -> int:
        """Rows of the backward, the pending 'next' row included (for cost caps)."""
        return len(self.rows) + int(self.next_first)

    def seed_rows(self) -> list[list[tuple[int, int]]]:
        """Per row of ``rows``, its (position, token id) pairs: the backward's seeds."""
        return [list(zip(t.positions, t.token_ids)) for t in self.rows]


def check_token_ids(prompt_ids: Sequence[int], completion_ids: Sequence[int],
                    vocab_size: int) -> None:
    """A non-empty prompt and every id inside the vocabulary (``PromptError`` otherwise)."""
    if not prompt_ids:
        raise PromptError("the prompt is empty")
    if any(not 0 <= int(i) < vocab_size for i in (*prompt_ids, *completion_ids)):
        raise PromptError(f"token ids must lie in [0, {vocab_size}): the model's vocabulary")


def plan(
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    target: Any,
    *,
    tokenizer: Any,
    vocab_size: int,
    mode: str = "pa-lrp",
    max_per_token_rows: int = MAX_PER_TOKEN_ROWS,
    documents: Sequence[str] | None = None,
    sources: Sequence[SourceSpec | dict] | None = None,
    grounding_threshold: float = DEFAULT_GROUNDING_THRESHOLD,
    sentences: bool = True,
    message_contents: Sequence[str | None] | None = None,
) -> Plan:
    """Validate and resolve an explanation of ``target`` on prompt + completion (token ids).

    ``documents`` (already rendered into the prompt) and ``sources`` declare the grounding's
    sources; ``message_contents`` (each chat message's content as rendered, None for a non-text
    one) places ``{'message': i}`` sources. Raises ``ExplainInputError`` subclasses naming the
    field at fault."""
    check_mode(mode)
    prompt = [int(i) for i in prompt_ids]
    completion = [int(i) for i in completion_ids]
    check_token_ids(prompt, completion, vocab_size)
    parsed = parse_target(target)
    next_first = needs_next_token(parsed)
    targets = [] if next_first else resolve_targets(parsed, len(prompt), completion, vocab_size,
                                                    None, max_per_token_rows)
    specs = parse_sources(sources)
    threshold = check_threshold(grounding_threshold)
    spans = token_spans(tokenizer, prompt + completion, len(prompt))
    grounding, rows, sentence_row = None, list(targets), []
    if documents or specs:
        grounding = plan_grounding(*spans, len(prompt), specs=specs, documents=documents,
                                   message_contents=message_contents,
                                   skip_token_ids=getattr(tokenizer, "all_special_ids", ()),
                                   threshold=threshold, sentences=sentences)
        rows, sentence_row = sentence_rows(targets, grounding, len(prompt), completion)
    return Plan(prompt, completion, parsed, mode, vocab_size, targets, rows, sentence_row,
                grounding, spans, next_first)


def complete_next(plan: Plan, next_token_id: int) -> Plan:
    """The plan of target 'next' once the argmax next token is known: its row goes first (the
    backward put it there), the sentence rows move one down. Other plans are returned as they
    are."""
    if not plan.next_first:
        return plan
    targets = resolve_targets("next", plan.prompt_length, plan.completion_ids, plan.vocab_size,
                              int(next_token_id))
    return replace(plan, targets=targets, rows=targets + plan.rows,
                   sentence_row=[b + 1 for b in plan.sentence_row], next_first=False)


# ---- 2. the messages --------------------------------------------------------------------------
class BackwardJob(BaseModel):
    """One backward pass to run (API process → worker)."""

    model_config = ConfigDict(extra="forbid")

    token_ids: list[int] = Field(description="Prompt + completion.")
    prompt_length: int
    seeds: list[list[tuple[int, int]]] = Field(
        description="Per target row, its (position, token id) pairs; without the 'next' row.")
    mode: Mode
    next_first: bool = Field(
        False, description="Target 'next': the argmax next token's row goes first, before "
        "`seeds`, and its id comes back as `next_token_id`.")
    key: str | None = Field(
        None, description="The recording to explain (the request's signed key); None: run a "
        "forward for the layer inputs (/v1/explain, the offline Explainer).")
    per_layer: bool = Field(
        False, description="Send the rotary parts' relevance layer by layer (the explanation's "
        "per_layer output, a per-part combination); otherwise only their sums over layers.")
    summary_rows: int = Field(
        0, ge=0, description="Target 'per_token': the first n rows are summed into the "
        "explanation's top level, whose Σ_l |Σ_b R| of each rotary part comes back too.")


class Float32Array(BaseModel):
    """An fp32 array as a message: its shape and its values as raw little-endian bytes (C order).
    vLLM's msgpack transport carries the bytes as one binary field, where a nested list of
    floats costs an encode and a decode per number."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: list[int]
    data: bytes

    @model_validator(mode="after")
    def _sized(self) -> "Float32Array":
        if any(n < 0 for n in self.shape) or len(self.data) != 4 * math.prod(self.shape):
            raise ValueError(f"{len(self.data)} bytes do not hold an fp32 array of shape "
                             f"{self.shape}")
        return self

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> "Float32Array":
        """The array of ``tensor`` (any dtype or device; copied to host fp32 once)."""
        value = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
        return cls.model_construct(shape=list(value.shape),
                                   data=value.astype("<f4", copy=False).tobytes())

    def to_numpy(self) -> np.ndarray:
        """The values, read-only (a view of ``data``)."""
        return np.frombuffer(self.data, dtype="<f4").reshape(self.shape)

    def to_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.to_numpy().astype(np.float32))  # a writable copy


class LayeredRelevance(BaseModel):
    """One rotary part's relevance (RoPE's cos or sin; (B, L, T) on the worker) as far as the
    explanation needs it: its sum over layers and the sum of its absolute values (what an
    abs-single combination adds) always, the layers only when the job asks for them."""

    model_config = ConfigDict(extra="forbid")

    total: Float32Array = Field(description="(B, T): Σ_l R_l.")
    absolute: Float32Array = Field(description="(B, T): Σ_l |R_l|.")
    layers: Float32Array | None = Field(None, description="(B, L, T), with `per_layer`.")
    summary_absolute: Float32Array | None = Field(
        None, description="(T,): Σ_l |Σ_{b<n} R_{b,l}| with `summary_rows` = n.")

    @classmethod
    def of(cls, value: torch.Tensor, per_layer: bool, summary_rows: int) -> "LayeredRelevance":
        """The message of ``value`` (B, L, T)."""
        summary = value[:summary_rows].sum(0).abs().sum(0) if summary_rows else None
        return cls.model_construct(
            total=Float32Array.from_tensor(value.sum(1)),
            absolute=Float32Array.from_tensor(value.abs().sum(1)),
            layers=Float32Array.from_tensor(value) if per_layer else None,
            summary_absolute=None if summary is None else Float32Array.from_tensor(summary))


class BackwardResult(BaseModel):
    """Raw relevance of a backward pass (worker → API process) as fp32 arrays, one row per
    target row (the 'next' row first when asked). T is the job's token count (positions the
    recording did not need are zero), L the number of layers."""

    model_config = ConfigDict(extra="forbid")

    token: Float32Array = Field(description="(B, T)")
    positional_cos: LayeredRelevance | None = Field(
        None, description="RoPE's cos; None for a model without rotary positions.")
    positional_sin: LayeredRelevance | None = None
    target_logit: Float32Array = Field(description="(B,)")
    softmax_absorbed: Float32Array = Field(description="(B, L)")
    bias_absorbed: Float32Array | None = Field(
        None, description="(B, L); None for a model without biases.")
    position_embedding: Float32Array | None = Field(
        None, description="(B, T): an additive position table's relevance (BERT, GPT-2); None "
        "for a rotary model.")
    position_kind: Literal["learned", "absolute"] | None = None
    token_type: Float32Array | None = Field(
        None, description="(B, T): the token-type embedding's relevance (BERT); None without.")
    embedding_bias_absorbed: Float32Array | None = Field(
        None, description="(B,): what the embedding's LayerNorm β keeps (BERT); None without.")
    head_bias_absorbed: Float32Array | None = Field(
        None, description="(B,): what the head's biases keep (GPT-2's ln_f β; pooler and "
        "classifier); None without.")
    next_token_id: int | None = None
    seconds: float = Field(0.0, description="Time of the whole job on the worker.")
    recomputed_rows: int = Field(0, description="Positions whose layer inputs were recomputed.")
    queue_seconds: float | None = Field(
        None, description="Time the job waited for other backward passes (worker scheduler).")

    @classmethod
    def from_relevance(cls, result: RelevanceResult, length: int, *, per_layer: bool = False,
                       summary_rows: int = 0, **fields: Any) -> "BackwardResult":
        """The message of the engine's ``result``, its positions padded with zeros to
        ``length``; the rotary parts per layer only with ``per_layer`` (``BackwardJob``)."""
        def padded(tensor: torch.Tensor) -> torch.Tensor:
            value = tensor.float()
            if value.shape[-1] < length:
                value = torch.nn.functional.pad(value, (0, length - value.shape[-1]))
            return value

        def array(tensor: torch.Tensor | None, pad: bool = False) -> Float32Array | None:
            if tensor is None:
                return None
            return Float32Array.from_tensor(padded(tensor) if pad else tensor)

        def rotary(tensor: torch.Tensor) -> LayeredRelevance | None:
            if tensor.dim() == 3 and tensor.shape[1] == 0:  # an additive model's (B, 0, T)
                return None
            return LayeredRelevance.of(padded(tensor), per_layer, summary_rows)

        # arrays straight from tensors: nothing to validate (the receiver does)
        return cls.model_construct(
            token=array(result.token, True), positional_cos=rotary(result.positional_cos),
            positional_sin=rotary(result.positional_sin),
            target_logit=array(result.target_logit),
            softmax_absorbed=array(result.softmax_absorbed),
            bias_absorbed=array(result.bias_absorbed),
            position_embedding=array(result.position_embedding, True),
            position_kind=result.position_kind, token_type=array(result.token_type, True),
            embedding_bias_absorbed=array(result.embedding_bias_absorbed),
            head_bias_absorbed=array(result.head_bias_absorbed), **fields)

    @property
    def has_layers(self) -> bool:
        """Whether the rotary parts came layer by layer (or there are none)."""
        return all(part is None or part.layers is not None
                   for part in (self.positional_cos, self.positional_sin))

    def relevance(self) -> RelevanceResult:
        """The engine's ``RelevanceResult`` again (fp32 CPU tensors), for ``assemble``. Without
        the layers (``has_layers``), each rotary part is (B, 1, T): its sum over layers
        (``layer_sums`` has the rest)."""
        def optional(value: Float32Array | None) -> torch.Tensor | None:
            return None if value is None else value.to_tensor()

        token = self.token.to_tensor()

        def rotary(part: LayeredRelevance | None) -> torch.Tensor:
            if part is None:  # no rotary positions: no layers
                return token.new_zeros(token.shape[0], 0, token.shape[-1])
            if part.layers is not None:
                return part.layers.to_tensor()
            return part.total.to_tensor().unsqueeze(1)

        return RelevanceResult(
            token=token,
            positional_cos=rotary(self.positional_cos),
            positional_sin=rotary(self.positional_sin),
            target_logit=self.target_logit.to_tensor(),
            softmax_absorbed=self.softmax_absorbed.to_tensor(),
            bias_absorbed=optional(self.bias_absorbed),
            position_embedding=optional(self.position_embedding),
            position_kind=self.position_kind,
            token_type=optional(self.token_type),
            embedding_bias_absorbed=optional(self.embedding_bias_absorbed),
            head_bias_absorbed=optional(self.head_bias_absorbed),
        )

    def layer_sums(self) -> dict[str, LayerSums] | None:
        """Without the layers: what ``build_explanation`` needs of each rotary part instead, by
        ``RelevanceResult`` attribute; None with them."""
        if self.has_layers:
            return None
        return {name: LayerSums(part.absolute.to_tensor(),
                                None if part.summary_absolute is None
                                else part.summary_absolute.to_tensor())
                for name, part in (("positional_cos", self.positional_cos),
                                   ("positional_sin", self.positional_sin))}


class BackwardFailure(BaseModel):
    """A job that failed on the worker (no recording, cancelled, an engine error)."""

    model_config = ConfigDict(extra="forbid")

    error: str
    queue_seconds: float | None = None


_REPLY = TypeAdapter(BackwardFailure | BackwardResult)


def backward_reply(data: dict[str, Any]) -> BackwardResult | BackwardFailure:
    """Validate one job's reply as it arrives from the worker."""
    return _REPLY.validate_python(data)


def job(plan: Plan, key: str | None = None, *, per_layer: bool = False,
        combination: str = DEFAULT_COMBINATION) -> BackwardJob:
    """The backward pass of ``plan``; ``key``: the recording to explain. The rotary parts come
    back layer by layer only where ``assemble`` will need them: ``per_layer`` output or a
    per-part ``combination`` (which normalises every layer on its own)."""
    return BackwardJob(token_ids=plan.ids, prompt_length=plan.prompt_length,
                       seeds=plan.seed_rows(), mode=plan.mode, next_first=plan.next_first,
                       key=key, per_layer=per_layer or combination_rule(combination)[1],
                       summary_rows=len(plan.targets) if plan.per_token else 0)


# ---- 3. the backward --------------------------------------------------------------------------
def block_model(weights: Any):
    """The engine's blocks of ``weights`` (a rotary decoder's or an additive-position model's)."""
    return additive_model(weights) if isinstance(weights, AdditiveWeights) else rotary_model(weights)


@torch.no_grad()
def compute(
    weights: Any,
    job: BackwardJob,
    layer_inputs: Sequence[torch.Tensor] | None = None,
    *,
    forward: ForwardPass | None = None,
    checkpoint: Callable[[], None] | None = None,
    row_chunk: int | None = None,
    recompute_executor: Any = None,
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
) -> BackwardResult:
    """Raw relevance of ``job``'s rows from the layer inputs (the saved residual stream).

    ``layer_inputs`` cover every position of ``job.token_ids``, or all but the last (a
    recording: the last completion token was never fed to the model). Without them (and without
    ``forward``, a ``run_forward`` of the same ids) a plain forward runs first and its per-layer
    caches, when they fit ``cache_budget_bytes``, spare the backward its recomputes. A model
    whose positions are an additive table (GPT-2) is never recorded: it always runs the
    forward. With ``job.next_first`` the argmax next token after the inputs is the first row.
    ``checkpoint``, ``row_chunk``, ``recompute_executor``: as in ``engine.driver.relevance``."""
    started = time.perf_counter()
    total = len(job.token_ids)
    model = block_model(weights)
    device = model.device
    if isinstance(weights, AdditiveWeights) and layer_inputs is not None:
        raise ValueError("an additive-position model is explained from its token ids")
    recomputed = 0
    if layer_inputs is None:
        if forward is None:
            forward = run_block_forward(model, torch.tensor(job.token_ids, device=device),
                                        cache_budget_bytes=cache_budget_bytes,
                                        checkpoint=checkpoint)
            recomputed = total
        layer_inputs = forward.layer_inputs
    length = int(layer_inputs[0].shape[0])
    if length not in (total, total - 1) or (job.next_first and length != total):
        raise ValueError(f"layer inputs for {length} positions do not fit the job's {total} "
                         "tokens (all of them, or all but the last one)")
    positions = torch.arange(length, device=device)
    rows = [[(int(p), int(t)) for p, t in row] for row in job.seeds]
    next_token_id = None
    if job.next_first:  # its seed is known only now; it comes first
        if forward is not None:
            last = forward.last_output
        else:  # the last layer once more, on its saved input
            last, _ = model.layers[-1].forward(layer_inputs[-1], model.positions(positions),
                                               keep_cache=False)
        next_token_id = int(model.head.logits(last[-1:])[0].argmax())
        rows = [[(length - 1, next_token_id)]] + rows
    if not rows:
        raise ValueError("the job has no targets")
    result = relevance(model, layer_inputs, positions, LogitSeeds.from_rows(rows, device),
                       job.mode, checkpoint, forward=forward, row_chunk=row_chunk,
                       recompute_executor=recompute_executor)
    return BackwardResult.from_relevance(result, total, per_layer=job.per_layer,
                                         summary_rows=job.summary_rows,
                                         next_token_id=next_token_id,
                                         recomputed_rows=recomputed,
                                         seconds=time.perf_counter() - started)


# ---- 4. the explanation -----------------------------------------------------------------------
def assemble(plan: Plan, result: BackwardResult, *, model: str, per_layer: bool = False,
             combination: str = DEFAULT_COMBINATION) -> Explanation:
    """The wire-format ``Explanation`` of ``plan`` from the backward's ``result`` (the 'next'
    row completed from ``result.next_token_id``), with its grounding when sources were
    declared."""
    if plan.next_first:
        if result.next_token_id is None:
            raise ValueError("target 'next': the result has no next_token_id")
        plan = complete_next(plan, result.next_token_id)
    if result.target_logit.shape[0] != len(plan.rows):
        raise ValueError(f"the result has {result.target_logit.shape[0]} rows, the plan "
                         f"{len(plan.rows)}")
    if (per_layer or combination_rule(combination)[1]) and not result.has_layers:
        raise ValueError("per_layer output and per-part combinations need the rotary parts "
                         "layer by layer: ask for them in the job (pipeline.job)")
    relevance = result.relevance()
    explanation = build_explanation(relevance, plan.targets, plan.ids, plan.prompt_length, None,
                                    model=model, mode=plan.mode, per_layer=per_layer,
                                    per_token=plan.per_token, combination=combination,
                                    spans=plan.spans, layer_sums=result.layer_sums())
    if plan.grounding is not None:
        explanation.grounding = ground(explanation, relevance, plan.grounding, plan.sentence_row)
    return explanation


# ---- encoders: embedding, reranking and classification models -----------------------------------
# The same four steps for a BERT-family encoder (``engine/additive.py``, ``engine/heads.py``): the
# target is a function of the pooled embedding or of the classifier head, not a logit of the LM.
ENCODER_TARGET_HELP = ("{'dimension': k} (of the pooled embedding, before normalisation), "
                       "{'similarity': other_text} or {'label': i}")


@dataclass(frozen=True)
class EncoderPlan:
    """An encoder explanation before the model runs: the texts' token ids (one, or two for
    'similarity': the explained text first, the other second), their token types, the target
    (``{'dimension': k}``, ``{'similarity': 1}``, ``{'label': i}``) and each text's decoded
    tokens."""

    texts: list[list[int]]
    token_type_ids: list[list[int]] | None
    target: dict[str, int]
    mode: str
    spans: list[tuple[str, list[Token]]]
    label_name: str | None = None


class EncoderJob(BaseModel):
    """One encoder explanation to compute (API process → worker)."""

    model_config = ConfigDict(extra="forbid")

    texts: list[list[int]] = Field(description="Token ids of each text: one, or two for "
                                   "'similarity' (the explained text first).")
    token_type_ids: list[list[int]] | None = Field(
        None, description="Per text, its token types (a cross-encoder's pair); None: all 0.")
    target: dict[Literal["dimension", "similarity", "label"], int] = Field(
        description="{'dimension': k}, {'similarity': 1} (the index of the other text) or "
        "{'label': i}.")
    mode: Mode


class EncoderResult(BaseModel):
    """Raw relevance of an encoder job (worker → API process): one ``BackwardResult`` of one
    row per text, and the target's value (the cosine for 'similarity')."""

    model_config = ConfigDict(extra="forbid")

    texts: list[BackwardResult]
    value: float
    seconds: float = 0.0


def _encoder_tokens(tokenizer: Any, text: str | Sequence[int], pair: str | None, param: str,
                    max_length: int | None) -> tuple[list[int], list[int] | None]:
    if isinstance(text, str):
        encoded = tokenizer(text, pair) if pair is not None else tokenizer(text)
        ids = [int(i) for i in encoded["input_ids"]]
        types = encoded.get("token_type_ids")
        types = [int(t) for t in types] if types is not None else None
    else:
        if pair is not None:
            raise PromptError("a text pair needs the first text as text, not token ids", param)
        ids, types = [int(i) for i in text], None
    if not ids:
        raise PromptError("the text has no tokens", param)
    if max_length is not None and len(ids) > max_length:
        raise PromptError(f"{len(ids)} tokens exceed the model's {max_length} positions", param)
    return ids, types


def plan_encoder(tokenizer: Any, text: str | Sequence[int], target: Any, *,
                 mode: str = "pa-lrp", text_pair: str | None = None, vocab_size: int,
                 max_length: int | None = None, has_token_types: bool = True,
                 label_names: dict[int, str] | None = None) -> EncoderPlan:
    """Validate and tokenize an encoder explanation of ``text`` (a string or token ids;
    ``text_pair``: a cross-encoder's second text). ``target``: ``{'dimension': k}``,
    ``{'similarity': other}`` (a text or token ids) or ``{'label': i or name}``. Raises
    ``ExplainInputError`` subclasses naming the field at fault."""
    check_mode(mode)
    if hasattr(target, "model_dump"):
        target = target.model_dump()
    if not isinstance(target, dict) or len(target) != 1 or \
            next(iter(target)) not in ("dimension", "similarity", "label"):
        raise TargetError(f"unknown encoder target {target!r}; allowed: {ENCODER_TARGET_HELP}")
    kind, value = next(iter(target.items()))
    ids, types = _encoder_tokens(tokenizer, text, text_pair, "text", max_length)
    texts, token_types = [ids], [types]
    label_name = None
    if kind == "similarity":
        if text_pair is not None:
            raise TargetError("'similarity' compares two texts' embeddings; a text pair is for "
                              "a cross-encoder's {'label': i}")
        if isinstance(value, bool) or isinstance(value, int):
            raise TargetError("{'similarity': other} takes the other text (or its token ids); "
                              "an index of another input is for /v1/embeddings")
        if not isinstance(value, (str, list, tuple)):
            raise TargetError(f"{{'similarity': other}}: other must be text or token ids, got "
                              f"{value!r}")
        other_ids, other_types = _encoder_tokens(tokenizer, value, None, "target", max_length)
        texts.append(other_ids)
        token_types.append(other_types)
        resolved = {"similarity": 1}
    else:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or \
                (kind == "dimension" and not isinstance(value, int)):
            raise TargetError(f"{{'{kind}': …}} takes a whole number"
                              f"{' or a label name' if kind == 'label' else ''}, got {value!r}")
        if kind == "label" and isinstance(value, str):
            by_name = {name: int(i) for i, name in (label_names or {}).items()}
            if value not in by_name:
                raise TargetError(f"unknown label {value!r}; allowed: "
                                  f"{', '.join(map(repr, by_name)) or 'label indices'}")
            value = by_name[value]
        if kind == "label" and label_names:
            label_name = label_names.get(int(value))
        resolved = {kind: int(value)}
    for number, row in enumerate(texts):
        if any(not 0 <= i < vocab_size for i in row):
            raise PromptError(f"token ids must lie in [0, {vocab_size}): the model's vocabulary",
                              "text" if number == 0 else "target")
    if not has_token_types or all(t is None for t in token_types):
        token_type_ids = None
    else:
        token_type_ids = [t if t is not None else [0] * len(ids)
                          for t, ids in zip(token_types, texts)]
    spans = [token_spans(tokenizer, row, len(row)) for row in texts]
    return EncoderPlan(texts, token_type_ids, resolved, mode, spans, label_name)


def encoder_job(plan: EncoderPlan) -> EncoderJob:
    return EncoderJob(texts=plan.texts, token_type_ids=plan.token_type_ids, target=plan.target,
                      mode=plan.mode)


def shared_query_groups(jobs: Sequence[EncoderPlan | EncoderJob]) -> list[list[int]]:
    """The jobs' indices in the groups the worker computes together: 'similarity' jobs with the
    same first text (token ids and token types) and mode form one group, whose query runs one
    forward and one backward for all its documents (``compute_similarities``); any other job is
    a group of its own. Groups come in the order of their first job."""
    groups: list[list[int]] = []
    by_query: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        if "similarity" not in job.target or len(job.texts) != 2:
            groups.append([index])
            continue
        types = job.token_type_ids[0] if job.token_type_ids else None
        key = (tuple(job.texts[0]), None if types is None else tuple(types), job.mode)
        if key not in by_query:
            by_query[key] = []
            groups.append(by_query[key])
        by_query[key].append(index)
    return groups


def encoder_passes(jobs: Sequence[EncoderPlan | EncoderJob]) -> list[list[tuple[int, int]]]:
    """(target rows, tokens) of each forward-and-backward the worker runs for ``jobs``, one list
    per group of ``shared_query_groups``: its first text with one row per job (a shared query:
    one per document), then every job's other text with one row."""
    return [[(len(group), len(jobs[group[0]].texts[0]))]
            + [(1, len(text)) for i in group for text in jobs[i].texts[1:]]
            for group in shared_query_groups(jobs)]


def _encoder_backward_result(result: RelevanceResult, length: int) -> BackwardResult:
    return BackwardResult.from_relevance(result, length, recomputed_rows=length)


@torch.no_grad()
def compute_similarities(weights: AdditiveWeights, jobs: Sequence[EncoderJob], *,
                         pooling: Pooling, checkpoint: Callable[[], None] | None = None,
                         row_chunk: int | None = None) -> list[EncoderResult | TargetError]:
    """Raw relevance of 'similarity' jobs that share their first text, the query (one group of
    ``shared_query_groups``): one forward of the query; per document its forward, both sides'
    seeds (``similarity_seeds``) and its backward (one row); then one backward of the query with
    one seed row per document. Each result equals its job's alone; a document whose cosine is
    undefined gets its ``TargetError`` in place of a result."""
    started = time.perf_counter()
    if not jobs:
        return []
    first = jobs[0]
    shared = shared_query_groups(jobs)
    if len(shared) != 1 or "similarity" not in first.target:
        raise ValueError("compute_similarities takes 'similarity' jobs of one query and mode")
    device = weights.device

    def forward(ids: list[int], types: list[int] | None):
        return run_additive_forward(weights, torch.tensor(ids, device=device),
                                    None if types is None else torch.tensor(types, device=device))

    types = [job.token_type_ids or [None, None] for job in jobs]
    query = forward(first.texts[0], types[0][0])
    outcomes: list[EncoderResult | TargetError | None] = [None] * len(jobs)
    done = []  # (job number, the query's seed, the cosine, the document's result)
    for number, job in enumerate(jobs):
        document = forward(job.texts[1], types[number][1])
        try:
            seeds = similarity_seeds(query.final_hidden, document.final_hidden, pooling)
        except HeadTargetError as error:
            outcomes[number] = TargetError(str(error))
            continue
        other = relevance_from_forward(weights, document, seeds.second, job.mode, checkpoint,
                                       row_chunk)
        done.append((number, seeds.first.gradient, float(seeds.cosine),
                     _encoder_backward_result(other, len(job.texts[1]))))
        del document  # one document's forward alive at a time (budget.encoder_need)
    if done:
        seed = HiddenSeed(torch.cat([gradient for _, gradient, _, _ in done]))
        result = relevance_from_forward(weights, query, seed, first.mode, checkpoint, row_chunk)
        seconds = (time.perf_counter() - started) / len(jobs)
        for row, (number, _, value, other) in enumerate(done):
            mine = _encoder_backward_result(result.row(row), len(first.texts[0]))
            outcomes[number] = EncoderResult(texts=[mine, other], value=value, seconds=seconds)
    return outcomes


@torch.no_grad()
def compute_encoder(weights: AdditiveWeights, job: EncoderJob, *, pooling: Pooling,
                    head: ClassifierHead | None = None,
                    checkpoint: Callable[[], None] | None = None,
                    row_chunk: int | None = None) -> EncoderResult:
    """Raw relevance of an encoder job: a forward of each text, the target's seed from the head
    (``engine/heads.py``), the backward of each text ('similarity': ``compute_similarities``)."""
    started = time.perf_counter()
    device = weights.device
    kind, value = next(iter(job.target.items()))
    if (kind == "similarity") != (len(job.texts) == 2) or len(job.texts) not in (1, 2):
        raise ValueError(f"a {kind!r} job needs {'two texts' if kind == 'similarity' else 'one text'}")
    if kind == "similarity":
        outcome = compute_similarities(weights, [job], pooling=pooling, checkpoint=checkpoint,
                                       row_chunk=row_chunk)[0]
        if isinstance(outcome, TargetError):
            raise outcome
        return outcome
    types = job.token_type_ids[0] if job.token_type_ids else None
    ids = job.texts[0]
    forward = run_additive_forward(weights, torch.tensor(ids, device=device),
                                   None if types is None else torch.tensor(types, device=device))
    hidden = forward.final_hidden
    try:
        if kind == "dimension":
            seed = dimension_seed(hidden, value, pooling)
            value = float(pool(hidden, pooling)[value])
        else:
            if head is None:
                raise HeadTargetError("this model has no sequence-classification head: "
                                      "{'label': i} needs one (BertForSequenceClassification); "
                                      "an embedding model allows {'dimension': k} and "
                                      "{'similarity': other}")
            seed = label_seed(hidden, value, head)
            value = float(sequence_classification_logits(weights, hidden)[value])
    except HeadTargetError as error:
        raise TargetError(str(error)) from None
    result = relevance_from_forward(weights, forward, seed, job.mode, checkpoint, row_chunk)
    return EncoderResult(texts=[_encoder_backward_result(result, len(ids))],
                         value=value, seconds=time.perf_counter() - started)


def _encoder_target(plan: EncoderPlan, value: float, side: int) -> ResolvedTarget:
    kind, index = next(iter(plan.target.items()))
    if kind == "similarity":
        which = "this text" if side == 0 else "the other text"
        description = (f"cosine similarity {value:.4f} of the two texts' pooled embeddings; "
                       f"{which} explains half of it (norms held, uniform rule)")
        return ResolvedTarget(kind="similarity", description=description, positions=[],
                              token_ids=[], value=value)
    if kind == "dimension":
        return ResolvedTarget(kind="dimension", positions=[], token_ids=[], dimension=index,
                              value=value, description=f"dimension {index} of the pooled "
                              f"embedding (before normalisation): {value:.4f}")
    name = f" ({plan.label_name!r})" if plan.label_name else ""
    return ResolvedTarget(kind="label", positions=[], token_ids=[], label=index, value=value,
                          description=f"logit of label {index}{name}: {value:.4f}")


def assemble_encoder(plan: EncoderPlan, result: EncoderResult, *, model: str,
                     combination: str = DEFAULT_COMBINATION) -> Explanation:
    """The wire-format ``Explanation`` of the first text; for 'similarity' the other text's is
    its ``other``."""
    if len(result.texts) != len(plan.texts):
        raise ValueError(f"the result has {len(result.texts)} texts, the plan {len(plan.texts)}")
    explanations = []
    for side, (ids, spans, raw) in enumerate(zip(plan.texts, plan.spans, result.texts)):
        explanations.append(build_explanation(
            raw.relevance(), [_encoder_target(plan, result.value, side)], ids, len(ids), None,
            model=model, mode=plan.mode, combination=combination, spans=spans))
    first = explanations[0]
    if len(explanations) == 2:
        first.other = explanations[1]
    return first
