"""Worker side: record the residual stream (the input of every decoder layer) of the requests
that asked for an explanation, inside vLLM's model runner.

How rows map to requests: vLLM flattens the scheduled tokens of all running requests into one
batch; request ``input_batch.req_ids[i]`` owns rows ``query_start_loc[i]:query_start_loc[i+1]``
and those rows hold consecutive positions (the first one is in ``positions``). A forward
pre-hook on decoder layer 0 builds the step's plan (only requests whose ``extra_args`` carry a
``pelrp_key`` signed by the API process, ``keys.py``); the pre-hook of every layer then copies those rows, and nothing else, into the
request's preallocated buffer at their positions. Layer 0's input is the embedding output;
layer l > 0 gets ``hidden_states + residual`` (vLLM carries the residual separately and adds it
in the fused add-RMSNorm, after the hook). Chunked prefill, decode steps and recomputation after
preemption all land at their positions; a prefix served from the prefix cache is never run, so
its rows are missing and are recomputed at explain time (``Recording.first_position``).

Requests without a key cost one dict lookup per step; the other layers' hooks return at once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .keys import KEY_FIELD, RecordingKey

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
    buffer: Tensor | None  # (num_layers, capacity, hidden)
    error: str | None = None
    first_position: int | None = None  # smallest recorded position
    end_position: int = 0  # one past the largest recorded position
    created: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()

    def token_ids(self) -> list[int]:
        return list(self.prompt_token_ids) + [int(t) for t in self.output_token_ids if t >= 0]


class Recorder:
    """Owns the hooks and the recordings of one worker."""

    def __init__(self, model_runner: Any, layers: list[torch.nn.Module], hidden_size: int,
                 dtype: torch.dtype, cap_bytes: int, max_model_len: int,
                 verify: Callable[[object], RecordingKey | None],
                 ttl_seconds: float = 300.0) -> None:
        self.runner = model_runner
        self.layers = layers
        self.num_layers = len(layers)
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.cap_bytes = int(cap_bytes)
        self.max_model_len = int(max_model_len)
        self.verify = verify  # the signed key of a request's ``pelrp_key``, or None (keys.py)
        self.ttl_seconds = ttl_seconds
        self.ended: dict[str, float] = {}  # claimed or released keys: refused from then on
        self.refused_keys = 0  # requests whose pelrp_key was not signed by the API process
        self.bytes_per_token = self.num_layers * hidden_size * torch.empty(0, dtype=dtype).element_size()
        self.lock = threading.RLock()
        self.recordings: dict[str, Recording] = {}
        self._decided: dict[str, Recording | None] = {}
        self._plan: list[tuple[Recording, int, int, int]] = []
        self._handles = []
        self.steps_recorded = 0
        self.peak_bytes = 0
        self.last_step = 0.0  # time.monotonic() of the last model step (any request)

    # ---- hooks ------------------------------------------------------------------------------
    def install(self) -> None:
        if self._handles:
            return
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._make_hook(index)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, index: int):
        def hook(module, args):
            self.on_layer(index, args[0], args[1], args[2] if index else None)
        return hook

    def on_layer(self, index: int, positions: Tensor, hidden: Tensor,
                 residual: Tensor | None) -> None:
        """Called with each decoder layer's arguments before it runs (from an eager pre-hook,
        or from the ``pelrp::record_layer_input`` op inside a compiled model)."""
        if index == 0:
            self.last_step = time.monotonic()
            self._plan = self._build_plan(positions)
        if self._plan:
            self._copy(index, hidden, residual)

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
        need = capacity * self.bytes_per_token
        with self.lock:
            recording = Recording(req_id, signed.key, prompt, state.output_token_ids, capacity,
                                  None)
            used = self.used_bytes
            if used + need > self.cap_bytes:
                recording.error = (
                    f"recording this request needs {need / 2**20:.1f} MiB ({capacity} tokens x "
                    f"{self.bytes_per_token} bytes), but only {(self.cap_bytes - used) / 2**20:.1f} "
                    f"MiB of the {self.cap_bytes / 2**20:.1f} MiB cap are free"
                )
            else:
                recording.buffer = torch.empty(self.num_layers, capacity, self.hidden_size,
                                               dtype=self.dtype)
            self.recordings[req_id] = recording
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        return recording

    def _build_plan(self, positions: Tensor) -> list[tuple[Recording, int, int, int]]:
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        if num_reqs == 0:
            return []
        decided = self._decided
        plan = []
        starts = None
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            if req_id in decided:
                recording = decided[req_id]
            else:
                recording = decided[req_id] = self._decide(req_id)
                if len(decided) > 4 * max(16, len(self.runner.requests)):
                    self._prune_decided()
            if recording is None or recording.buffer is None:
                continue
            if starts is None:
                starts = self.runner.query_start_loc.np
            r0, r1 = int(starts[i]), int(starts[i + 1])
            if r1 <= r0 or r1 > positions.shape[0]:
                continue
            p0 = int(positions[r0])
            if p0 + (r1 - r0) > recording.capacity:
                recording.error = (f"request ran past its recording capacity of "
                                   f"{recording.capacity} tokens")
                recording.buffer = None
                continue
            plan.append((recording, r0, r1, p0))
            recording.first_position = p0 if recording.first_position is None else min(
                recording.first_position, p0)
            recording.end_position = max(recording.end_position, p0 + r1 - r0)
            recording.last_seen = time.monotonic()
        if plan:
            self.steps_recorded += 1
        return plan

    def _copy(self, layer: int, hidden: Tensor, residual: Tensor | None) -> None:
        for recording, r0, r1, p0 in self._plan:
            out = recording.buffer[layer, p0 : p0 + r1 - r0]
            if residual is None:
                out.copy_(hidden[r0:r1])
            else:
                torch.add(hidden[r0:r1], residual[r0:r1], out=out)

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
            recording.buffer = None
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
                "hooks_installed": bool(self._handles),
            }
