"""One explanation, from token ids to the wire-format ``Explanation``, in four steps that the
offline ``Explainer`` and the vLLM plugin both call:

1. ``plan``: validate the request and resolve everything that needs no model: the target rows,
   the decoded tokens, the grounding plan and its sentence rows. The target 'next' is the one
   target that needs the model (the argmax next token): the plan then says ``next_first`` (the
   first row is the argmax next token, decided by whoever runs the forward), and
   ``complete_next`` fills it in from the returned token id.
2. ``job``: the plan as a ``BackwardJob`` message (token ids, seed rows, mode, recording key).
3. ``compute``: layer inputs (given, or from a forward it runs) + the job's seed rows → a
   ``BackwardResult`` message of raw relevance lists; the next-token argmax happens here. The
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

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .assemble import (
    DEFAULT_COMBINATION,
    MAX_PER_TOKEN_ROWS,
    CostError,
    ExplainInputError,
    GroundingError,
    PromptError,
    TargetError,
    build_explanation,
    check_mode,
    ground,
    needs_next_token,
    parse_target,
    resolve_targets,
    token_spans,
)
from .engine.backward import (
    DEFAULT_CACHE_BUDGET_BYTES,
    ForwardPass,
    LogitSeeds,
    RelevanceResult,
    argmax_next_token,
    final_logits,
    relevance_from_layer_inputs,
    run_forward,
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
    "GroundingError", "Plan", "PromptError", "TargetError", "assemble", "backward_reply",
    "check_token_ids", "complete_next", "compute", "job", "message_contents", "plan",
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


class BackwardResult(BaseModel):
    """Raw relevance of a backward pass (worker → API process), fp32 numbers as lists, one row
    per target row (the 'next' row first when asked). T is the job's token count (positions the
    recording did not need are zero), L the number of layers."""

    model_config = ConfigDict(extra="forbid")

    token: list[list[float]] = Field(description="(B, T)")
    positional_cos: list[list[list[float]]] = Field(description="(B, L, T)")
    positional_sin: list[list[list[float]]] = Field(description="(B, L, T)")
    target_logit: list[float] = Field(description="(B,)")
    softmax_absorbed: list[list[float]] = Field(description="(B, L)")
    bias_absorbed: list[list[float]] | None = Field(
        None, description="(B, L); None for a model without biases.")
    next_token_id: int | None = None
    seconds: float = Field(0.0, description="Time of the whole job on the worker.")
    recomputed_rows: int = Field(0, description="Positions whose layer inputs were recomputed.")
    queue_seconds: float | None = Field(
        None, description="Time the job waited for other backward passes (worker scheduler).")

    @classmethod
    def from_relevance(cls, result: RelevanceResult, length: int, **fields: Any
                       ) -> "BackwardResult":
        """The message of the engine's ``result``, its positions padded with zeros to
        ``length``."""
        def lists(tensor: torch.Tensor, pad: bool = False) -> list:
            value = tensor.float().cpu()
            if pad and value.shape[-1] < length:
                value = torch.nn.functional.pad(value, (0, length - value.shape[-1]))
            return value.tolist()

        bias = result.bias_absorbed
        # lists of floats straight from tensors: nothing to validate (the receiver does)
        return cls.model_construct(
            token=lists(result.token, True), positional_cos=lists(result.positional_cos, True),
            positional_sin=lists(result.positional_sin, True),
            target_logit=lists(result.target_logit),
            softmax_absorbed=lists(result.softmax_absorbed),
            bias_absorbed=None if bias is None else lists(bias), **fields)

    def relevance(self) -> RelevanceResult:
        """The engine's ``RelevanceResult`` again (fp32 CPU tensors), for ``assemble``."""
        def tensor(value: list) -> torch.Tensor:  # through numpy: 4x faster than torch.tensor
            return torch.from_numpy(np.asarray(value, dtype=np.float32))

        bias = self.bias_absorbed
        return RelevanceResult(
            token=tensor(self.token),
            positional_cos=tensor(self.positional_cos),
            positional_sin=tensor(self.positional_sin),
            target_logit=tensor(self.target_logit),
            softmax_absorbed=tensor(self.softmax_absorbed),
            bias_absorbed=None if bias is None else tensor(bias),
        )


class BackwardFailure(BaseModel):
    """A job that failed on the worker (no recording, cancelled, an engine error)."""

    model_config = ConfigDict(extra="forbid")

    error: str
    queue_seconds: float | None = None


_REPLY = TypeAdapter(BackwardFailure | BackwardResult)


def backward_reply(data: dict[str, Any]) -> BackwardResult | BackwardFailure:
    """Validate one job's reply as it arrives from the worker."""
    return _REPLY.validate_python(data)


def job(plan: Plan, key: str | None = None) -> BackwardJob:
    """The backward pass of ``plan``; ``key``: the recording to explain."""
    return BackwardJob(token_ids=plan.ids, prompt_length=plan.prompt_length,
                       seeds=plan.seed_rows(), mode=plan.mode, next_first=plan.next_first,
                       key=key)


# ---- 3. the backward --------------------------------------------------------------------------
def next_token(weights: Any, layer_inputs: Sequence[torch.Tensor], positions: torch.Tensor,
               forward: ForwardPass | None = None) -> int:
    """The model's argmax token after the last position: from the forward's last hidden state
    when there is one, else by running the last layer on its saved input."""
    if forward is not None:
        return int(final_logits(weights, forward.final_hidden[-1:])[0].argmax())
    return argmax_next_token(weights, layer_inputs, positions)


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
    caches, when they fit ``cache_budget_bytes``, spare the backward its recomputes. With
    ``job.next_first`` the argmax next token after the inputs is the first row.
    ``checkpoint``, ``row_chunk``, ``recompute_executor``: as in
    ``engine.backward.relevance_from_layer_inputs``."""
    started = time.perf_counter()
    total = len(job.token_ids)
    device = weights.device
    recomputed = 0
    if layer_inputs is None:
        if forward is None:
            forward = run_forward(weights, torch.tensor(job.token_ids, device=device),
                                  torch.arange(total, device=device), cache_budget_bytes,
                                  checkpoint)
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
        next_token_id = next_token(weights, layer_inputs, positions, forward)
        rows = [[(length - 1, next_token_id)]] + rows
    if not rows:
        raise ValueError("the job has no targets")
    result = relevance_from_layer_inputs(weights, layer_inputs, positions,
                                         LogitSeeds.from_rows(rows), job.mode, checkpoint,
                                         forward=forward, row_chunk=row_chunk,
                                         recompute_executor=recompute_executor)
    return BackwardResult.from_relevance(result, total, next_token_id=next_token_id,
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
    if len(result.target_logit) != len(plan.rows):
        raise ValueError(f"the result has {len(result.target_logit)} rows, the plan "
                         f"{len(plan.rows)}")
    relevance = result.relevance()
    explanation = build_explanation(relevance, plan.targets, plan.ids, plan.prompt_length, None,
                                    model=model, mode=plan.mode, per_layer=per_layer,
                                    per_token=plan.per_token, combination=combination,
                                    spans=plan.spans)
    if plan.grounding is not None:
        explanation.grounding = ground(explanation, relevance, plan.grounding, plan.sentence_row)
    return explanation
