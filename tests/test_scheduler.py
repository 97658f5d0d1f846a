"""The worker's fair scheduling of backward passes (vllm_pelrp/serving/scheduler.py), on
synthetic backward passes made of slices, under a fake clock: a slice advances the clock by one
unit, arrivals happen at fixed points of the run, so every decision the scheduler makes (and so
every order and count asserted here) is the same on every run, however loaded the machine. The
real figure (a 3 s explanation while a 70 s one runs, in seconds) is measured by
``bench/perf/fairness.py``."""

from __future__ import annotations

import threading
import types

import pytest

from vllm_pelrp.serving import scheduler as scheduler_module
from vllm_pelrp.serving.scheduler import FairScheduler

WAIT_S = 60.0  # how long a helper thread may take to reach a point (only on a broken scheduler)


class FakeClock:
    """The scheduler's ``time.monotonic``: moves only when a slice's work advances it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def monotonic(self) -> float:
        with self.lock:
            return self.now

    def advance(self, units: float = 1.0) -> None:
        with self.lock:
            self.now += units


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(scheduler_module, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    return fake


def _wait_until(condition, what: str) -> None:
    """Block until ``condition()`` holds (a point in another thread), polling."""
    done = threading.Event()
    for _ in range(int(WAIT_S / 0.001)):
        if condition():
            return
        done.wait(0.001)
    raise AssertionError(f"never reached: {what}")


class Runner:
    """Backward passes on threads; one shared log of (name, slice) in the order they ran, and a
    count of how many were computing at once."""

    def __init__(self, scheduler: FairScheduler, clock: FakeClock) -> None:
        self.scheduler = scheduler
        self.clock = clock
        self.log: list[str] = []
        self.finished: dict[str, tuple[float, float, float]] = {}  # submitted, done, waited
        self.computing = 0
        self.most_at_once = 0
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def submit(self, name: str, slices: int, during_slice=None) -> threading.Thread:
        """Start a backward of ``slices`` slices; ``during_slice(name, index)`` runs inside each
        slice (while this backward holds the worker), before its checkpoint."""
        submitted = self.clock.monotonic()

        def run() -> None:
            with self.scheduler.turn(name) as turn:
                for index in range(slices):
                    with self.lock:
                        self.computing += 1
                        self.most_at_once = max(self.most_at_once, self.computing)
                    self.clock.advance()  # the slice's work
                    self.log.append(name)
                    if during_slice is not None:
                        during_slice(name, index)
                    with self.lock:
                        self.computing -= 1
                    turn.checkpoint()
            self.finished[name] = (submitted, self.clock.monotonic(), turn.waited)

        thread = threading.Thread(target=run, name=f"backward-{name}", daemon=True)
        self.threads.append(thread)
        thread.start()
        return thread

    def waiting(self) -> int:
        return self.scheduler.stats()["waiting"]

    def join(self) -> None:
        for thread in list(self.threads):
            thread.join(WAIT_S)
            assert not thread.is_alive(), f"{thread.name} never finished"


def test_a_short_backward_is_not_stuck_behind_a_long_one(clock):
    """Finding 4: FIFO made a 3 s explanation wait for a 70 s one. A 5-slice backward submitted
    after the 10th of a 100-slice one's slices takes the worker at the next slice boundary, runs
    its 5 slices back to back, and finishes in its time alone; the long one then resumes."""
    scheduler = FairScheduler()
    runner = Runner(scheduler, clock)

    def long_slice(name, index):
        if index == 9:  # the short one arrives during the long one's 10th slice
            runner.submit("short", 5)
            _wait_until(lambda: runner.waiting() == 1, "the short backward waits")

    runner.submit("long", 100, long_slice)
    runner.join()
    assert runner.log == ["long"] * 10 + ["short"] * 5 + ["long"] * 90
    submitted, done, waited = runner.finished["short"]
    assert done - submitted == 5  # its 5 slices: nothing of the long one's in between
    assert waited == 0  # it took the worker at the boundary it arrived in
    assert scheduler.stats() == {"running": 0, "waiting": 0, "handovers": 1}
    assert runner.most_at_once == 1


def _stream(clock, aging: float, stream: int = 40):
    """A 20-slice backward, and while ``stream`` short ones are submitted, one new 2-slice
    backward arriving in every slice of whichever backward is running. Returns how many of the
    long one's slices ran while the stream went on, and the runner."""
    scheduler = FairScheduler(aging=aging)
    runner = Runner(scheduler, clock)
    submitted = []

    def arrive(name, index):
        if len(submitted) < stream:
            short = f"short{len(submitted)}"
            before = runner.waiting()
            submitted.append(runner.log.count("long"))  # the long one's progress at that point
            runner.submit(short, 2, arrive)
            _wait_until(lambda: runner.waiting() == before + 1, f"{short} waits")

    runner.submit("long", 20, arrive)
    runner.join()
    return submitted[-1], runner


def test_a_long_backward_is_not_starved_by_a_stream_of_short_ones(clock):
    """Least attained service alone would starve a long backward under a stream of short ones
    (each newcomer has attained nothing); its waiting credit (aging) wins it slices while the
    stream goes on, and only one backward computes at any time."""
    progressed, runner = _stream(clock, aging=0.5)
    assert runner.most_at_once == 1
    assert runner.log.count("long") == 20
    assert all(runner.log.count(f"short{i}") == 2 for i in range(40))
    # the long one ran well within the stream of 40 arrivals, not only after it
    # with aging ½ it takes every seventh slice while the stream lasts (three 2-slice short ones
    # between two of its slices)
    assert progressed == 7, runner.log


def test_without_aging_the_stream_starves_the_long_backward(clock):
    """The same run without aging: the long one gets only its first slice until the stream
    stops (what the previous test would catch if aging were lost)."""
    progressed, runner = _stream(clock, aging=0.0)
    assert progressed == 1, runner.log
    assert runner.log.count("long") == 20
