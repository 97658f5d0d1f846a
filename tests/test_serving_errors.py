"""Bad input on the plugin's routes, without a server (tests/_fake_engine.py): every error in
OpenAI's shape with a plain message that names the field, what was wrong and what is allowed;
strict types; one ``explain``; client-sent ``pelrp_*`` fields dropped; the cost cap and the
character bound applied before anything is generated or tokenized; an OpenAPI schema that says
what the server enforces. Each test names the finding of the hardening issue it covers."""

from __future__ import annotations

import json

import pytest

import vllm  # noqa: F401  (scripts/test.sh installs it)

from _fake_engine import make_app

# SmolLM2-135M's shape (the default tokenizer's model), for the work cap and the memory budget
SMOLLM2_SHAPE = {"kind": "rotary", "num_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
                 "num_heads": 9, "num_kv_heads": 3, "head_dim": 64, "vocab_size": 49152,
                 "dtype_bytes": 4, "row_chunk": 4}
INFO = {"error": None, "bytes_per_token": 10, "cap_bytes": 10**9, "max_model_len": 2048,
        "vocab_size": 49152, "explain_shape": SMOLLM2_SHAPE, "memory_budget_bytes": 2**30,
        "memory_budget_source": "test"}


@pytest.fixture
def app():
    return make_app(INFO)


def _error(reply, status=400):
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == status
    return body["error"]


@pytest.mark.parametrize("path", ["/v1/explain", "/v1/completions"])
def test_body_parse_errors_are_openai_shaped(app, path):
    """Finding 5: a body that is not JSON got ``{"detail": "There was an error parsing the
    body"}``; a body of the wrong type got FastAPI's detail list."""
    client, _ = app
    for content in (b"{not json", b"[1, 2]", b'"text"', b"E }X\xff\xfe"):  # the last: not UTF-8
        error = _error(client.post(path, content=content,
                                   headers={"content-type": "application/json"}))
        assert "detail" not in error["message"] and "{'type'" not in error["message"]
    error = _error(client.post(path, content=b"{not json",
                               headers={"content-type": "application/json"}))
    assert "not valid JSON" in error["message"]


@pytest.mark.parametrize("explain, words", [
    ({"top_k": "3"}, ["explain.top_k", "valid integer", "got '3'", "1 to 4096"]),
    ({"per_layer": "yes"}, ["explain.per_layer", "boolean", "true or false"]),
    ({"grounding_threshold": float("nan")}, ["explain.grounding_threshold", "finite",
                                             "from 0 to 1"]),
    ({"grounding_threshold": 2}, ["explain.grounding_threshold", "less than or equal to 1"]),
    ({"target": {"span": [0, "2"]}}, ["explain.target", "{'span': [i, j]}"]),
    ({"documents": ["  "]}, ["explain.documents[0]", "non-space text"]),
    ({"documents": []}, ["explain.documents", "at least 1"]),
    ({"sources": [{"chars": ["0", 4]}]}, ["explain.sources[0].chars[0]", "valid integer"]),
    ({"mode": "magic"}, ["explain.mode", "unknown mode 'magic'", "'pa-lrp'"]),
    ({"colour": "red"}, ["explain.colour", "unknown field", "allowed fields: mode, target"]),
])
def test_explain_fields_are_strict_and_their_errors_plain(app, explain, words):
    """Finding 5: ``top_k: "3"`` was taken as 3; NaN said "less than or equal to 1"; messages
    came wrapped in a Python repr."""
    client, engine = app
    body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 4, "explain": explain})
    error = _error(client.post("/v1/completions", content=body,  # NaN as JSON's NaN literal
                               headers={"content-type": "application/json"}))
    for word in words:
        assert word in error["message"], error["message"]
    assert "{'type'" not in error["message"] and "validation error" not in error["message"]
    assert error["param"].startswith("explain")
    assert engine.calls == ["pelrp_setup"]  # refused before anything was generated


def test_a_body_that_breaks_vllms_own_validators_is_a_400(app):
    """Found by the fuzzing: ``structured_outputs: []`` made a validator of vLLM's
    CompletionRequest raise AttributeError, answered 500 (plain vLLM does the same)."""
    client, _ = app
    for body in ({"model": False, "prompt": True, "structured_outputs": []},
                 {"model": "m", "prompt": "hi", "structured_outputs": [None]}):
        error = _error(client.post("/v1/completions", json=body))
        assert "malformed" in error["message"]


def test_explain_given_twice_is_refused_unless_the_same(app):
    """Finding 5: a valid top-level ``explain`` with an invalid ``vllm_xargs.explain`` was
    accepted and the invalid one silently ignored."""
    client, _ = app
    body = {"model": "m", "prompt": "hi", "max_tokens": 4, "explain": {"mode": "pa-lrp"}}
    error = _error(client.post("/v1/completions", json={
        **body, "vllm_xargs": {"explain": '{"mode": "nonsense"}'}}))
    assert "vllm_xargs.explain.mode" in error["message"]
    error = _error(client.post("/v1/completions", json={
        **body, "vllm_xargs": {"explain": '{"mode": "cp-lrp"}'}}))
    assert "given twice" in error["message"]


def test_client_sent_pelrp_fields_never_reach_the_engine(app):
    """Finding 1: a plain request carrying ``vllm_xargs.pelrp_key`` was recorded."""
    client, engine = app
    reply = client.post("/v1/completions", json={
        "model": "m", "prompt": "hi", "max_tokens": 4,
        "vllm_xargs": {"pelrp_key": "anything", "pelrp_other": 1, "mine": "kept"}})
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == "ok"
    generated = client.app.state.generated[-1]
    assert generated.vllm_xargs == {"mine": "kept"}


def test_explain_endpoint_messages_and_prompt_rules(app):
    """Finding 5: a message without ``role`` said "'dict object' has no attribute 'role'"; the
    schema accepted prompt with messages, or neither."""
    client, _ = app
    error = _error(client.post("/v1/explain", json={"messages": [{"content": "hi"}],
                                                    "completion": "x"}))
    assert "messages[0].role" in error["message"] and "'user'" in error["message"]
    error = _error(client.post("/v1/explain", json={
        "prompt": "a", "messages": [{"role": "user", "content": "hi"}], "completion": "x"}))
    assert "exactly one of prompt or messages" in error["message"]
    error = _error(client.post("/v1/explain", json={"completion": "x"}))
    assert "exactly one of prompt or messages" in error["message"]
    error = _error(client.post("/v1/explain", json={"prompt": "a", "target": "per_token"}))
    assert "needs a completion" in error["message"]
    error = _error(client.post("/v1/explain", json={"prompt": "a", "target": "sideways",
                                                    "completion": "b"}))
    assert "'next', 'completion'" in error["message"]


def test_cost_cap_and_per_token_rows_are_refused_before_generation(monkeypatch):
    """Finding 4: ``per_token`` over the row cap was refused only after generating, and no
    setting bounded an explanation's cost."""
    monkeypatch.setenv("VLLM_PELRP_MAX_EXPLAIN_GFLOP", "100")
    client, engine = make_app(INFO)
    error = _error(client.post("/v1/completions", json={
        "model": "m", "prompt": "hi", "max_tokens": 100, "explain": {"target": "per_token"}}))
    assert "at most 64" in error["message"] and "max_tokens=100" in error["message"]
    error = _error(client.post("/v1/completions", json={
        "model": "m", "prompt": "hi", "max_tokens": 40, "n": 2,
        "explain": {"target": "per_token"}}))
    # 40 rows x (1 prompt token + 40) tokens, for each of 2 choices, on SmolLM2's shape
    assert "up to 726 GFLOP" in error["message"], error["message"]
    assert "40 x 41, 40 x 41" in error["message"]
    assert "cap of 100 GFLOP" in error["message"]
    assert "VLLM_PELRP_MAX_EXPLAIN_GFLOP" in error["message"]
    assert engine.calls == ["pelrp_setup"]
    # an explanation whose working set can never fit the memory budget: refused up front too
    client, engine = make_app(dict(INFO, memory_budget_bytes=2**20))
    error = _error(client.post("/v1/completions", json={
        "model": "m", "prompt": "hi", "max_tokens": 40, "explain": {"target": "completion"}}))
    assert "memory budget of 1.0 MiB" in error["message"], error["message"]
    assert engine.calls == ["pelrp_setup"]
    assert client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 40,
                                                "n": 2}).status_code == 200  # plain: untouched


class _TokenizerSpy:
    """Stands in for a fast tokenizer's backend (``tokenizer._tokenizer``): records the length of
    every text it is asked to encode, then encodes it. Copies (a tokenizer per thread) share the
    record."""

    def __init__(self, inner, sizes: list[int]) -> None:
        self.inner, self.sizes = inner, sizes

    def __getattr__(self, name):
        if name in ("inner", "sizes") or name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self.inner, name)
        if name not in ("encode", "encode_batch", "encode_batch_fast"):
            return attr

        def encode(*args, **kwargs):
            first = args[0] if args else next(iter(kwargs.values()), "")
            for text in first if isinstance(first, list) else [first]:
                self.sizes.append(len(text) if isinstance(text, str) else len(str(text)))
            return attr(*args, **kwargs)

        return encode

    def __deepcopy__(self, memo):
        import copy

        return _TokenizerSpy(copy.deepcopy(self.inner, memo), self.sizes)


def test_oversized_input_is_refused_by_its_length_before_tokenizing():
    """Finding 3: a 5 MB document was tokenized on the event loop (9 s) before the length
    check. Now the character count refuses it before any of it reaches the tokenizer."""
    from _fake_engine import default_tokenizer

    tokenizer = default_tokenizer()
    sizes: list[int] = []
    tokenizer._tokenizer = _TokenizerSpy(tokenizer._tokenizer, sizes)
    client, _ = make_app(INFO, tokenizer=tokenizer)
    error = _error(client.post("/v1/completions", json={
        "model": "m", "prompt": "Which?", "max_tokens": 4,
        "explain": {"documents": ["lorem ipsum " * 400_000]}}))
    assert "characters" in error["message"] and "max_model_len" in error["message"]
    error = _error(client.post("/v1/explain", json={
        "prompt": "x" * 5_000_000, "completion": "y"}))
    assert "5,000,001 characters" in error["message"]
    assert max(sizes, default=0) < 100_000, sorted(sizes)[-3:]
    # the spy sees what is tokenized: a request within the limits reaches it (and then the
    # stand-in engine, which has no worker to explain it: whatever it answers is not the point)
    from fastapi.testclient import TestClient

    TestClient(client.app, raise_server_exceptions=False).post("/v1/explain", json={
        "prompt": "Which package prints calendars?", "completion": "gcal"})
    assert sizes


def test_openapi_schema_states_what_is_enforced(app):
    """Finding 5: the schema accepted what the server refused (empty documents, prompt with
    messages or neither) and did not document 404s."""
    client, _ = app
    plugin_app = client.app
    from vllm_pelrp.serving.api import PelrpEndpointPlugin

    plugin = PelrpEndpointPlugin()
    plugin.app = plugin_app
    plugin.build_openapi_schema()
    schema = client.get("/openapi.json").json()
    request = schema["components"]["schemas"]["ExplainRequest"]
    assert {"required": ["prompt"], "not": {"required": ["messages"]}} in request["oneOf"]
    ids = [b for b in request["properties"]["prompt"]["anyOf"] if b.get("type") == "array"][0]
    assert ids["items"]["maximum"] == INFO["vocab_size"] - 1 and ids["items"]["minimum"] == 0
    options = schema["components"]["schemas"]["ExplainOptions"]
    documents = [b for b in options["properties"]["documents"]["anyOf"] if b.get("type")][0]
    assert documents["minItems"] == 1 and documents["items"]["pattern"] == r"\S"
    paths = schema["paths"]
    assert "404" in paths["/v1/explanations/{explanation_id}"]["get"]["responses"]
    for path in ("/v1/explain", "/v1/completions", "/v1/explanations"):
        operation = next(iter(paths[path].values()))
        assert "400" in operation["responses"] and "422" not in operation["responses"], path
