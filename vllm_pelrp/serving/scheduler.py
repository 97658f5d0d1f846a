"""Fair scheduling of the relevance backward passes on one worker.

Each submitted explanation runs on a thread of its own, but only one of them computes at a
time (they would only slow each other down on the same cores). The backward yields between
slices (one decoder layer each, ``Turn.checkpoint``), and the next slice goes to the waiting
backward with the least attained service: the seconds it has computed so far, less ``aging``
times the seconds it has waited. A newly arrived short explanation therefore starts at the next
layer boundary of a long one and runs to its end, and the long one resumes; under a stream of
short ones, the long one's waiting credit grows until it gets its slices (no starvation).

A short explanation submitted while a long one runs waits for at most one slice of the long one.
The time each backward spent waiting for the worker is kept (``Turn.waited``) and reported per
job as ``queue_seconds``.

Pure threading: no torch, no vLLM.
"""

from __future__ import annotations

import itertools
import threading
import time
from contextlib import contextmanager
from typing import Iterator

DEFAULT_AGING = 0.5
# target rows per slice of a layer's backward: a short explanation waits for at most one slice
# (the rotary and the additive engines both take it as ``row_chunk``)
ROW_CHUNK = 4


class Turn:
    """One backward's place in the scheduler: yields at ``checkpoint``."""

    def __init__(self, scheduler: "FairScheduler", name: str, order: int) -> None:
        self.scheduler = scheduler
        self.name = name
        self.order = order  # arrival order: ties go to the earlier one
        self.attained = 0.0  # seconds computed
        self.waited = 0.0  # seconds waited for the turn, in total
        self.slices = 0
        self._since = time.monotonic()  # start of the current slice or wait

    def priority(self, now: float, waiting: bool) -> tuple[float, int]:
        waited = self.waited + (now - self._since if waiting else 0.0)
        return self.attained - self.scheduler.aging * waited, self.order

    def checkpoint(self) -> None:
        """End a slice: hand the worker to a waiting backward that is owed it, and come back
        when this one is owed it again."""
        self.scheduler._yield(self)


class FairScheduler:
    def __init__(self, aging: float = DEFAULT_AGING) -> None:
        self.aging = aging
        self._cond = threading.Condition()
        self._owner: Turn | None = None
        self._waiting: list[Turn] = []
        self._order = itertools.count()
        self.handovers = 0  # slices that went to another backward than the one yielding

    @contextmanager
    def turn(self, name: str = "") -> Iterator[Turn]:
        """Wait for the worker, compute (calling ``checkpoint`` between slices), give it back."""
        turn = Turn(self, name, next(self._order))
        with self._cond:
            self._wait_for(turn)
        try:
            yield turn
        finally:
            with self._cond:
                now = time.monotonic()
                turn.attained += now - turn._since
                if self._owner is turn:
                    self._owner = None
                    self._hand_over(now)
                elif turn in self._waiting:  # interrupted while waiting
                    self._waiting.remove(turn)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"running": int(self._owner is not None), "waiting": len(self._waiting),
                    "handovers": self.handovers}

    # ---- under the condition's lock ---------------------------------------------------------
    def _wait_for(self, turn: Turn) -> None:
        turn._since = time.monotonic()
        self._waiting.append(turn)
        if self._owner is None:
            self._hand_over(turn._since)
        while self._owner is not turn:
            self._cond.wait()
        now = time.monotonic()
        turn.waited += now - turn._since
        turn._since = now

    def _hand_over(self, now: float) -> None:
        if self._waiting:
            chosen = min(self._waiting, key=lambda t: t.priority(now, True))
            self._waiting.remove(chosen)
            self._owner = chosen
            self._cond.notify_all()

    def _yield(self, turn: Turn) -> None:
        with self._cond:
            now = time.monotonic()
            turn.attained += now - turn._since
            turn._since = now
            turn.slices += 1
            if not self._waiting or self._owner is not turn:
                return
            best = min(self._waiting, key=lambda t: t.priority(now, True))
            if best.priority(now, True) >= turn.priority(now, False):
                return  # still this one's turn
            self.handovers += 1
            self._owner = None
            self._hand_over(now)
            self._wait_for(turn)
