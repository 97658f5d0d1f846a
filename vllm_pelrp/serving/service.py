"""API-process side of an explanation, between the HTTP routes and the worker: memory-cap
bookkeeping, target resolution, jobs sent through ``collective_rpc`` and assembly of the
wire-format ``Explanation`` with the tokenizer. No HTTP here; the worker's numbers arrive as
lists and become tensors only to reuse ``assemble.build_explanation``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from ..assemble import MAX_PER_TOKEN_ROWS, build_explanation, ground, resolve_targets, token_spans
from ..explanation import Explanation, SpanTarget
from ..grounding import (
    MAX_SENTENCES,
    GroundingPlan,
    grounding_threshold_from_env,
    plan_grounding,
    sentence_rows,
)
from .env import env_number
from .keys import new_secret, sign_key
from .metrics import get_metrics, observed
from .protocol import CompactExplanation, ExplainOptions, TopToken

logger = logging.getLogger("vllm_pelrp.serving")
POLL_SECONDS = 0.02
GROUNDING_ERROR = "sources: "  # starts the error of a choice whose sources cannot be placed
COST_ENV = "VLLM_PELRP_MAX_EXPLAIN_COST"
DEFAULT_MAX_COST = 65536  # target rows x tokens of one request's backward passes
API_THREADS = 4  # tokenization, grounding plans and assembly: off the event loop
T = TypeVar("T")


def explain_cost_cap_from_env() -> int:
    """The most a request's explanation may cost, in target rows x tokens (every choice)."""
    return env_number(COST_ENV, DEFAULT_MAX_COST, integer=True)


class ExplainError(Exception):
    """Becomes an OpenAI-style error response with ``status``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


@dataclass
class Choice:
    """One output to explain: its prompt and completion token ids."""

    index: int
    prompt_ids: list[int]
    completion_ids: list[int]


class ExplainService:
    def __init__(self, engine_client: Any, tokenizer: Any, model_name: str) -> None:
        self.engine = engine_client
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.info: dict[str, Any] = {"error": "not initialised"}
        self.reserved: dict[str, int] = {}
        # explain.grounding_threshold's default (pelrp serve --grounding-threshold)
        self.grounding_threshold = grounding_threshold_from_env()
        self.max_cost = explain_cost_cap_from_env()
        self._tasks: set[asyncio.Task] = set()
        self.loopwatch: Any = None  # serving/loopwatch.py's LoopWatch, set by the endpoint plugin
        self.key_secret: str | None = None  # signs the recording keys (keys.py)
        self._threads = ThreadPoolExecutor(API_THREADS, thread_name_prefix="pelrp-api")
        self._max_token_chars: int | None = None

    async def offload(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the service's threads: tokenization, grounding plans and assembly
        never block the event loop that serves every client."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, functools.partial(fn, *args, **kwargs))

    async def setup(self) -> None:
        try:
            # the workers keep the first secret an API process proposes and return it to all
            infos = await self.engine.collective_rpc("pelrp_setup", args=(None, new_secret()))
            self.info = dict(infos[0])
            self.key_secret = self.info.pop("key_secret", None)
            if not self.key_secret and not self.info.get("error"):
                self.info["error"] = "the workers returned no recording-key secret"
        except Exception as error:  # noqa: BLE001
            self.info = {"error": f"worker extension unavailable ({type(error).__name__}: "
                                  f"{error}); is VLLM_PLUGINS=pelrp set for the engine?"}
        if self.info.get("error"):
            logger.warning("vllm-pelrp: explanations unavailable: %s", self.info["error"])
        else:
            logger.info("vllm-pelrp: explanations ready (%s bytes recorded per token, cap %.0f "
                        "MiB)", self.info["bytes_per_token"], self.info["cap_bytes"] / 2**20)

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

    def reserve(self, key: str, tokens: int) -> None:
        """Reserve recording memory for ``tokens`` positions (all choices) before generation."""
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

    def check_cost(self, rows: Sequence[int], tokens: Sequence[int], planned: bool = False) -> int:
        """Refuse explanations that cost more than the cap: Σ over choices of target rows x
        tokens (the backward's work grows with both). Returns the cost."""
        cost = sum(r * t for r, t in zip(rows, tokens))
        if cost > self.max_cost:
            parts = ", ".join(f"{r} x {t}" for r, t in list(zip(rows, tokens))[:4])
            more = "" if len(rows) <= 4 else f" and {len(rows) - 4} more"
            raise ExplainError(
                f"explaining this request costs {'up to ' if planned else ''}{cost:,} target "
                f"rows x tokens ({parts}"
                f"{more}), over the server's cap of {self.max_cost:,} ({COST_ENV}); lower "
                "max_tokens, n or the prompt length, or explain fewer rows (target "
                "'completion' instead of 'per_token', sentences=false)", param="explain")
        return cost

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
                "reserved_requests": len(self.reserved), "info": self.info,
                "api_loop": self.loopwatch.stats() if self.loopwatch is not None else None}

    async def run_jobs(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ticket = uuid.uuid4().hex  # the same on every rank (tensor parallelism)
        await self.engine.collective_rpc("pelrp_submit", args=(ticket, jobs))
        try:
            while True:
                reply = (await self.engine.collective_rpc("pelrp_poll", args=(ticket,)))[0]
                if reply is not None:
                    break
                await asyncio.sleep(POLL_SECONDS)
        except asyncio.CancelledError:  # the client left: stop the backward between layers
            task = asyncio.get_running_loop().create_task(
                self.engine.collective_rpc("pelrp_cancel", args=(ticket,)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            raise
        if "error" in reply:
            raise ExplainError(f"explanation failed on the worker: {reply['error']}", status=500)
        for result in reply["results"]:
            if "queue_seconds" in result:
                get_metrics().queue_wait.observe(result["queue_seconds"])
        return reply["results"]

    @observed  # metrics, ids and the web view's store (serving/metrics.py)
    async def explain_choices(self, key: str | None, choices: list[Choice],
                              options: ExplainOptions,
                              message_contents: Sequence[str | None] | None = None,
                              owner: str | None = None,
                              ) -> dict[int, dict[str, Any]]:
        """Explanations (wire dicts) by choice index; a choice that cannot be explained gets
        ``{"error": ...}`` (sources that cannot be placed: starting with ``GROUNDING_ERROR``).
        ``message_contents``: the chat messages' contents as rendered (for ``message`` sources).
        ``owner``: who may read the stored explanations (``webview.py``). Always frees
        ``key``'s recordings."""
        out: dict[int, dict[str, Any]] = {}
        submitted = False
        try:
            planned = await self.offload(self._plan_choices, choices, options, message_contents)
            pending = [(c, p) for c, p in planned if not isinstance(p, str)]
            out.update({c.index: {"error": p} for c, p in planned if isinstance(p, str)})
            if pending:
                # the actual cost, now that the completions are known (at most the planned one)
                self.check_cost([len(p.rows) for _, p in pending],
                                [len(c.prompt_ids) + len(c.completion_ids) for c, _ in pending])
                submitted = True  # from here on the worker frees what the jobs claimed
                results = await self.run_jobs([self._job(c, p, options, key) for c, p in pending])
                out.update(await self.offload(self._wire_all, pending, results, options))
        finally:
            if key is not None:
                self.unreserve(key)
                if not submitted:
                    await self.release(key)
        return out

    def _plan_choices(self, choices: list[Choice], options: ExplainOptions,
                      message_contents: Sequence[str | None] | None,
                      ) -> list[tuple[Choice, "Prepared | str"]]:
        """Targets, decoded tokens and grounding plan of each choice, or its error message."""
        vocab = int(self.info.get("vocab_size", 0))
        planned: list[tuple[Choice, Prepared | str]] = []
        for choice in choices:
            try:
                targets = resolve_targets(options.target, len(choice.prompt_ids),
                                          choice.completion_ids, vocab, None, MAX_PER_TOKEN_ROWS)
            except ValueError as error:
                planned.append((choice, str(error)))
                continue
            try:
                planned.append((choice, self.prepare(choice, targets, options, message_contents)))
            except ValueError as error:
                planned.append((choice, GROUNDING_ERROR + str(error)))
        return planned

    def _wire_all(self, pending: list[tuple[Choice, "Prepared"]], results: list[dict[str, Any]],
                  options: ExplainOptions) -> dict[int, dict[str, Any]]:
        out = {}
        for (choice, prepared), result in zip(pending, results):
            out[choice.index] = {"error": result["error"]} if "error" in result else \
                self.to_wire(result, prepared, choice, options)
        return out

    @staticmethod
    def _job(choice: Choice, prepared: "Prepared", options: ExplainOptions, key: str | None,
             **extra: Any) -> dict[str, Any]:
        job = {"token_ids": choice.prompt_ids + choice.completion_ids,
               "prompt_length": len(choice.prompt_ids), "seeds": _seeds(prepared.rows),
               "mode": options.mode, **extra}
        if key is not None:
            job["key"] = key
        return job

    @observed  # metrics, ids and the web view's store (serving/metrics.py)
    async def explain_tokens(self, prompt_ids: list[int], completion_ids: list[int],
                             options: ExplainOptions, target: Any,
                             message_contents: Sequence[str | None] | None = None,
                             owner: str | None = None,
                             ) -> dict[str, Any]:
        """``/v1/explain``: no recording; the worker runs a plain forward for the layer inputs."""
        vocab = int(self.info.get("vocab_size", 0))
        ids = prompt_ids + completion_ids
        if not prompt_ids:
            raise ExplainError("the prompt is empty", param="prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise ExplainError(f"token ids must lie in [0, {vocab}): the model's vocabulary",
                               param="prompt")
        if self.max_model_len and len(ids) > self.max_model_len:
            raise ExplainError(f"{len(ids)} tokens (prompt and completion) exceed "
                               f"max_model_len={self.max_model_len}", param="prompt")
        choice = Choice(0, prompt_ids, completion_ids)
        nxt = target == "next"
        try:
            targets = [] if nxt else resolve_targets(
                target, len(prompt_ids), completion_ids, vocab, None, MAX_PER_TOKEN_ROWS)
        except ValueError as error:
            raise ExplainError(str(error), param="target") from None
        try:
            # target 'next': the worker puts the argmax next-token row first, then these rows
            prepared = await self.offload(self.prepare, choice, targets, options,
                                          message_contents)
        except ValueError as error:
            raise ExplainError(GROUNDING_ERROR + str(error), param="sources") from None
        self.check_cost([len(prepared.rows) + nxt], [len(ids)])
        key = uuid.uuid4().hex  # reserves memory for the forward; records nothing
        self.reserve(key, len(ids))
        try:
            job = self._job(choice, prepared, options, None, **({"next": True} if nxt else {}))
            if nxt:
                job["seeds"] = job["seeds"] or None
            result = (await self.run_jobs([job]))[0]
            if "error" in result:
                raise ExplainError(result["error"], status=500)
            if nxt:
                prepared.targets = resolve_targets("next", len(prompt_ids), completion_ids, vocab,
                                                   result["next_token_id"], MAX_PER_TOKEN_ROWS)
                prepared.rows = prepared.targets + prepared.rows
                prepared.sentence_row = [b + 1 for b in prepared.sentence_row]
            return await self.offload(self.to_wire, result, prepared, choice, options)
        finally:
            self.unreserve(key)

    def prepare(self, choice: Choice, targets: list, options: ExplainOptions,
                message_contents: Sequence[str | None] | None = None) -> "Prepared":
        """Decoded tokens and, when the request declares sources, the grounding plan and its
        sentence rows (appended to the targets: one batched backward). ``ValueError`` when a
        source cannot be placed."""
        prompt_length = len(choice.prompt_ids)
        spans = token_spans(self.tokenizer, choice.prompt_ids + choice.completion_ids,
                            prompt_length)
        if not (options.documents or options.sources):
            return Prepared(targets, list(targets), [], None, spans)
        threshold = (options.grounding_threshold if options.grounding_threshold is not None
                     else self.grounding_threshold)
        plan = plan_grounding(*spans, prompt_length, specs=options.sources or (),
                              documents=options.documents, message_contents=message_contents,
                              skip_token_ids=self.tokenizer.all_special_ids,
                              threshold=threshold, sentences=options.sentences)
        rows, sentence_row = sentence_rows(targets, plan, prompt_length, choice.completion_ids)
        return Prepared(targets, rows, sentence_row, plan, spans)

    def to_wire(self, result: dict[str, Any], prepared: "Prepared", choice: Choice,
                options: ExplainOptions) -> dict[str, Any]:
        explanation = assemble(result, prepared, choice, options, self.tokenizer,
                               self.model_name)
        if options.top_k:
            return compact(explanation, options.top_k).model_dump(mode="json")
        return explanation.model_dump(mode="json")


def assemble(result: dict[str, Any], prepared: "Prepared", choice: Choice,
             options: ExplainOptions, tokenizer: Any, model_name: str) -> Explanation:
    import torch

    from ..engine.backward import RelevanceResult

    relevance = RelevanceResult(
        token=torch.tensor(result["token"]),
        positional_cos=torch.tensor(result["positional_cos"]),
        positional_sin=torch.tensor(result["positional_sin"]),
        target_logit=torch.tensor(result["target_logit"]),
        softmax_absorbed=torch.tensor(result["softmax_absorbed"]),
        bias_absorbed=(torch.tensor(result["bias_absorbed"]) if "bias_absorbed" in result
                       else None),
    )
    ids = choice.prompt_ids + choice.completion_ids
    explanation = build_explanation(relevance, prepared.targets, ids, len(choice.prompt_ids),
                                    tokenizer, model=model_name, mode=options.mode,
                                    per_layer=options.per_layer,
                                    per_token=options.target == "per_token", spans=prepared.spans)
    if prepared.plan is not None:
        explanation.grounding = ground(explanation, relevance, prepared.plan,
                                       prepared.sentence_row)
    return explanation


@dataclass
class Prepared:
    """One choice ready for the worker: its main targets, every row of the batched backward
    (main targets first), the row of each sentence, the grounding plan and decoded tokens."""

    targets: list
    rows: list
    sentence_row: list[int]
    plan: GroundingPlan | None
    spans: tuple[str, list]


def _seeds(targets) -> list[list[list[int]]]:
    return [[list(p) for p in zip(t.positions, t.token_ids)] for t in targets]


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
