"""Watch the API server's event loop for stalls.

Everything the API process does for every client runs on one asyncio loop: parsing requests,
streaming tokens, serving ``/metrics`` and the activation-gauge refresh. Code that blocks it
(a long synchronous call) stalls all of them at once, and nothing in vLLM reports it. The loop
beats every ``period`` seconds (a ``call_later`` callback); a daemon thread checks the beat.
When the loop has not beaten for ``threshold`` seconds the thread logs a warning with the loop
thread's stack (what it is blocked in, if the blocking code lets other threads run), and once
the loop beats again it logs how long the stall lasted. ``stats()`` (in
``GET /v1/explain/stats``) counts the stalls and gives the longest.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from typing import Any

logger = logging.getLogger("vllm_pelrp.serving")


class LoopWatch:
    def __init__(self, loop: asyncio.AbstractEventLoop, threshold: float = 2.0,
                 period: float = 0.25) -> None:
        self.loop = loop
        self.threshold = threshold
        self.period = period
        self.stalls = 0
        self.longest = 0.0
        self._last_beat = time.monotonic()
        self._loop_thread: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Call from the loop's own thread."""
        self._loop_thread = threading.get_ident()
        self._last_beat = time.monotonic()
        self.loop.call_soon(self._beat)
        self._thread = threading.Thread(target=self._watch, name="pelrp-loopwatch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict[str, Any]:
        return {"stalls": self.stalls, "longest_seconds": round(self.longest, 3),
                "threshold_seconds": self.threshold}

    def _beat(self) -> None:
        self._last_beat = time.monotonic()
        if not self._stop.is_set():
            self.loop.call_later(self.period, self._beat)

    def _watch(self) -> None:
        stalled_since: float | None = None
        while not self._stop.wait(self.period):
            beat = self._last_beat
            lag = time.monotonic() - beat
            if stalled_since is None and lag > self.threshold:
                stalled_since = beat
                frame = sys._current_frames().get(self._loop_thread)
                stack = "".join(traceback.format_stack(frame)) if frame else "(not available)"
                logger.warning("vllm-pelrp: the API server's event loop has been blocked for "
                               "%.1f s (no request or /metrics scrape is served meanwhile); "
                               "it is in:\n%s", lag, stack)
            elif stalled_since is not None and beat > stalled_since:
                length = beat - stalled_since
                self.stalls += 1
                self.longest = max(self.longest, length)
                logger.warning("vllm-pelrp: the API server's event loop ran again after a "
                               "%.1f s stall", length)
                stalled_since = None
