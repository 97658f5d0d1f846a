"""The threads that run explanation work on a worker, below the engine's own priority.

An explanation's backward is background work: the requests that are generating must not wait
for it. On a machine with fewer free cores than busy threads the kernel's scheduler decides who
waits, and at equal priority it shares the cores evenly, so the engine's thread, and the threads
that carry vLLM's messages between its processes, wait for the backward as often as it waits
for them. Under tensor parallelism on a 2-core CPU that cost plain requests 10 s now and then
(bench/perf/tp_stall.py): each rank's message-queue reader parks after a second without
messages and is woken by a best-effort zmq notification; starved of CPU, a notification is
dropped and the reader sleeps until its 5 s recheck (vLLM's
``shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS``), twice per stalled request.

So every backward thread runs at the nice value ``VLLM_PELRP_BACKWARD_NICE`` (Linux: nice is
per thread, and threads it starts, OpenMP's included, inherit it). Raising one's own nice
value needs no privilege; where the platform has no per-thread nice it is left alone.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from .. import settings

logger = logging.getLogger("vllm_pelrp.serving")


def lower_priority() -> int | None:
    """Set the calling thread's nice value to ``VLLM_PELRP_BACKWARD_NICE`` (never lower than
    it already is); returns the nice value it runs at, None where that cannot be read."""
    wanted = settings.get("VLLM_PELRP_BACKWARD_NICE")
    if not hasattr(os, "setpriority"):
        return None
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if wanted > current:
            os.setpriority(os.PRIO_PROCESS, tid, wanted)
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError as error:  # a sandbox that forbids it: run at the inherited priority
        logger.warning("vllm-pelrp: could not lower the backward thread's priority: %s", error)
        return None


def background_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads run at the backward's nice value (``lower_priority``)."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=lower_priority)


def thread_nice() -> int | None:
    """The calling thread's nice value (for the workers' stats), None where unknown."""
    if not hasattr(os, "getpriority"):
        return None
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
