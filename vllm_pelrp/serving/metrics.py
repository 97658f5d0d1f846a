"""Prometheus metrics of the explanations, served on vLLM's own ``/metrics``.

vLLM 0.32 mounts ``prometheus_client.make_asgi_app(registry=get_prometheus_registry())`` at
``/metrics`` of the API server: the default ``REGISTRY`` with one API server, a
``MultiProcessCollector`` over ``PROMETHEUS_MULTIPROC_DIR`` when ``--api-server-count > 1``.
Metrics created here register in the default registry and, in multiprocess mode, write the
shared files like vLLM's own, so they appear on that same endpoint in both cases.

| metric | type | labels | what |
|---|---|---|---|
| ``pelrp_explanations_total`` | counter | mode, outcome | explained choices: ``ok`` or ``error`` |
| ``pelrp_explanation_seconds`` | histogram | mode | latency of one explain call (all choices of a request, backward and assembly) |
| ``pelrp_grounding_score`` | histogram | | grounding score of each explanation with sources |
| ``pelrp_low_grounding_total`` | counter | | explanations whose grounding score is below their threshold |
| ``pelrp_recorded_activation_bytes`` | gauge | | activations recorded on the workers now (all ranks) |
| ``pelrp_reserved_activation_bytes`` | gauge | | recording memory reserved by the API process now |
| ``pelrp_backward_queue_seconds`` | histogram | | time a backward pass waited for the worker (before and between its slices) |
| ``pelrp_recording_cap_bytes`` | gauge | | the recording memory cap (``VLLM_PELRP_MAX_RECORD_MB``; 0: nothing is recorded) |
| ``pelrp_refused_recording_keys`` | gauge | | requests the workers refused to record since they started: key forged, reused or over its choices (a count read from the workers, hence a gauge; use ``increase()``) |

The worker-side gauges are refreshed by ``refresh_activation_gauges`` (a task of the API
process): every ``interval`` seconds while explained requests are in flight, once more after
the last one, and every ``idle_interval`` seconds otherwise (refused keys come with requests
that reserved nothing); a scrape never waits for a worker.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from typing import Any, Awaitable, Callable, Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from ..explanation import MODES

logger = logging.getLogger("vllm_pelrp.serving")

GROUNDING_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class PelrpMetrics:
    """The plugin's metrics in one registry (the default one in the server; a fresh one in unit
    tests)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.explanations = Counter(
            "pelrp_explanations", "Explained choices, by attribution mode and outcome (ok, error).",
            ["mode", "outcome"], registry=registry)
        self.latency = Histogram(
            "pelrp_explanation_seconds",
            "Latency of one explain call (every choice of a request: worker backward and "
            "assembly), by attribution mode.", ["mode"], buckets=LATENCY_BUCKETS,
            registry=registry)
        self.grounding = Histogram(
            "pelrp_grounding_score",
            "Grounding score (share of the prompt's relevance on the declared sources) of each "
            "explanation with sources.", buckets=GROUNDING_BUCKETS, registry=registry)
        self.low_grounding = Counter(
            "pelrp_low_grounding",
            "Explanations whose grounding score is below their threshold "
            "(explain.grounding_threshold, or the server's --grounding-threshold).",
            registry=registry)
        self.recorded_bytes = Gauge(
            "pelrp_recorded_activation_bytes",
            "Bytes of activations recorded on the workers now (all ranks).",
            multiprocess_mode="livemostrecent", registry=registry)
        self.reserved_bytes = Gauge(
            "pelrp_reserved_activation_bytes",
            "Recording memory reserved now by the API process for explained requests in flight.",
            multiprocess_mode="livesum", registry=registry)
        self.queue_wait = Histogram(
            "pelrp_backward_queue_seconds",
            "Seconds a backward pass waited for the worker while others ran (before its first "
            "slice and between slices; serving/scheduler.py).", buckets=QUEUE_BUCKETS,
            registry=registry)
        self.cap_bytes = Gauge(
            "pelrp_recording_cap_bytes",
            "Recording memory cap of the explanations, in bytes (VLLM_PELRP_MAX_RECORD_MB); "
            "0 where nothing is recorded.", multiprocess_mode="livemostrecent", registry=registry)
        self.refused_keys = Gauge(
            "pelrp_refused_recording_keys",
            "Requests the workers refused to record since they started because their recording "
            "key was forged, reused or over its choices (read from the workers: use increase()).",
            multiprocess_mode="livemostrecent", registry=registry)
        for mode in MODES:  # every series exists (at 0) before the first explanation
            self.latency.labels(mode=mode)
            for outcome in ("ok", "error"):
                self.explanations.labels(mode=mode, outcome=outcome)

    def observe(self, mode: str, seconds: float, explanations: Iterable[dict[str, Any]]) -> None:
        """Record one explain call: its latency and each explanation (wire dict) it returned."""
        self.latency.labels(mode=mode).observe(seconds)
        for explanation in explanations:
            if not isinstance(explanation, dict) or "error" in explanation:
                self.explanations.labels(mode=mode, outcome="error").inc()
                continue
            self.explanations.labels(mode=mode, outcome="ok").inc()
            grounding = explanation.get("grounding")
            if grounding:
                self.grounding.observe(grounding["grounding_score"])
                if grounding.get("low_grounding"):
                    self.low_grounding.inc()


_metrics: PelrpMetrics | None = None


def get_metrics() -> PelrpMetrics:
    """The process's metrics (created in the default registry on first use)."""
    global _metrics
    if _metrics is None:
        _metrics = PelrpMetrics()
    return _metrics


# Called with every explanation (wire dict) an explain call returned, its owner (who may read it
# again: serving/webview.py) and the end user the request named (OpenAI's ``user`` field); the web
# view's store of recent explanations registers here (it gives each explanation its id). Sinks
# run off the event loop.
ExplanationSink = Callable[[dict[str, Any], "str | None", "str | None"], None]
_sinks: list[ExplanationSink] = []


def add_explanation_sink(sink: ExplanationSink) -> None:
    if sink not in _sinks:
        _sinks.append(sink)


def _returned_explanations(result: Any) -> list[dict[str, Any]]:
    """The explanations in what ``explain_choices`` (dict by choice index) or
    ``explain_tokens`` (one explanation) returned."""
    if isinstance(result, dict) and all(isinstance(k, int) for k in result):
        return list(result.values())
    return [result] if isinstance(result, dict) else []


def observed(explain: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Decorates ``ExplainService.explain_choices`` / ``explain_tokens``: times the call, records
    its latency and its explanations in the metrics, and hands each explanation, with the call's
    ``owner`` and ``user``, to the sinks (the recent-explanations store), on a thread: storing
    serialises the explanation. A call that raises counts as one error, without latency."""
    signature = inspect.signature(explain)

    @functools.wraps(explain)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind(*args, **kwargs).arguments
        options = arguments.get("options")
        owner = arguments.get("owner")
        user = arguments.get("user")
        mode = getattr(options, "mode", None) or "pa-lrp"
        started = time.perf_counter()
        try:
            result = await explain(*args, **kwargs)
        except Exception:  # a refused request (ExplainError) or a failed backward: no latency
            get_metrics().explanations.labels(mode=mode, outcome="error").inc()
            raise
        explanations = _returned_explanations(result)
        get_metrics().observe(mode, time.perf_counter() - started, explanations)
        kept = [e for e in explanations if isinstance(e, dict) and "error" not in e]
        if kept and _sinks:
            await asyncio.to_thread(_hand_to_sinks, kept, owner, user)
        return result

    return wrapper


def _hand_to_sinks(explanations: list[dict[str, Any]], owner: str | None,
                   user: str | None) -> None:
    for explanation in explanations:
        for sink in _sinks:
            try:
                sink(explanation, owner, user)
            except Exception:  # noqa: BLE001 - a sink never breaks a response
                logger.exception("vllm-pelrp: explanation sink failed")


async def refresh_activation_gauges(service: Any, interval: float = 0.5,
                                    rpc_timeout: float = 10.0, idle_interval: float = 30.0) -> None:
    """Keep the activation gauges current without a worker call per scrape: the reserved bytes
    and the cap (API process) every ``interval`` s; the recorded bytes and the refused keys
    (``pelrp_stats`` on the workers) every ``interval`` s while anything is reserved or the last
    reading was not 0, else every ``idle_interval`` s (a forged key reserves nothing, so an idle
    server still reads the refused count). A worker call that fails, is cancelled from inside,
    or takes longer than ``rpc_timeout`` s is logged and retried on the next tick: nothing but
    cancelling this task stops it (a stopped task would freeze the gauges at their last values).
    """
    metrics = get_metrics()
    last: int | None = None
    read_at = -float("inf")  # loop time of the last worker reading
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    failure = ""  # the last failure logged at warning level (each new one is logged once)
    while True:
        reserved = sum(service.reserved.values())
        metrics.reserved_bytes.set(reserved)
        metrics.cap_bytes.set(getattr(service, "cap_bytes", 0))
        if reserved or last != 0 or loop.time() - read_at >= idle_interval:
            read_at = loop.time()
            try:
                stats = await asyncio.wait_for(service.engine.collective_rpc("pelrp_stats"),
                                               rpc_timeout)
                last = sum(int(worker.get("bytes", 0)) for worker in stats)
                metrics.recorded_bytes.set(last)
                # every rank sees every request: the most any rank refused, not their sum
                metrics.refused_keys.set(max((int(w.get("refused_keys", 0)) for w in stats),
                                             default=0))
                failure = ""
            except asyncio.CancelledError:
                if task is not None and task.cancelling():
                    raise  # this task is being stopped (server shutdown)
                failure = _log_once(failure, "pelrp_stats was cancelled")
            except asyncio.TimeoutError:
                failure = _log_once(failure, f"pelrp_stats took over {rpc_timeout:g} s")
            except Exception as error:  # noqa: BLE001 - e.g. the engine is shutting down
                failure = _log_once(failure, f"pelrp_stats failed: {type(error).__name__}: {error}")
        await asyncio.sleep(interval)


def _log_once(previous: str, message: str) -> str:
    """Log ``message`` at warning level unless it repeats the previous failure; returns it."""
    if message != previous:
        logger.warning("vllm-pelrp: %s; the activation gauges keep their last values until a "
                       "later refresh succeeds", message)
    return message
