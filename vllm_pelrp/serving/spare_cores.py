"""Run the backward's layer recomputes on the cores vLLM leaves to its engine process, while the
engine is idle.

On CPU, vLLM binds the worker's OpenMP threads to all but ``VLLM_CPU_NUM_OF_RESERVED_CPU`` cores
(at least one per worker) and leaves the rest to the engine-core process, whose scheduler loop
busy-waits on the worker while requests generate and blocks on its input queue when there is no
work (``EngineCore._process_input_queue``). The relevance
backward runs on a worker thread, so by default it shares the worker's cores. Its layer
recomputes do not depend on the relevance (``relevance_from_layer_inputs``'s
``recompute_executor``), so they can run one layer ahead on another core: on a 2-core machine
the explanation after a request finishes then uses both cores instead of one.

The executor hands a recompute to its thread (pinned to the spare cores) only when the engine
has not run a model step for ``idle_seconds``; otherwise it runs the recompute at once, on the
calling thread, and the spare cores stay with the scheduler. A request that arrives during a
backward shares a spare core with at most one layer's recompute. The results are the same bit
for bit either way (same operations, one thread each).

Used only where the worker runs one OpenMP thread (the 2-core case): with more worker threads
the recompute would run its operations on the worker's cores anyway, and one more core adds
little. ``VLLM_PELRP_SPARE_CORES=0`` turns it off.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Callable

import torch

from .. import settings

ENV = "VLLM_PELRP_SPARE_CORES"
IDLE_SECONDS = 0.1


def spare_cores() -> set[int]:
    """Cores the engine process may use that this worker process is not bound to ({} if none,
    if the worker runs more than one OpenMP thread, or if ``VLLM_PELRP_SPARE_CORES=0``)."""
    if not settings.get(ENV):
        return set()
    if torch.get_num_threads() != 1 or not hasattr(os, "sched_getaffinity"):
        return set()
    try:
        engine = os.sched_getaffinity(os.getppid())
        worker = os.sched_getaffinity(0)
    except OSError:
        return set()
    return engine - worker


def _pin_this_thread(cores: set[int]) -> None:
    """Bind the calling thread to ``cores``; if that is refused, it stays where it is (slower,
    not wrong: a failing initializer would break the pool and every backward with it)."""
    try:
        os.sched_setaffinity(0, cores)
    except OSError:
        pass


class SpareCoreExecutor(Executor):
    """``submit`` runs on a thread pinned to ``cores`` while ``last_step()`` is older than
    ``idle_seconds``; otherwise it runs the call at once and returns a finished future."""

    def __init__(self, cores: set[int], last_step: Callable[[], float],
                 idle_seconds: float = IDLE_SECONDS) -> None:
        self.cores = set(cores)
        self.last_step = last_step
        self.idle_seconds = idle_seconds
        self.offloaded = 0
        self.inline = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pelrp-recompute",
                                        initializer=_pin_this_thread, initargs=(self.cores,))

    def engine_idle(self) -> bool:
        return time.monotonic() - self.last_step() >= self.idle_seconds

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self.engine_idle():
            self.offloaded += 1
            return self._pool.submit(fn, *args, **kwargs)
        self.inline += 1
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001  (delivered through the future)
            future.set_exception(error)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
