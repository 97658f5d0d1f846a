"""The worker's backward threads run below the engine's priority (serving/background.py)."""

from __future__ import annotations

import sys

import pytest

from vllm_pelrp import settings
from vllm_pelrp.serving.background import background_pool, thread_nice

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="per-thread nice values are Linux's")


def test_backward_threads_run_at_the_configured_nice_value(monkeypatch):
    before = thread_nice()
    with background_pool(2, "pelrp-test") as pool:
        assert pool.submit(thread_nice).result() == max(before, 10)
    assert thread_nice() == before  # the calling thread keeps its own priority
    monkeypatch.setenv("VLLM_PELRP_BACKWARD_NICE", "15")
    with background_pool(1, "pelrp-test") as pool:
        assert pool.submit(thread_nice).result() == max(before, 15)


def test_threads_a_backward_thread_starts_inherit_its_nice_value():
    import threading

    def child_nice() -> int:
        seen = []
        child = threading.Thread(target=lambda: seen.append(thread_nice()))
        child.start()
        child.join()
        return seen[0]

    with background_pool(1, "pelrp-test") as pool:
        assert pool.submit(child_nice).result() == max(thread_nice(), 10)


def test_a_nice_value_outside_0_to_19_is_refused():
    with pytest.raises(ValueError, match="from 0 to 19"):
        settings.get("VLLM_PELRP_BACKWARD_NICE", {"VLLM_PELRP_BACKWARD_NICE": "20"})
    assert settings.get("VLLM_PELRP_BACKWARD_NICE", {}) == 10
