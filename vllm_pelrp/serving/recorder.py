"""Worker side: record the residual stream (the input of every decoder layer) of the requests
that asked for an explanation, inside vLLM's model runner, into the device pool of
``record_pool.py``.

How rows map to requests: vLLM flattens the scheduled tokens of all running requests into one
batch; request ``input_batch.req_ids[i]`` owns rows ``query_start_loc[i]:query_start_loc[i+1]``
and those rows hold consecutive positions from ``input_batch.num_computed_tokens_cpu[i]``. All
three are host-side arrays that the runner's ``_prepare_inputs`` fills before each step; right
after it, :meth:`Recorder.on_step` builds the step's plan (only requests whose ``extra_args``
carry a ``pelrp_key`` signed by the API process, ``keys.py``) and names their rows' slots in
the pool's index tensor. The op on every layer then writes those rows, and nothing else, at
their positions: no host sync, nothing read back per layer. Chunked prefill, decode steps and
recomputation after preemption all land at their positions; a prefix served from the prefix
cache is never run, so its rows are missing and are recomputed at explain time
(``Recording.first_position``).

Requests without a key cost one dict lookup per step.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .keys import KEY_FIELD, RecordingKey
from .record_pool import PoolFull, RecordingPool

KEY = KEY_FIELD
TOMBSTONE_SECONDS = 3600.0  # how long a claimed or released key stays refused


class RecordingError(RuntimeError):
    """A recording that cannot be used (over the memory cap, missing rows)."""


@dataclass
class Recording:
    req_id: str
    key: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # vLLM's live list: grows while the request runs
    capacity: int
    pages: list[int] | None  # the pool's pages it owns; None once freed (or never had any)
    pool: RecordingPool | None = None
    error: str | None = None
    first_position: int | None = None  # smallest recorded position
    end_position: int = 0  # one past the largest recorded position
    created: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        if self.pages is None or self.pool is None:
            return 0
        return len(self.pages) * self.pool.page_tokens * self.pool.bytes_per_token

    @property
    def usable(self) -> bool:
        return self.pages is not None

    def token_ids(self) -> list[int]:
        return list(self.prompt_token_ids) + [int(t) for t in self.output_token_ids if t >= 0]

    def layer_inputs(self, stop: int) -> Tensor:
        """Recorded positions ``0 .. stop-1``, ``(layers, stop, hidden)`` on the pool's
        device; the pages are freed."""
        if self.pages is None or self.pool is None:
            raise RecordingError(self.error or "the recording was freed")
        inputs = self.pool.gather(self.pages, stop)
        if inputs.is_cuda:  # the gather must be done before the engine may reuse the pages
            torch.cuda.current_stream(inputs.device).synchronize()
        self.close()
        return inputs

    def close(self) -> None:
        """Give the pages back to the pool (idempotent)."""
        pages, self.pages = self.pages, None
        if pages and self.pool is not None:
            self.pool.free(pages)


class StepClock:
    """Runs its listeners right after the model runner's ``_prepare_inputs``, which fills the
    host-side batch arrays of the step about to run (before its forward), and keeps the time of
    the last step. One per runner; vLLM's forward itself is not touched."""

    def __init__(self, runner: Any) -> None:
        self.last_step = 0.0  # time.monotonic() of the last model step (any request)
        self.listeners: list[Callable[[], None]] = []
        prepare = runner._prepare_inputs

        def prepare_inputs_then_listen(*args, **kwargs):
            prepared = prepare(*args, **kwargs)
            self.last_step = time.monotonic()
            for listener in self.listeners:
                listener()
            return prepared

        runner._prepare_inputs = prepare_inputs_then_listen

    @classmethod
    def of(cls, runner: Any) -> "StepClock":
        clock = getattr(runner, "_pelrp_step_clock", None)
        if clock is None:
            clock = runner._pelrp_step_clock = cls(runner)
        return clock


class Recorder:
    """The step plans and the recordings of one worker, over its ``RecordingPool``."""

    def __init__(self, model_runner: Any, pool: RecordingPool, max_model_len: int,
                 verify: Callable[[object], RecordingKey | None],
                 ttl_seconds: float = 300.0) -> None:
        self.runner = model_runner
        self.pool = pool
        self.num_layers = pool.num_layers
        self.max_model_len = int(max_model_len)
        self.verify = verify  # the signed key of a request's ``pelrp_key``, or None (keys.py)
        self.ttl_seconds = ttl_seconds
        self.ended: dict[str, float] = {}  # claimed or released keys: refused from then on
        self.refused_keys = 0  # requests whose pelrp_key was not signed by the API process
        self.bytes_per_token = pool.bytes_per_token
        self.cap_bytes = pool.cap_bytes
        self.lock = threading.RLock()
        self.recordings: dict[str, Recording] = {}
        self._decided: dict[str, Recording | None] = {}
        self._installed = False
        self.steps_recorded = 0
        self.peak_bytes = 0

    # ---- each step --------------------------------------------------------------------------
    def install(self) -> None:
        """Plan each step right after the runner prepares it (``StepClock``)."""
        if not self._installed:
            StepClock.of(self.runner).listeners.append(self.on_step)
            self._installed = True

    def on_step(self) -> None:
        """Plan the step the runner just prepared and name its rows' slots in the pool."""
        self.pool.set_step(self._build_plan())

    @property
    def last_step(self) -> float:
        return StepClock.of(self.runner).last_step

    @property
    def used_bytes(self) -> int:
        return sum(r.nbytes for r in self.recordings.values())

    def _decide(self, req_id: str) -> Recording | None:
        state = self.runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None) if state is not None else None
        extra = getattr(params, "extra_args", None) or {}
        raw = extra.get(KEY)
        if raw is None:
            return None
        signed = self.verify(raw)
        with self.lock:
            if signed is None or signed.key in self.ended or sum(
                    r.key == signed.key for r in self.recordings.values()) >= signed.recordings:
                # forged, reused, already claimed or released, or more choices than reserved
                self.refused_keys += 1
                return None
        self.collect_garbage()  # only when a request asks: plain requests never get here
        prompt = list(state.prompt_token_ids or [])
        max_tokens = getattr(params, "max_tokens", None) or self.max_model_len
        capacity = min(len(prompt) + int(max_tokens), self.max_model_len)
        with self.lock:
            recording = Recording(req_id, signed.key, prompt, state.output_token_ids, capacity,
                                  None, self.pool)
            try:
                recording.pages = self.pool.allocate(capacity)
            except PoolFull as full:
                need = self.pool.pages_for(capacity) * self.pool.page_tokens * self.bytes_per_token
                recording.error = (
                    f"recording this request needs {need / 2**20:.1f} MiB ({capacity} tokens x "
                    f"{self.bytes_per_token} bytes), but the {self.cap_bytes / 2**20:.1f} MiB "
                    f"cap is in use ({full})")
            self.recordings[req_id] = recording
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        return recording

    def _build_plan(self) -> list[tuple[int, int, list[int], int]]:
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        if num_reqs == 0:
            return []
        decided = self._decided
        plan = []
        starts = computed = None
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            if req_id in decided:
                recording = decided[req_id]
            else:
                recording = decided[req_id] = self._decide(req_id)
                if len(decided) > 4 * max(16, len(self.runner.requests)):
                    self._prune_decided()
            if recording is None or recording.pages is None:
                continue
            if starts is None:
                starts = self.runner.query_start_loc.np
                computed = batch.num_computed_tokens_cpu
            r0, r1, p0 = int(starts[i]), int(starts[i + 1]), int(computed[i])
            if r1 <= r0:
                continue
            if p0 + (r1 - r0) > recording.capacity:
                recording.error = (f"request ran past its recording capacity of "
                                   f"{recording.capacity} tokens")
                recording.close()
                continue
            plan.append((r0, r1, recording.pages, p0))
            recording.first_position = p0 if recording.first_position is None else min(
                recording.first_position, p0)
            recording.end_position = max(recording.end_position, p0 + r1 - r0)
            recording.last_seen = time.monotonic()
        if plan:
            self.steps_recorded += 1
        return plan

    def _prune_decided(self) -> None:
        live = self.runner.requests
        for req_id in [r for r in self._decided if r not in live]:
            del self._decided[req_id]

    # ---- lifetime ---------------------------------------------------------------------------
    def take(self, key: str) -> list[Recording]:
        """Remove and return every recording made under ``key`` (one per choice). The key ends
        here: a step that runs its request later (an abort not yet seen by the engine) records
        nothing more under it."""
        now = time.monotonic()
        with self.lock:
            self.ended[key] = now
            if len(self.ended) > 4096:
                self.ended = {k: t for k, t in self.ended.items()
                              if now - t < TOMBSTONE_SECONDS}
            found = [r for r in self.recordings.values() if r.key == key]
            for recording in found:
                del self.recordings[recording.req_id]
            return found

    def release(self, key: str) -> int:
        freed = 0
        for recording in self.take(key):
            freed += recording.nbytes
            recording.close()
        return freed

    def collect_garbage(self) -> int:
        """Free recordings whose request left the engine more than ``ttl_seconds`` ago and was
        never claimed or released. A backstop only: the API process claims (explains) or
        releases every key it signed when its request ends, finished or aborted."""
        now = time.monotonic()
        freed = 0
        with self.lock:
            live = self.runner.requests
            for req_id, recording in list(self.recordings.items()):
                if req_id in live:
                    recording.last_seen = now
                elif now - recording.last_seen > self.ttl_seconds:
                    freed += recording.nbytes
                    recording.close()
                    del self.recordings[req_id]
        return freed

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "recordings": len(self.recordings),
                "requests": len({r.key for r in self.recordings.values()}),
                "refused_keys": self.refused_keys,
                "bytes": self.used_bytes,
                "peak_bytes": self.peak_bytes,
                "cap_bytes": self.cap_bytes,
                "bytes_per_token": self.bytes_per_token,
                "steps_recorded": self.steps_recorded,
                "pool_free_pages": self.pool.free_pages,
                "pool_pages": self.pool.num_pages,
                "installed": self._installed,
            }
