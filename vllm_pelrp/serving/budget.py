"""Admission of explanations in the API process: the work cap (GFLOP) and the memory budget,
both from the model's shape the worker reports at setup (``memory_budget.py``) and
``engine/cost.py``'s estimates. No tensors, no HTTP: ``service.py`` turns a ``Refusal`` into
its OpenAI-shaped error.

- work: a request whose explanation would cost more than ``VLLM_PELRP_MAX_EXPLAIN_GFLOP`` is
  refused (400), the same cap meaning the same work on any model;
- memory: the explanations in flight together hold at most the worker's
  ``memory_budget_bytes``; one that could never fit is refused (400), one that does not fit
  now because others hold the budget gets a 429 (retry later). Held from admission (before
  generation: its recording grows during it) until its explanation ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .. import settings
from ..engine.cost import ModelShape, explanation_gflop, request_working_set, working_set
from .memory_budget import MEMORY_ENV

GFLOP_ENV = "VLLM_PELRP_MAX_EXPLAIN_GFLOP"
MIB = 2**20


@dataclass(frozen=True)
class Refusal:
    """Why an explanation is not admitted: ``status`` 400 (never fits) or 429 (not now)."""

    status: int
    message: str


def shown_gflop(value: float) -> str:
    """GFLOP as a message says them: 30,000; 12.5; 0.25."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def max_gflop_from_env() -> float:
    """The most work a request's explanation may cost, GFLOP (every choice)."""
    return float(settings.get(GFLOP_ENV))


def model_shape(info: Mapping[str, Any]) -> ModelShape | None:
    """The shape the worker reported at setup; None when it reported none."""
    shape = info.get("explain_shape")
    return ModelShape.from_info(shape) if shape else None


def work_refusal(shape: ModelShape, jobs: Sequence[tuple[int, int]], cap_gflop: float, *,
                 from_ids: bool, planned: bool = False) -> tuple[float, Refusal | None]:
    """The work of ``jobs`` ((target rows, tokens) each), GFLOP, and the refusal when it is over
    ``cap_gflop``."""
    gflop = sum(explanation_gflop(shape, r, t, from_ids=from_ids) for r, t in jobs)
    if gflop <= cap_gflop:
        return gflop, None
    parts = ", ".join(f"{r} x {t}" for r, t in list(jobs)[:4])
    more = "" if len(jobs) <= 4 else f" and {len(jobs) - 4} more"
    return gflop, Refusal(400, (
        f"explaining this request costs {'up to ' if planned else ''}{shown_gflop(gflop)} GFLOP "
        f"(target rows x tokens: {parts}{more}, on this model's {shape.num_layers} layers of "
        f"width {shape.hidden_size}), over the server's cap of {shown_gflop(cap_gflop)} GFLOP "
        f"({GFLOP_ENV}); lower max_tokens, n or the prompt length, or explain fewer rows "
        "(target 'completion' instead of 'per_token', sentences=false)"))


def memory_refusal(need: int, budget: int, in_flight: int, source: str = MEMORY_ENV
                   ) -> Refusal | None:
    """Admit an explanation whose working set is ``need`` bytes into a ``budget`` of which
    ``in_flight`` bytes are held by the explanations running: None (admitted), a 400 when it
    exceeds the whole budget, a 429 when it exceeds what is free now."""
    if need > budget:
        where = f"{MEMORY_ENV}, pelrp serve --explain-memory-mb"
        return Refusal(400, (
            f"explaining this request needs about {need / MIB:,.1f} MiB of memory for the "
            f"backward's working set and the recorded activations, over the server's "
            f"explanation memory budget of {budget / MIB:,.1f} MiB "
            f"({where if source == MEMORY_ENV else source + '; ' + where}); lower max_tokens, "
            "n or the prompt length, or explain fewer rows"))
    if in_flight + need > budget:
        return Refusal(429, (
            f"explaining this request needs about {need / MIB:,.1f} MiB of memory, but only "
            f"{max(budget - in_flight, 0) / MIB:,.1f} MiB of the server's explanation memory "
            f"budget of {budget / MIB:,.1f} MiB are free now (other explanations hold the "
            "rest); retry later"))
    return None


def decoder_need(shape: ModelShape, jobs: Sequence[tuple[int, int]], *, from_ids: bool) -> int:
    """Bytes a decoder request holds: ``cost.request_working_set``."""
    return request_working_set(shape, list(jobs), from_ids=from_ids)


def encoder_need(shape: ModelShape, groups: Sequence[Sequence[tuple[int, int]]]) -> int:
    """Bytes of encoder jobs run group after group, each group as ``pipeline.encoder_passes``
    gives it ((target rows, tokens) of each text's forward and backward): its first text's
    forward is alive throughout, each other text's forward and backward come one at a time
    (``pipeline.compute_similarities``), then the first text's backward."""
    need = 0
    for passes in groups:
        first, *others = [working_set(shape, r, t, from_ids=True) for r, t in passes]
        need = max(need, first.resident + max([first.transient] + [w.total for w in others]))
    return need
