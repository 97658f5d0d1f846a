"""Prometheus metrics of the plugin (vllm_pelrp/serving/metrics.py).

Unit part: the metrics object on a fresh registry and the ``observed`` decorator. End to end: a
real server (tests/_live_server.py), its ``/metrics`` scraped before and after explained requests
with documents; the grounding histogram, the low-grounding counter (threshold 1.0 vs 0.0), the
latency histogram and the recorded-activation gauge must move by exactly what the requests did.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from vllm_pelrp.serving import metrics as pelrp_metrics
from vllm_pelrp.serving.metrics import PelrpMetrics, observed
from vllm_pelrp.serving.record_pool import PAGE_TOKENS

from _live_server import DOCUMENTS, MODEL, QUESTION, http, server_warnings, shared_server



def _explanation(score: float | None, low: bool = False) -> dict:
    out = {"tokens": [], "prompt_length": 0}
    if score is not None:
        out["grounding"] = {"grounding_score": score, "low_grounding": low, "sources": []}
    return out


# --- unit ---------------------------------------------------------------------------------------
def test_metrics_observe_counts_what_it_is_given():
    registry = CollectorRegistry()
    m = PelrpMetrics(registry)
    value = registry.get_sample_value
    assert value("pelrp_explanation_seconds_count", {"mode": "attnlrp"}) == 0  # pre-created
    m.observe("pa-lrp", 1.5, [_explanation(0.25, low=True), _explanation(0.75),
                              _explanation(None), {"error": "span out of range"}])
    assert value("pelrp_explanation_seconds_count", {"mode": "pa-lrp"}) == 1
    assert value("pelrp_explanation_seconds_sum", {"mode": "pa-lrp"}) == 1.5
    assert value("pelrp_explanations_total", {"mode": "pa-lrp", "outcome": "ok"}) == 3
    assert value("pelrp_explanations_total", {"mode": "pa-lrp", "outcome": "error"}) == 1
    assert value("pelrp_grounding_score_count") == 2
    assert value("pelrp_grounding_score_sum") == 1.0
    assert value("pelrp_grounding_score_bucket", {"le": "0.3"}) == 1
    assert value("pelrp_low_grounding_total") == 1


def test_observed_decorator_records_and_hands_explanations_to_sinks(monkeypatch):
    registry = CollectorRegistry()
    monkeypatch.setattr(pelrp_metrics, "_metrics", PelrpMetrics(registry))
    seen = []
    monkeypatch.setattr(pelrp_metrics, "_sinks", [lambda e, owner, user: seen.append((e, owner, user))])

    class Options:
        mode = "cp-lrp"

    class Service:
        @observed
        async def explain_choices(self, key, choices, options, owner=None, user=None):
            return {0: _explanation(0.5), 1: {"error": "no recording"}}

        @observed
        async def explain_tokens(self, prompt_ids, completion_ids, options, target):
            raise ValueError("bad prompt")

    out = asyncio.run(Service().explain_choices("k", [], options=Options(), owner="key:x",
                                                user="alice"))
    assert set(out) == {0, 1}
    assert seen == [(out[0], "key:x", "alice")]  # errors are not kept; owner and user come along
    with pytest.raises(ValueError):
        asyncio.run(Service().explain_tokens([1], [2], Options(), "completion"))
    value = registry.get_sample_value
    assert value("pelrp_explanation_seconds_count", {"mode": "cp-lrp"}) == 1  # not the raise
    assert value("pelrp_explanations_total", {"mode": "cp-lrp", "outcome": "ok"}) == 1
    assert value("pelrp_explanations_total", {"mode": "cp-lrp", "outcome": "error"}) == 2
    assert value("pelrp_grounding_score_sum") == 0.5


def test_gauge_refresh_survives_a_hung_a_cancelled_and_a_failed_worker_call(monkeypatch):
    """The background refresh must outlive any one worker call: one that never answers (timed
    out), one whose future is cancelled from inside, one that raises. Only cancelling the task
    itself stops it."""
    registry = CollectorRegistry()
    monkeypatch.setattr(pelrp_metrics, "_metrics", PelrpMetrics(registry))
    calls = []

    class Engine:
        async def collective_rpc(self, method, args=()):
            calls.append(method)
            if len(calls) == 1:
                await asyncio.Event().wait()  # never answers
            if len(calls) == 2:
                raise asyncio.CancelledError()  # e.g. the reply's future was cancelled
            if len(calls) == 3:
                raise RuntimeError("engine not ready")
            return [{"bytes": 5, "refused_keys": 3}, {"bytes": 2, "refused_keys": 3}]  # 2 ranks

    class Service:
        engine = Engine()
        reserved = {"req": 11}
        cap_bytes = 100

    async def scenario():
        task = asyncio.create_task(pelrp_metrics.refresh_activation_gauges(
            Service(), interval=0.01, rpc_timeout=0.05))
        value = registry.get_sample_value
        # the fourth call answers after about 0.1 s (a 0.05 s timeout, then three 0.01 s
        # periods); the loop gives it 30 s, so a loaded machine cannot fail the test, only a
        # refresh that stopped
        for _ in range(3000):
            await asyncio.sleep(0.01)
            if value("pelrp_recorded_activation_bytes") == 7:
                break
        assert value("pelrp_recorded_activation_bytes") == 7, calls
        assert value("pelrp_reserved_activation_bytes") == 11
        assert value("pelrp_recording_cap_bytes") == 100
        assert value("pelrp_refused_recording_keys") == 3  # each rank saw the same 3 requests
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert calls[:4] == ["pelrp_stats"] * 4


def test_idle_server_reads_the_refused_keys_only_every_idle_interval(monkeypatch):
    """A forged recording key reserves nothing, so an idle server must still read the workers'
    refused count now and then, and otherwise leave the workers alone."""
    registry = CollectorRegistry()
    monkeypatch.setattr(pelrp_metrics, "_metrics", PelrpMetrics(registry))

    def run(idle_interval: float) -> list[str]:
        calls, ticks = [], []

        class Engine:
            async def collective_rpc(self, method, args=()):
                calls.append(method)
                return [{"bytes": 0, "refused_keys": len(calls)}]

        class Service:
            engine = Engine()

            @property
            def reserved(self):  # read once per tick of the task
                ticks.append(1)
                return {}

        async def scenario():
            task = asyncio.create_task(pelrp_metrics.refresh_activation_gauges(
                Service(), interval=0.001, idle_interval=idle_interval))
            while len(ticks) < 10:
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(scenario())
        return calls

    assert run(idle_interval=10**6) == ["pelrp_stats"]  # the reading at start, then none
    polled = run(idle_interval=0.0)
    assert len(polled) > 1
    assert registry.get_sample_value("pelrp_refused_recording_keys") == len(polled)
    assert registry.get_sample_value("pelrp_recording_cap_bytes") == 0  # no cap: no recording


def test_metrics_reach_vllms_multiprocess_registry(tmp_path):
    """With --api-server-count > 1 vLLM serves /metrics from PROMETHEUS_MULTIPROC_DIR; ours are
    written there too (gauges included)."""
    script = (
        "from vllm_pelrp.serving.metrics import get_metrics\n"
        "m = get_metrics(); m.recorded_bytes.set(5); m.reserved_bytes.set(3)\n"
        "m.observe('pa-lrp', 1.0, [{'grounding': {'grounding_score': 0.2, 'low_grounding': True}}])\n"
        "from prometheus_client import CollectorRegistry, multiprocess\n"
        "r = CollectorRegistry(); multiprocess.MultiProcessCollector(r)\n"
        "for name in ('pelrp_recorded_activation_bytes', 'pelrp_reserved_activation_bytes',\n"
        "             'pelrp_low_grounding_total', 'pelrp_grounding_score_count'):\n"
        "    print(name, r.get_sample_value(name))\n")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[:4] == ["pelrp_recorded_activation_bytes 5.0", "pelrp_reserved_activation_bytes 3.0",
                       "pelrp_low_grounding_total 1.0", "pelrp_grounding_score_count 1.0"]


# --- end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    return shared_server(request.config, tmp_path_factory)


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """Every sample on /metrics: (name, sorted labels) -> value."""
    text = http.get(base + "/metrics", timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def chat(base: str, threshold: float, max_tokens: int = 12) -> httpx.Response:
    return http.post(base + "/v1/chat/completions", timeout=600, json={
        "model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": max_tokens, "temperature": 0,
        "explain": {"documents": DOCUMENTS, "grounding_threshold": threshold}})


@pytest.mark.slow
def test_metrics_are_on_vllms_metrics_endpoint(server):
    samples = scrape(server)
    names = {name for name, _ in samples}
    for name in ("pelrp_grounding_score_count", "pelrp_low_grounding_total",
                 "pelrp_explanation_seconds_count", "pelrp_recorded_activation_bytes",
                 "pelrp_reserved_activation_bytes", "pelrp_explanations_total",
                 "pelrp_backward_queue_seconds_count", "pelrp_recording_cap_bytes",
                 "pelrp_refused_recording_keys"):
        assert name in names, name
    assert any(name.startswith("vllm:") for name in names)  # the same endpoint as vLLM's own
    assert sample(samples, "pelrp_recording_cap_bytes") > 0  # the default model records


@pytest.mark.slow
def test_grounding_metrics_move_after_explained_requests(server):
    before = scrape(server)
    started = time.perf_counter()
    low = chat(server, threshold=1.0)
    high = chat(server, threshold=0.0)
    given = http.post(server + "/v1/explain", timeout=600, json={
        "messages": [{"role": "user", "content": QUESTION}], "completion": "gcal prints them.",
        "documents": DOCUMENTS, "grounding_threshold": 0.0})
    elapsed = time.perf_counter() - started
    after = scrape(server)

    for response in (low, high, given):
        assert response.status_code == 200, response.text
    explained = [low.json()["choices"][0]["explanation"], high.json()["choices"][0]["explanation"],
                 given.json()]
    groundings = [e["grounding"] for e in explained]
    assert [g["low_grounding"] for g in groundings] == [True, False, False]
    assert all(len(g["sources"]) == len(DOCUMENTS) for g in groundings)
    assert all(e["id"].startswith("expl-") for e in explained)

    def moved(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("pelrp_grounding_score_count") == 3
    assert moved("pelrp_grounding_score_sum") == pytest.approx(
        sum(g["grounding_score"] for g in groundings), abs=1e-9)
    # a score of 1.0 is impossible with instructions in the prompt: threshold 1.0 flags it,
    # 0.0 never does
    assert moved("pelrp_low_grounding_total") == 1
    assert moved("pelrp_explanation_seconds_count", mode="pa-lrp") == 3
    assert 0 < moved("pelrp_explanation_seconds_sum", mode="pa-lrp") < elapsed
    assert moved("pelrp_explanations_total", mode="pa-lrp", outcome="ok") == 3
    assert moved("pelrp_explanation_seconds_count", mode="attnlrp") == 0
    # one backward pass each, its wait for the worker observed (one at a time here: ~0 s)
    assert moved("pelrp_backward_queue_seconds_count") == 3
    assert 0 <= moved("pelrp_backward_queue_seconds_sum") < elapsed
    # the score histogram's buckets are cumulative: each score lands in every bucket >= it
    for bound in ("0.1", "0.3", "0.5", "1.0"):
        assert moved("pelrp_grounding_score_bucket", le=bound) == sum(
            g["grounding_score"] <= float(bound) for g in groundings)


@pytest.mark.slow
def test_recorded_activation_gauge_follows_a_request(server, request):
    """While an explained request generates, the gauge shows its recording: (prompt + max_tokens)
    positions, in whole pages of the pool, x 69,120 bytes (30 layers x 576 x fp32) on top of
    what was held before (0 on a fresh server); afterwards it comes back down."""
    # a long generation (~30 s here): twice in CI no scrape returned from 0.4 s to ~9 s after the
    # request started, when generation was over and the recording had gone to the backward; a
    # stall that long now leaves most of the generation to observe. On failure the message shows
    # each scrape's duration and /v1/explain/stats' api_loop (whether the server's event loop
    # stalled: serving/loopwatch.py)
    max_tokens = 320
    result = {}
    # what earlier tests on the shared server may still hold (unclaimed recordings are freed
    # 300 s after their request left the engine)
    time.sleep(1.0)  # one refresh period past anything that just finished
    before = scrape(server)
    base_recorded = sample(before, "pelrp_recorded_activation_bytes")
    base_reserved = sample(before, "pelrp_reserved_activation_bytes")

    def run():
        result["response"] = http.post(server + "/v1/chat/completions", timeout=600, json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Count from one to two hundred."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "explain": True})

    worker = threading.Thread(target=run)
    started = time.time()
    worker.start()
    # (seconds since the request when the scrape returned, seconds the scrape took, recorded
    # gauge, reserved gauge)
    timeline = []
    while worker.is_alive():
        asked = time.time()
        samples = scrape(server)
        timeline.append((round(time.time() - started, 2), round(time.time() - asked, 2),
                         sample(samples, "pelrp_recorded_activation_bytes"),
                         sample(samples, "pelrp_reserved_activation_bytes")))
        time.sleep(0.2)
    worker.join()
    response = result["response"]
    assert response.status_code == 200, response.text
    explanation = response.json()["choices"][0]["explanation"]
    per_token = 30 * 576 * 4
    expected = (explanation["prompt_length"] + max_tokens) * per_token
    # the worker holds whole pages of the recording pool
    pages = -(-(explanation["prompt_length"] + max_tokens) // PAGE_TOKENS)
    recorded = {value for _, _, value, _ in timeline}
    reserved = {value for _, _, _, value in timeline}
    assert base_recorded + pages * PAGE_TOKENS * per_token in recorded, (
        f"expected {base_recorded + pages * PAGE_TOKENS * per_token}; (s, scrape took s, "
        "recorded, reserved): "
        f"{timeline}; workers and API loop now: "
        f"{http.get(server + '/v1/explain/stats', timeout=30).text}; server warnings:\n"
        f"{server_warnings(request.config)}")
    assert max(reserved) == base_reserved + expected, timeline
    # both gauges are refreshed by a background task (every 0.5 s), not by the scrape; 60 s is
    # 120 refresh periods, a bound for a refresh that stopped, not a measurement
    deadline = time.time() + 60
    while sample(scrape(server), "pelrp_recorded_activation_bytes") > base_recorded:
        assert time.time() < deadline, "recorded-bytes gauge did not come back down"
        time.sleep(0.5)
    while sample(scrape(server), "pelrp_reserved_activation_bytes") != base_reserved:
        assert time.time() < deadline, "reserved-bytes gauge did not come back down"
        time.sleep(0.5)
