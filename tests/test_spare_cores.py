"""The executor that runs the backward's recomputes on vLLM's spare cores while the engine is idle."""

from __future__ import annotations

import os
import threading
import time

import pytest

from vllm_pelrp.serving import spare_cores as sc


def test_runs_inline_while_the_engine_steps_and_on_the_spare_core_when_idle():
    cores = os.sched_getaffinity(0)
    last_step = [time.monotonic()]
    executor = sc.SpareCoreExecutor(cores, lambda: last_step[0], idle_seconds=60)
    try:
        caller = threading.get_ident()
        assert executor.submit(threading.get_ident).result() == caller  # engine busy: inline
        assert (executor.inline, executor.offloaded) == (1, 0)
        last_step[0] = time.monotonic() - 120  # no step for two minutes: idle
        assert executor.submit(threading.get_ident).result() != caller
        assert executor.submit(os.sched_getaffinity, 0).result() == cores
        assert (executor.inline, executor.offloaded) == (1, 2)
        last_step[0] = time.monotonic()
        with pytest.raises(ZeroDivisionError):  # an inline error is delivered by the future
            executor.submit(lambda: 1 / 0).result()
    finally:
        executor.shutdown()


def test_spare_cores_are_the_engine_process_cores_the_worker_is_not_bound_to(monkeypatch):
    monkeypatch.setattr(sc.torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(sc.os, "sched_getaffinity", lambda pid: {0, 1, 2} if pid else {0})
    assert sc.spare_cores() == {1, 2}
    monkeypatch.setenv(sc.ENV, "0")
    assert sc.spare_cores() == set()
    monkeypatch.setenv(sc.ENV, " Off ")
    assert sc.spare_cores() == set()
    monkeypatch.setenv(sc.ENV, "1")
    assert sc.spare_cores() == {1, 2}
    monkeypatch.delenv(sc.ENV)
    monkeypatch.setattr(sc.torch, "get_num_threads", lambda: 4)  # worker has several threads
    assert sc.spare_cores() == set()


def test_a_refused_pinning_leaves_the_executor_working():
    """Cores the thread may not use (a cpuset) must not break the backward."""
    executor = sc.SpareCoreExecutor({10_000}, lambda: 0.0, idle_seconds=0)
    try:
        assert executor.submit(lambda: 42).result() == 42
        assert executor.offloaded == 1
    finally:
        executor.shutdown()
