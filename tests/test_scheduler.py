"""The worker's fair scheduling of backward passes (vllm_pelrp/serving/scheduler.py), on
synthetic backward passes made of fixed slices. The real figure (a 3 s explanation while a 70 s
one runs) is measured by ``bench/fairness.py``."""

from __future__ import annotations

import threading
import time

from vllm_pelrp.serving.scheduler import FairScheduler

SLICE = 0.02


def _backward(scheduler: FairScheduler, slices: int, log: list, name: str) -> threading.Thread:
    def run():
        started = time.monotonic()
        with scheduler.turn(name) as turn:
            for _ in range(slices):
                time.sleep(SLICE)  # a layer's work (only the turn's holder works)
                log.append(name)
                turn.checkpoint()
        log.append((name, time.monotonic() - started, turn.waited))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _finished(log, name):
    return next(item for item in log if isinstance(item, tuple) and item[0] == name)


def test_a_short_backward_is_not_stuck_behind_a_long_one():
    """Finding 4: FIFO made a 3 s explanation wait for a 70 s one. Here a 5-slice backward
    submitted while a 100-slice one runs finishes within about one slice of its time alone."""
    scheduler = FairScheduler()
    log: list = []
    long = _backward(scheduler, 100, log, "long")
    time.sleep(10 * SLICE)
    short = _backward(scheduler, 5, log, "short")
    short.join()
    _, seconds, waited = _finished(log, "short")
    assert seconds < 5 * SLICE + 4 * SLICE, seconds  # alone: 5 slices
    assert waited < 2 * SLICE
    long.join()
    slices = [item for item in log if isinstance(item, str)]
    assert slices.count("long") == 100 and slices.count("short") == 5
    # the short one's slices ran back to back, between two of the long one's
    first = slices.index("short")
    assert slices[first:first + 5] == ["short"] * 5
    assert scheduler.stats() == {"running": 0, "waiting": 0, "handovers": 1}


def test_only_one_backward_computes_at_a_time_and_a_long_one_is_not_starved():
    """A stream of short backward passes does not stop a long one: its waiting credit (aging)
    wins it slices while the stream goes on."""
    scheduler = FairScheduler(aging=0.5)
    log: list = []
    running = []
    lock = threading.Lock()
    overlap = []

    def run(name, slices):
        with scheduler.turn(name) as turn:
            for _ in range(slices):
                with lock:
                    running.append(name)
                    overlap.append(len(running))
                time.sleep(SLICE / 2)
                with lock:
                    running.remove(name)
                log.append(name)
                turn.checkpoint()

    long = threading.Thread(target=run, args=("long", 20))
    long.start()
    shorts = []
    deadline = time.monotonic() + 60 * SLICE
    number = 0
    while time.monotonic() < deadline:  # a new 2-slice backward every slice
        thread = threading.Thread(target=run, args=(f"short{number}", 2))
        thread.start()
        shorts.append(thread)
        number += 1
        time.sleep(SLICE / 2)
    progressed = log.count("long")
    for thread in shorts:
        thread.join()
    long.join()
    assert max(overlap) == 1  # never two at once
    assert progressed >= 3, progressed  # the long one got slices during the stream
