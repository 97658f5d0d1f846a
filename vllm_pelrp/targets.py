"""Target resolution: which logits an explanation's rows sum, checked against the prompt and
completion (``'next'``, ``'completion'``, ``'per_token'``, ``{'span': [i, j]}``, ``{'token_id': k}``)."""

from __future__ import annotations

from typing import Any, Sequence

from .engine.backward import MODES, LogitSeeds
from .errors import CostError, ExplainInputError, TargetError
from .explanation import ResolvedTarget, SpanTarget, TokenIdTarget

# Per-token targets run as one batched backward; rows beyond this need an explicit, larger cap
# (memory grows linearly in the number of rows: rows × T × hidden fp32 per layer).
MAX_PER_TOKEN_ROWS = 64
TARGET_HELP = "'next', 'completion', 'per_token', {'span': [i, j]} or {'token_id': k}"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ExplainInputError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}", "mode")
    return mode


def parse_target(target: Any) -> str | SpanTarget | TokenIdTarget:
    """Validate a target given as a string, a dict or a target model."""
    if isinstance(target, (SpanTarget, TokenIdTarget)):
        return target
    if target in ("next", "completion", "per_token"):
        return target
    if isinstance(target, dict):
        try:
            if set(target) == {"span"}:
                return SpanTarget(span=tuple(target["span"]))
            if set(target) == {"token_id"}:
                return TokenIdTarget(token_id=int(target["token_id"]))
        except (TypeError, ValueError) as error:
            raise TargetError(f"malformed target {target!r}; allowed: {TARGET_HELP}") from error
    raise TargetError(f"unknown target {target!r}; allowed: {TARGET_HELP}")


def span_target(start: int, end: int, prompt_length: int, completion_ids: Sequence[int],
                kind: str) -> ResolvedTarget:
    """Completion tokens [start, end): token k is predicted at position prompt_length - 1 + k."""
    positions = [prompt_length - 1 + k for k in range(start, end)]
    token_ids = [int(t) for t in completion_ids[start:end]]
    description = (
        f"sum of the logits of completion tokens [{start}, {end})"
        if end - start > 1 else f"logit of completion token {start} (id {token_ids[0]})"
    )
    return ResolvedTarget(kind=kind, positions=positions, token_ids=token_ids,
                          span=(start, end), description=description)


def needs_next_token(target: Any) -> bool:
    return target == "next"


def resolve_targets(
    target: str | SpanTarget | TokenIdTarget,
    prompt_length: int,
    completion_ids: Sequence[int],
    vocab_size: int,
    next_token_id: int | None = None,
    max_per_token_rows: int = MAX_PER_TOKEN_ROWS,
) -> list[ResolvedTarget]:
    """The logits each target row sums. 'next' needs the argmax ``next_token_id``."""
    count = len(completion_ids)
    last = prompt_length + count - 1
    if target == "next":
        if next_token_id is None:
            raise ValueError("target 'next' needs the argmax next token id")  # a caller's bug
        return [ResolvedTarget(kind="next", positions=[last], token_ids=[int(next_token_id)],
                               description=f"argmax next token {next_token_id} after position {last}")]
    if isinstance(target, TokenIdTarget):
        if not 0 <= target.token_id < vocab_size:
            raise TargetError(f"token_id {target.token_id} out of range [0, {vocab_size})")
        return [ResolvedTarget(kind="token_id", positions=[last], token_ids=[target.token_id],
                               description=f"logit of token {target.token_id} at position {last}")]
    if count == 0:
        raise TargetError(f"target {target!r} needs a completion; none was given")
    if target == "per_token":
        if count > max_per_token_rows:
            raise CostError(
                f"per_token target: {count} completion tokens exceed the cap of "
                f"{max_per_token_rows} rows per explanation; use a span, or raise the cap"
            )
        return [span_target(k, k + 1, prompt_length, completion_ids, "per_token_row")
                for k in range(count)]
    if target == "completion":
        return [span_target(0, count, prompt_length, completion_ids, "completion")]
    start, end = target.span
    if not (0 <= start < end <= count):
        raise TargetError(
            f"span [{start}, {end}) is out of range: the completion has {count} tokens, "
            f"so 0 <= i < j <= {count} is allowed"
        )
    return [span_target(start, end, prompt_length, completion_ids, "span")]


def seeds_for(targets: Sequence[ResolvedTarget]) -> LogitSeeds:
    return LogitSeeds.from_rows([list(zip(t.positions, t.token_ids)) for t in targets])
