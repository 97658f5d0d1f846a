"""API-process side of an explanation, between the HTTP routes and the worker: memory-cap
bookkeeping, admission (the work cap and the memory budget: ``budget.py``), and the explanation
pipeline (``pipeline.py``: plan, job, compute on the worker through ``collective_rpc``,
assemble) with the tokenizer. No HTTP here, and no
tensors: the worker's ``BackwardResult`` becomes an ``Explanation`` in ``pipeline.assemble``.
The user's errors arrive as ``ExplainInputError`` and become 400s by their type.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from .. import pipeline
from ..errors import ExplainInputError, GroundingError
from ..targets import MAX_PER_TOKEN_ROWS
from ..explanation import Explanation, SpanTarget
from ..grounding import MAX_SENTENCES, grounding_threshold_from_env
from ..pipeline import BackwardFailure, BackwardJob, BackwardResult, Plan
from . import budget
from .failures import internal_failure
from .keys import new_secret, sign_key
from .tokenizers import ThreadTokenizers
from .metrics import get_metrics, observed
from .notify import TicketListener
from .protocol import ENCODER_KIND, CompactExplanation, ExplainOptions, TopToken

logger = logging.getLogger("vllm_pelrp.serving")
# the worker notifies each ticket when it is done (notify.py); this poll is only a safety net
# against a notification lost on the way (a dropped message, a worker restarted)
SAFETY_POLL_SECONDS = 1.0
GROUNDING_PREFIX = "sources: "  # starts the message of sources that cannot be placed
API_THREADS = 4  # tokenization, grounding plans and assembly: off the event loop
T = TypeVar("T")


class ExplainError(Exception):
    """Becomes an OpenAI-style error response with ``status``; ``param``: the request field at
    fault, as the route names it."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param

    @classmethod
    def of_input(cls, error: ExplainInputError, prefix: str = "") -> "ExplainError":
        """The 400 of the user's ``error``; ``prefix``: where the route keeps the explain
        fields ("explain." in a completions request)."""
        return cls(user_message(error), 400, prefix + error.param)


def user_message(error: ExplainInputError) -> str:
    """How the server words the user's ``error``: sources that cannot be placed say so first."""
    return GROUNDING_PREFIX + str(error) if isinstance(error, GroundingError) else str(error)


class ChoiceError(dict):
    """A choice that could not be explained, as the wire shows it: ``{"error": message}``.
    ``cause``: the ``ExplainInputError`` when the request is at fault (None when the worker
    failed); when every choice fails so, the route answers 400 (``api.py``)."""

    def __init__(self, message: str, cause: ExplainInputError | None = None) -> None:
        super().__init__(error=message)
        self.cause = cause

    @classmethod
    def of_input(cls, error: ExplainInputError) -> "ChoiceError":
        return cls(user_message(error), error)


@dataclass
class Choice:
    """One output to explain: its prompt and completion token ids."""

    index: int
    prompt_ids: list[int]
    completion_ids: list[int]


class ExplainService:
    def __init__(self, engine_client: Any, tokenizer: Any, model_name: str) -> None:
        self.engine = engine_client
        self.tokenizers = ThreadTokenizers(tokenizer)  # never vLLM's own object (tokenizers.py)
        self.model_name = model_name
        self.info: dict[str, Any] = {"error": "not initialised"}
        self.reserved: dict[str, int] = {}
        # memory budget held by the explanations in flight, by key (budget.py)
        self.working_sets: dict[str, int] = {}
        # explain.grounding_threshold's default (pelrp serve --grounding-threshold)
        self.grounding_threshold = grounding_threshold_from_env()
        self.max_gflop = budget.max_gflop_from_env()
        self._tasks: set[asyncio.Task] = set()
        self.loopwatch: Any = None  # serving/loopwatch.py's LoopWatch, set by the endpoint plugin
        self.key_secret: str | None = None  # signs the recording keys (keys.py)
        self._threads = ThreadPoolExecutor(API_THREADS, thread_name_prefix="pelrp-api")
        self._max_token_chars: int | None = None
        self._listener: TicketListener | None = None  # where the workers say "done" (notify.py)

    @property
    def tokenizer(self) -> Any:
        """The served model's tokenizer, the calling thread's own copy (``tokenizers.py``): read
        it on the thread that tokenizes, never hand it to another thread."""
        return self.tokenizers.get()

    async def offload(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the service's threads: tokenization, grounding plans and assembly
        never block the event loop that serves every client."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, functools.partial(fn, *args, **kwargs))

    async def setup(self) -> None:
        # this process's secret for the recording keys: it goes to the workers, never back
        # (vLLM's dev mode shows any client what collective_rpc returns)
        secret = new_secret()
        try:
            infos = await self.engine.collective_rpc("pelrp_setup", args=(secret,))
            self.info = dict(infos[0])
            budgets = [info["memory_budget_bytes"] for info in infos
                       if info.get("memory_budget_bytes") is not None]
            if budgets:  # each rank holds its shard's working set: the smallest budget binds
                self.info["memory_budget_bytes"] = min(budgets)
            accepted = all(info.get("key_accepted") for info in infos)
            self.info.pop("key_accepted", None)
            if accepted:
                self.key_secret = secret
            elif not self.info.get("error"):
                self.info["error"] = (
                    "the workers refused this API process's recording-key secret: they keep one "
                    "per API process that vLLM started, and as many were proposed already")
        except Exception:  # noqa: BLE001 - its text stays in the log
            self.info = {"error": "the worker extension is unavailable; is VLLM_PLUGINS=pelrp "
                                  "set for the engine? ("
                                  + internal_failure("setting up explanations") + ")"}
        await self.offload(lambda: self.max_token_chars)  # the vocabulary read off the loop
        # every service thread copies its tokenizer now (~0.7 s each on SmolLM2, one at a time),
        # not on a client's first request; each copy holds its thread until all are made, so
        # each lands on a thread of its own
        arrived = threading.Barrier(API_THREADS)

        def copy_on_this_thread() -> None:
            self.tokenizers.get()
            arrived.wait(timeout=120)

        await asyncio.gather(*(self.offload(copy_on_this_thread) for _ in range(API_THREADS)),
                             return_exceptions=True)  # a broken barrier: copies made later
        if self.info.get("error"):
            logger.warning("vllm-pelrp: explanations unavailable: %s", self.info["error"])
        elif self.info.get("kind") == ENCODER_KIND:  # nothing recorded (encoder_worker.py)
            logger.info("vllm-pelrp: encoder explanations ready (%s pooling%s)",
                        self.info.get("pooling"), ", normalised" if self.info.get("normalize")
                        else "")
        elif self.info.get("kind") == "image":  # CLIP, SigLIP (image_worker.py)
            logger.info("vllm-pelrp: image explanations ready (%s, %s×%s pixels, patch %s)",
                        self.info.get("family"), *self.info.get("image_size", (0, 0)),
                        self.info.get("patch_size"))
        else:
            logger.info("vllm-pelrp: explanations ready (%s bytes recorded per token, cap %.0f "
                        "MiB)", self.info["bytes_per_token"], self.info["cap_bytes"] / 2**20)
        if not self.info.get("error") and self.memory_budget_bytes is not None:
            logger.info("vllm-pelrp: explanation memory budget %.0f MiB (%s); work cap %s GFLOP",
                        self.memory_budget_bytes / 2**20, self.info.get("memory_budget_source"),
                        budget.shown_gflop(self.max_gflop))

    # ---- checks before generation -----------------------------------------------------------
    def check_available(self) -> None:
        if self.info.get("error"):
            raise ExplainError(f"explanations are not available for this server: "
                               f"{self.info['error']}", status=400, param="explain")

    @property
    def bytes_per_token(self) -> int:
        return int(self.info.get("bytes_per_token", 0))

    @property
    def cap_bytes(self) -> int:
        return int(self.info.get("cap_bytes", 0))

    @property
    def max_model_len(self) -> int:
        return int(self.info.get("max_model_len", 0))

    @property
    def shape(self) -> "budget.ModelShape | None":
        """The model's shape for the cost estimates (``engine/cost.py``), as the worker reported
        it; None when it reported none (then neither the work cap nor the memory budget apply)."""
        return budget.model_shape(self.info)

    @property
    def memory_budget_bytes(self) -> int | None:
        value = self.info.get("memory_budget_bytes")
        return None if value is None else int(value)

    def reserve(self, key: str, tokens: int, jobs: Sequence[tuple[int, int]] = (),
                from_ids: bool = False) -> None:
        """Reserve recording memory for ``tokens`` positions (all choices) before generation,
        and the memory budget for ``jobs`` ((target rows, tokens) of each backward pass;
        ``from_ids``: no recording, each pass runs its own forward): ``admit_memory``."""
        self._reserve_recording(key, tokens)
        try:
            self.admit_memory(key, jobs, from_ids=from_ids)
        except ExplainError:
            self.reserved.pop(key, None)
            raise

    def admit_memory(self, key: str, jobs: Sequence[tuple[int, int]], *, from_ids: bool = False,
                     need: int | None = None) -> None:
        """Hold the memory budget for ``key``'s explanation (its estimated working set, or
        ``need`` bytes) until ``unreserve(key)``; a 400 when it could never fit the budget, a
        429 when the explanations in flight hold too much of it now."""
        shape, total = self.shape, self.memory_budget_bytes
        if shape is None or total is None or (not jobs and need is None):
            return
        if need is None:
            need = budget.decoder_need(shape, jobs, from_ids=from_ids)
        refusal = budget.memory_refusal(need, total, sum(self.working_sets.values()),
                                        self.info.get("memory_budget_source") or
                                        budget.MEMORY_ENV)
        if refusal is not None:
            raise ExplainError(refusal.message, status=refusal.status, param="explain")
        self.working_sets[key] = need

    def _reserve_recording(self, key: str, tokens: int) -> None:
        need = tokens * self.bytes_per_token
        if need > self.cap_bytes:
            raise ExplainError(
                f"explaining this request needs {need / 2**20:.1f} MiB of recorded activations "
                f"({tokens} tokens x {self.bytes_per_token} bytes per token), over the server's "
                f"cap of {self.cap_bytes / 2**20:.1f} MiB (VLLM_PELRP_MAX_RECORD_MB); lower "
                "max_tokens, n or the prompt length", status=400, param="explain")
        used = sum(self.reserved.values())
        if used + need > self.cap_bytes:
            raise ExplainError(
                f"explaining this request needs {need / 2**20:.1f} MiB of recorded activations, "
                f"but only {(self.cap_bytes - used) / 2**20:.1f} MiB of the "
                f"{self.cap_bytes / 2**20:.1f} MiB cap are free now; retry later",
                status=429, param="explain")
        self.reserved[key] = need

    def unreserve(self, key: str) -> None:
        self.reserved.pop(key, None)
        self.working_sets.pop(key, None)

    # ---- cheap bounds before any tokenization and before generation ---------------------------
    @property
    def max_token_chars(self) -> int:
        """The longest token of the vocabulary, in characters: no text of more than
        ``max_model_len * max_token_chars`` characters fits the model."""
        if self._max_token_chars is None:
            vocab = self.tokenizer.get_vocab()
            self._max_token_chars = max(1, max((len(t) for t in vocab), default=1))
        return self._max_token_chars

    def check_chars(self, chars: int, what: str = "the prompt") -> None:
        """Refuse text that cannot fit ``max_model_len`` tokens, before tokenizing it."""
        limit = (self.max_model_len or 0) * self.max_token_chars
        if limit and chars > limit:
            raise ExplainError(
                f"{what}: {chars:,} characters, more than the {self.max_model_len:,} tokens "
                f"of max_model_len can hold (a token is at most {self.max_token_chars} "
                f"characters here), so it cannot be explained; shorten it", param="messages"
                if what.startswith("the messages") else "prompt")

    def check_cost(self, rows: Sequence[int], tokens: Sequence[int], planned: bool = False,
                   from_ids: bool = False) -> float:
        """Refuse explanations whose work is over the cap (``VLLM_PELRP_MAX_EXPLAIN_GFLOP``):
        Σ over choices of the forward and backward GFLOP of its target rows over its tokens
        (``engine/cost.py``). Returns the GFLOP (0 when the worker reported no shape)."""
        shape = self.shape
        if shape is None:
            return 0.0
        gflop, refusal = budget.work_refusal(shape, list(zip(rows, tokens)), self.max_gflop,
                                             from_ids=from_ids, planned=planned)
        if refusal is not None:
            raise ExplainError(refusal.message, status=refusal.status, param="explain")
        return gflop

    @staticmethod
    def planned_rows(options: ExplainOptions, max_tokens: int | None) -> int:
        """The most target rows one choice's backward can have, known before generation."""
        bound = MAX_PER_TOKEN_ROWS if max_tokens is None else max_tokens
        rows = min(bound, MAX_PER_TOKEN_ROWS) if options.target == "per_token" else 1
        if (options.documents or options.sources) and options.sentences:
            rows += min(bound, MAX_SENTENCES)
        return rows

    def recording_tokens(self, prompt_lengths: Sequence[int], max_tokens: int | None, n: int) -> int:
        limit = self.max_model_len or 10**9
        total = 0
        for length in prompt_lengths:
            budget = limit - length if max_tokens is None else max_tokens
            total += min(length + max(budget, 0), limit)
        return total * max(n, 1)

    @staticmethod
    def check_span(options: ExplainOptions, max_tokens: int | None) -> None:
        target = options.target
        if isinstance(target, SpanTarget):
            start, end = target.span
            if not 0 <= start < end:
                raise ExplainError(f"span [{start}, {end}) is invalid: need 0 <= i < j",
                                   param="explain.target")
            if max_tokens is not None and end > max_tokens:
                raise ExplainError(
                    f"span [{start}, {end}) is out of range: max_tokens={max_tokens}, so the "
                    f"completion has at most {max_tokens} tokens", param="explain.target")
        if target == "per_token" and max_tokens is not None and max_tokens > MAX_PER_TOKEN_ROWS:
            raise ExplainError(
                f"target 'per_token' explains at most {MAX_PER_TOKEN_ROWS} completion tokens, "
                f"one row each, but max_tokens={max_tokens}; lower max_tokens to "
                f"{MAX_PER_TOKEN_ROWS} or less, or use target 'completion' or a span",
                param="explain.target")

    # ---- after generation -------------------------------------------------------------------
    def new_key(self, recordings: int = 0) -> str:
        """A signed recording key for a request that makes ``recordings`` recordings (prompts x
        choices); 0 for ``/v1/explain``, which records nothing."""
        return sign_key(self.key_secret or "", recordings)

    def release_soon(self, key: str) -> None:
        """Free ``key``'s recordings from a context that cannot await (a cancelled request)."""
        self.unreserve(key)
        try:
            task = asyncio.get_running_loop().create_task(self.release(key))
        except RuntimeError:
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def release(self, key: str) -> None:
        self.unreserve(key)
        try:
            await self.engine.collective_rpc("pelrp_release", args=(key,))
        except Exception:  # noqa: BLE001
            logger.exception("vllm-pelrp: releasing %s failed", key)

    async def stats(self) -> dict[str, Any]:
        stats = await self.engine.collective_rpc("pelrp_stats")
        return {"workers": stats, "reserved_bytes": sum(self.reserved.values()),
                "reserved_requests": len(self.reserved),
                "working_set_bytes": sum(self.working_sets.values()), "info": self.info,
                "api_loop": self.loopwatch.stats() if self.loopwatch is not None else None}

    @property
    def listener(self) -> TicketListener:
        """This process's notification socket, opened at its first explanation."""
        if self._listener is None:
            self._listener = TicketListener()
        return self._listener

    async def on_worker(self, submit: str, jobs: Sequence[Any]) -> dict[str, Any]:
        """Submit ``jobs`` (pydantic messages) with the worker method ``submit``
        (``pelrp_submit``, ``pelrp_encoder_submit``), wait for the worker's "done" (``notify.py``;
        a poll every ``SAFETY_POLL_SECONDS`` in case it is lost), fetch the reply once
        (``{"results": [...]}``); a client that leaves cancels the jobs not yet done."""
        ticket = uuid.uuid4().hex  # the same on every rank (tensor parallelism)
        listener = self.listener
        done = listener.expect(ticket)  # before submitting: a quick job may be done at once
        try:
            await self.engine.collective_rpc(
                submit, args=(ticket, [job.model_dump() for job in jobs], listener.address))
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(done), SAFETY_POLL_SECONDS)
                except asyncio.TimeoutError:
                    pass
                reply = (await self.engine.collective_rpc("pelrp_poll", args=(ticket,)))[0]
                if reply is not None:
                    break
                if done.done():  # told "done" while it was not (not the worker's message)
                    done = listener.expect(ticket)
        except asyncio.CancelledError:  # the client left: stop the backward between slices
            task = asyncio.get_running_loop().create_task(
                self.engine.collective_rpc("pelrp_cancel", args=(ticket,)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            raise
        finally:
            listener.forget(ticket)
        if "error" in reply:  # the worker logged the text; this is its message with the id
            raise ExplainError(reply["error"], status=500)
        return reply

    async def run_jobs(self, jobs: list[BackwardJob]) -> list[BackwardResult | BackwardFailure]:
        reply = await self.on_worker("pelrp_submit", jobs)
        # validating a large result takes a while: off the event loop
        results = await self.offload(lambda: [pipeline.backward_reply(r)
                                              for r in reply["results"]])
        for result in results:
            if result.queue_seconds is not None:
                get_metrics().queue_wait.observe(result.queue_seconds)
        return results

    @property
    def vocab_size(self) -> int:
        return int(self.info.get("vocab_size", 0))

    def plan(self, prompt_ids: list[int], completion_ids: list[int], options: ExplainOptions,
             target: Any, message_contents: Sequence[str | None] | None = None) -> Plan:
        """``pipeline.plan`` with the request's options and the server's defaults; raises
        ``ExplainInputError``."""
        threshold = (options.grounding_threshold if options.grounding_threshold is not None
                     else self.grounding_threshold)
        return pipeline.plan(prompt_ids, completion_ids, target, tokenizer=self.tokenizer,
                             vocab_size=self.vocab_size, mode=options.mode,
                             max_per_token_rows=MAX_PER_TOKEN_ROWS, documents=options.documents,
                             sources=options.sources, grounding_threshold=threshold,
                             sentences=options.sentences, message_contents=message_contents)

    @observed  # metrics, ids and the web view's store (serving/metrics.py)
    async def explain_choices(self, key: str | None, choices: list[Choice],
                              options: ExplainOptions,
                              message_contents: Sequence[str | None] | None = None,
                              owner: str | None = None, user: str | None = None,
                              ) -> dict[int, dict[str, Any]]:
        """Explanations (wire dicts) by choice index; a choice that cannot be explained gets a
        ``ChoiceError`` (``{"error": ...}``, with the ``ExplainInputError`` when the request is
        at fault). ``message_contents``: the chat messages' contents as rendered (for
        ``message`` sources). ``owner``: who may read the stored explanations (``webview.py``);
        ``user``: the end user the request named (OpenAI's ``user`` field), recorded with them.
        Always frees ``key``'s recordings."""
        out: dict[int, dict[str, Any]] = {}
        submitted = False
        try:
            planned = await self.offload(self._plan_choices, choices, options, message_contents)
            pending = [(c, p) for c, p in planned if isinstance(p, Plan)]
            out.update({c.index: p for c, p in planned if isinstance(p, ChoiceError)})
            if pending:
                # the actual cost, now that the completions are known (at most the planned one)
                self.check_cost([p.num_rows for _, p in pending], [len(p.ids) for _, p in pending])
                submitted = True  # from here on the worker frees what the jobs claimed
                results = await self.run_jobs([pipeline.job(p, key, per_layer=options.per_layer)
                                               for _, p in pending])
                out.update(await self.offload(self._wire_all, pending, results, options))
        finally:
            if key is not None:
                self.unreserve(key)
                if not submitted:
                    await self.release(key)
        return out

    def _plan_choices(self, choices: list[Choice], options: ExplainOptions,
                      message_contents: Sequence[str | None] | None,
                      ) -> list[tuple[Choice, Plan | ChoiceError]]:
        """Each choice's plan, or the user's error that stops it."""
        planned: list[tuple[Choice, Plan | ChoiceError]] = []
        for choice in choices:
            try:
                planned.append((choice, self.plan(choice.prompt_ids, choice.completion_ids,
                                                  options, options.target, message_contents)))
            except ExplainInputError as error:
                planned.append((choice, ChoiceError.of_input(error)))
        return planned

    def _wire_all(self, pending: list[tuple[Choice, Plan]],
                  results: list[BackwardResult | BackwardFailure],
                  options: ExplainOptions) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for (choice, plan), result in zip(pending, results):
            out[choice.index] = ChoiceError(result.error) if isinstance(
                result, BackwardFailure) else self.to_wire(result, plan, options)
        return out

    @observed  # metrics, ids and the web view's store (serving/metrics.py)
    async def explain_tokens(self, prompt_ids: list[int], completion_ids: list[int],
                             options: ExplainOptions, target: Any,
                             message_contents: Sequence[str | None] | None = None,
                             owner: str | None = None, user: str | None = None,
                             ) -> dict[str, Any]:
        """``/v1/explain``: no recording; the worker runs a plain forward for the layer inputs
        (and, for target 'next', decides the next token)."""
        ids = prompt_ids + completion_ids
        try:
            pipeline.check_token_ids(prompt_ids, completion_ids, self.vocab_size)  # cheap first
            if self.max_model_len and len(ids) > self.max_model_len:
                raise ExplainError(f"{len(ids)} tokens (prompt and completion) exceed "
                                   f"max_model_len={self.max_model_len}", param="prompt")
            plan = await self.offload(self.plan, prompt_ids, completion_ids, options, target,
                                      message_contents)
        except ExplainInputError as error:
            raise ExplainError.of_input(error) from None
        self.check_cost([plan.num_rows], [len(ids)], from_ids=True)
        key = uuid.uuid4().hex  # reserves memory for the forward; records nothing
        self.reserve(key, len(ids), [(plan.num_rows, len(ids))], from_ids=True)
        try:
            (result,) = await self.run_jobs([pipeline.job(plan, per_layer=options.per_layer)])
            if isinstance(result, BackwardFailure):
                raise ExplainError(result.error, status=500)
            return await self.offload(self.to_wire, result, plan, options)
        finally:
            self.unreserve(key)

    def to_wire(self, result: BackwardResult, plan: Plan,
                options: ExplainOptions) -> dict[str, Any]:
        explanation = pipeline.assemble(plan, result, model=self.model_name,
                                        per_layer=options.per_layer)
        if options.top_k:
            return compact(explanation, options.top_k).model_dump(mode="json")
        return explanation.model_dump(mode="json")


def compact(explanation: Explanation, k: int) -> CompactExplanation:
    top = []
    for token, value in explanation.top_tokens(k):
        top.append(TopToken(
            index=token.index, id=token.id, text=token.text, role=token.role,
            combined_relevance=value,
            token_relevance=explanation.token_relevance[token.index],
            positional_relevance=explanation.positional_relevance[token.index],
        ))
    return CompactExplanation(
        model=explanation.model, mode=explanation.mode,
        target=explanation.target.model_dump(mode="json"),
        target_logit=explanation.target_logit, prompt_length=explanation.prompt_length,
        num_tokens=len(explanation.tokens), positional_share=explanation.positional_share,
        conservation=explanation.conservation, top_tokens=top, grounding=explanation.grounding,
    )
