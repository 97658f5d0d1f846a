"""Grounding through the server: ``explain.documents`` / ``explain.sources`` from the OpenAI SDK
(``extra_body``), ``POST /v1/explain``, streaming, the low-grounding header, and 4xx for sources
that cannot be placed. The server is the shared real ``pelrp serve`` of tests/_live_server.py
(default model, float32); its explanations are compared with the offline ``Explainer`` on the
same prompt and completion (the recorded residual stream agrees with the engine's own forward to
~1e-6 in float32, so shares agree to 1e-3)."""

from __future__ import annotations

import json

import openai
import pytest

from _live_server import API_KEY, MODEL, http, shared_server
from vllm_pelrp.grounding import render_documents

pytestmark = pytest.mark.slow

DOCUMENTS = [
    "gcal: a program for calculating and printing calendars. Gcal displays calendar sheets and "
    "lists holidays.",
    "htop: interactive processes viewer. Htop is an ncurses-based process viewer similar to top.",
]
QUESTION = "Which package prints calendars?"
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    return shared_server(request.config, tmp_path_factory)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, timeout=600)


def _offline(smollm2, explanation: dict, **grounding) -> "Explanation":  # noqa: F821
    ids = [t["id"] for t in explanation["tokens"]]
    prompt_length = explanation["prompt_length"]
    return smollm2.explain(input_ids=ids[:prompt_length], completion=ids[prompt_length:],
                           target="completion", **grounding)


def _check_against_offline(served: dict, offline) -> None:
    grounding = served["grounding"]
    assert grounding["grounding_score"] == pytest.approx(offline.grounding.grounding_score,
                                                         abs=TOLERANCE)
    for got, want in zip(grounding["sources"], offline.grounding.sources, strict=True):
        assert (got["token_start"], got["token_end"]) == (want.token_start, want.token_end)
        assert got["share"] == pytest.approx(want.share, abs=TOLERANCE)
    assert [s["span"] for s in grounding["sentences"]] == [
        list(s.span) for s in offline.grounding.sentences]
    for got, want in zip(grounding["sentences"], offline.grounding.sentences):
        assert got["source_shares"] == pytest.approx(want.source_shares, abs=TOLERANCE)
        assert got["supporting_sources"][:1] == want.supporting_sources[:1]


def test_chat_documents_from_the_openai_sdk(client, smollm2):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=24,
        temperature=0, extra_body={"explain": {"documents": DOCUMENTS}})
    response = raw.parse()
    explanation = response.choices[0].model_extra["explanation"]
    grounding = explanation["grounding"]
    # the documents went into the last user message with the documented template
    assert render_documents(QUESTION, DOCUMENTS)[0] in explanation["text"]
    assert [s["name"] for s in grounding["sources"]] == ["document 1", "document 2"]
    for source, document in zip(grounding["sources"], DOCUMENTS):
        assert explanation["text"][source["char_start"]:source["char_end"]] == document
    total = sum(s["share"] for s in grounding["sources"]) + grounding["instruction_share"] \
        + grounding["positional_share"]
    assert total == pytest.approx(1.0, abs=1e-6)
    assert grounding["threshold"] == 0.3
    assert grounding["sentences"], "the completion has at least one sentence"
    assert raw.headers["x-pelrp-low-grounding"] == str(grounding["low_grounding"]).lower()
    _check_against_offline(explanation, _offline(smollm2, explanation, documents=None, sources=[
        {"text": d} for d in DOCUMENTS]))


def test_completions_documents_threshold_and_header(server):
    body = {"model": MODEL, "prompt": QUESTION, "max_tokens": 12, "temperature": 0,
            "explain": {"documents": DOCUMENTS, "grounding_threshold": 1.0, "sentences": False}}
    low = http.post(server + "/v1/completions", json=body, timeout=600)
    assert low.status_code == 200, low.text
    explanation = low.json()["choices"][0]["explanation"]
    assert explanation["text"].startswith(render_documents(QUESTION, DOCUMENTS)[0])
    assert explanation["grounding"]["low_grounding"] is True
    assert explanation["grounding"]["sentences"] == []
    assert low.headers["x-pelrp-low-grounding"] == "true"
    body["explain"]["grounding_threshold"] = 0.0
    fine = http.post(server + "/v1/completions", json=body, timeout=600)
    assert fine.headers["x-pelrp-low-grounding"] == "false"
    plain = http.post(server + "/v1/completions", timeout=600, json={
        "model": MODEL, "prompt": QUESTION, "max_tokens": 4, "explain": {}})
    assert "x-pelrp-low-grounding" not in plain.headers
    assert plain.json()["choices"][0]["explanation"]["grounding"] is None


def test_explain_endpoint_with_message_sources(server, smollm2):
    messages = [{"role": "system", "content": "Notes: " + DOCUMENTS[0]},
                {"role": "user", "content": QUESTION}]
    answer = "The gcal package prints calendars."
    response = http.post(server + "/v1/explain", timeout=600, json={
        "messages": messages, "completion": answer,
        "sources": [{"message": 0, "name": "notes"}, {"text": "calendars?"}]})
    assert response.status_code == 200, response.text
    explanation = response.json()
    names = [s["name"] for s in explanation["grounding"]["sources"]]
    assert names == ["notes", "span 2"]
    assert response.headers["x-pelrp-low-grounding"] in ("true", "false")
    offline = smollm2.explain(messages=messages, completion=answer, target="completion",
                              sources=[{"message": 0, "name": "notes"}, {"text": "calendars?"}])
    _check_against_offline(explanation, offline)
    compact = http.post(server + "/v1/explain", timeout=600, json={
        "prompt": QUESTION, "completion": " gcal", "documents": DOCUMENTS, "top_k": 3,
        "target": "next"})
    assert compact.status_code == 200, compact.text
    assert compact.json()["grounding"]["sources"][1]["name"] == "document 2"
    assert len(compact.json()["top_tokens"]) == 3


def test_streaming_carries_grounding_in_the_final_chunk(server):
    chunks = []
    with http.stream("POST", server + "/v1/chat/completions", timeout=600, json={
            "model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 8, "temperature": 0, "stream": True,
            "explain": {"documents": DOCUMENTS, "sentences": False}}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    final = chunks[-1]["choices"][0]["explanation"]
    assert [s["name"] for s in final["grounding"]["sources"]] == ["document 1", "document 2"]


@pytest.mark.parametrize("path, body, words", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}],
                              "explain": {"sources": [{"message": 5}]}},
     "message 5 does not exist; the request has 1 messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}],
                              "explain": {"sources": [{"text": "zebra"}]}},
     "does not occur in the prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}],
                              "explain": {"sources": [{"name": "x"}]}},
     "a source needs message, text or chars"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}],
                              "explain": {"documents": ["ok", " "]}}, "document 2 is empty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}],
                              "explain": {"documents": DOCUMENTS, "grounding_threshold": 2}},
     "grounding_threshold"),
    ("/v1/completions", {"prompt": [1, 2, 3], "explain": {"documents": DOCUMENTS}},
     "the prompt must be text"),
    ("/v1/completions", {"prompt": QUESTION, "explain": {"sources": [{"message": 0}]}},
     "'message' sources need /v1/chat/completions"),
    ("/v1/completions", {"prompt": QUESTION, "explain": {"sources": [{"chars": [0, 5000]}]}},
     "reach beyond the prompt text"),
    ("/v1/explain", {"prompt": QUESTION, "completion": " gcal", "sources": [{"message": 0}]},
     "'message' needs messages"),
    ("/v1/explain", {"prompt": [1, 2], "completion": " gcal", "documents": DOCUMENTS},
     "with prompt token ids"),
])
def test_bad_sources_get_a_clear_400(server, path, body, words):
    limit = {} if path == "/v1/explain" else {"max_tokens": 4}
    response = http.post(server + path, json={"model": MODEL, **limit, **body}, timeout=600)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]["message"]
    assert http.get(server + "/v1/models", timeout=10).status_code == 200
