"""The hardening findings against a live plugin server (tests/_live_server.py: default model,
``--api-key`` with two clients' keys). Each test names its finding; on the code before the fix
each of them fails.

1. forged recordings: a client-sent ``pelrp_key`` made the worker record;
2. explanations readable by every client;
3. a 5 MB document stalled the event loop for 9 s before its 400;
5. errors not in OpenAI's shape, ``explain`` given twice;
and every route the plugin adds honours ``--api-key``.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from fastapi import FastAPI

from _live_server import AUTH, MODEL, OTHER_AUTH, http, shared_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    return shared_server(request.config, tmp_path_factory)


def _stats(server) -> dict:
    return http.get(server + "/v1/explain/stats", timeout=30).json()


def test_forged_recording_keys_record_nothing(server):
    """Finding 1: ``vllm_xargs.pelrp_key`` on a plain request recorded 2.11 GB that nothing had
    reserved, and the stats listed the keys in flight."""
    before = _stats(server)["workers"][0]
    assert "keys" not in before
    body = {"model": MODEL, "prompt": "Write a long story about a dragon.", "max_tokens": 200,
            "ignore_eos": True, "temperature": 1.0, "seed": 0, "n": 2, "stream": True,
            "vllm_xargs": {"pelrp_key": "anything"}}
    with http.stream("POST", server + "/v1/completions", json=body, timeout=120) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        for _ in range(8):  # generation is under way
            next(lines)
        during = _stats(server)["workers"][0]
    assert during["bytes"] == 0 and during["recordings"] == 0, during
    # vLLM's other routes pass vllm_xargs on unfiltered: the worker checks the key's signature
    forged = "0" * 32 + ".1." + "f" * 64
    for key in ("anything", forged):
        reply = http.post(server + "/v1/messages", timeout=120, json={
            "model": MODEL, "max_tokens": 16, "vllm_xargs": {"pelrp_key": key},
            "messages": [{"role": "user", "content": "Say hello."}]})
        assert reply.status_code == 200, reply.text
    after = _stats(server)["workers"][0]
    assert after["refused_keys"] >= before["refused_keys"] + 2, after
    assert after["bytes"] == 0 and after["peak_bytes"] == before["peak_bytes"]
    # explanations are still served, with nothing in the way
    explained = http.post(server + "/v1/completions", timeout=600, json={
        "model": MODEL, "prompt": "Hi", "max_tokens": 4, "explain": {}})
    assert explained.status_code == 200
    assert "tokens" in explained.json()["choices"][0]["explanation"]


def test_explanations_are_private_to_their_api_key(server):
    """Finding 2: ``GET /v1/explanations`` listed every client's explanations with previews,
    and any key holder could read any of them by id."""
    secret = "My account PIN is 4921."
    made = http.post(server + "/v1/explain", timeout=600, json={
        "messages": [{"role": "user", "content": secret}], "completion": "Noted."})
    assert made.status_code == 200, made.text
    mine = made.json()["id"]
    own = http.get(server + "/v1/explanations", params={"ids": mine}, timeout=30).json()["data"]
    assert mine in [item["id"] for item in own]
    unnamed = http.get(server + "/v1/explanations", timeout=30)  # ids are capabilities
    assert unnamed.status_code == 400 and "4921" not in unnamed.text
    theirs = http.get(server + "/v1/explanations", params={"ids": mine}, headers=OTHER_AUTH,
                      timeout=30)
    assert theirs.status_code == 200
    assert mine not in theirs.text and "4921" not in theirs.text
    read = http.get(f"{server}/v1/explanations/{mine}", headers=OTHER_AUTH, timeout=30)
    assert read.status_code == 404 and "4921" not in read.text
    assert http.get(f"{server}/v1/explanations/{mine}", timeout=30).json()["text"].count("4921")
    everyone = http.get(server + "/v1/explanations", params={"scope": "all"}, timeout=30)
    assert everyone.status_code == 403  # no operator key on this server


def test_a_5_mb_document_does_not_stall_the_event_loop(server):
    """Finding 3: a 5 MB document with ``explain`` took 9.35 s to get its 400, and /health
    waited 8.9 s meanwhile. Now the server's own loop watch logs no stall while it is refused,
    and /health keeps answering: within 3 s (a bound for the 9 s stall, not a measurement; a
    /health round trip takes milliseconds when the loop is free)."""
    stalls = _stats(server)["api_loop"]["stalls"]
    document = ("The committee reviewed the annual budget and the library's new wing. " * 80_000)
    assert len(document) >= 5_000_000
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Which?"}],
            "explain": {"documents": [document]}}
    latencies: list[float] = []
    done = threading.Event()

    def watch():
        with httpx.Client(timeout=30) as client:
            while not done.is_set():
                started = time.perf_counter()
                assert client.get(server + "/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        time.sleep(0.2)
        started = time.perf_counter()
        reply = http.post(server + "/v1/chat/completions", json=body, timeout=120)
        took = time.perf_counter() - started
        time.sleep(0.2)
    finally:
        done.set()
        watcher.join()
    assert reply.status_code == 400, reply.text[:300]
    assert "characters" in reply.json()["error"]["message"]
    assert max(latencies) <= 3.0, (max(latencies), took)
    assert _stats(server)["api_loop"]["stalls"] == stalls


@pytest.mark.parametrize("path", ["/v1/explain", "/v1/completions", "/v1/chat/completions"])
def test_parse_errors_are_openai_shaped(server, path):
    """Finding 5: a body that is not JSON got ``{"detail": "There was an error parsing the
    body"}``."""
    reply = http.post(server + path, content=b'{"model": "x", "prompt": ', timeout=30,
                      headers={"content-type": "application/json"})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400
    assert "not valid JSON" in error["message"]


def test_conflicting_explain_objects_are_refused(server):
    """Finding 5: a valid top-level ``explain`` with an invalid ``vllm_xargs.explain`` was
    accepted, the invalid one silently ignored."""
    reply = http.post(server + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "Hi", "max_tokens": 4, "explain": {"mode": "pa-lrp"},
        "vllm_xargs": {"explain": json.dumps({"mode": "cp-lrp"})}})
    assert reply.status_code == 400
    assert "given twice" in reply.json()["error"]["message"]


def test_every_plugin_route_honours_the_api_key(server):
    """Every route the plugin adds (enumerated from the plugin itself, so a new route is
    covered too) answers 401 without the key, or with a wrong one, like vLLM's own routes; the
    page and its static files hold no data and are served to anyone (they ask for the key)."""
    from vllm_pelrp.serving.api import PelrpEndpointPlugin
    from vllm_pelrp.serving.http import OpenAIErrorRoute

    app = FastAPI()
    PelrpEndpointPlugin().attach_router(app)
    routes = [(method, route.path) for route in app.routes
              if isinstance(route, OpenAIErrorRoute)  # the plugin's, not FastAPI's /docs
              for method in route.methods if method != "HEAD"]
    assert ("POST", "/v1/explain") in routes and ("GET", "/v1/explanations") in routes
    checked = 0
    with httpx.Client(timeout=60) as anonymous:
        for method, path in routes:
            url = server + path.replace("{explanation_id}", "expl-" + "0" * 32).replace(
                "{name}", "pelrp.js")
            if path.startswith("/pelrp"):
                assert anonymous.request(method, url).status_code == 200, path
                continue
            body = {} if method == "POST" else None
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                reply = anonymous.request(method, url, json=body, headers=headers)
                assert reply.status_code == 401, (method, path, reply.status_code)
            reply = anonymous.request(method, url, json=body, headers=AUTH)
            assert reply.status_code != 401, (method, path)
            checked += 1
    assert checked >= 6
