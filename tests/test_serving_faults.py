"""Five faults of the serving side that stayed silent (issue 21), each held by a test that failed
on the code before its fix:

1. a choice explained from another choice's recorded activations (``worker._pick``'s fallback);
2. the plugin tokenizing with vLLM's own tokenizer object on its threads ("Already borrowed");
3. every explanation made under an API key listed to whoever holds the key (a gateway's users);
4. worker and route exception text sent to clients;
5. the recording-key secret returned by ``pelrp_setup``, which vLLM's dev mode exposes.

Unit level: the tiny models of ``tiny_models.py`` on the real worker extension
(``_fake_engine.py``), the routes on a FastAPI app, no vLLM engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from types import SimpleNamespace

import pytest
import torch
from fastapi.responses import JSONResponse

import vllm  # noqa: F401  (scripts/test.sh installs it)

from vllm_pelrp import Explainer, pipeline
from vllm_pelrp.serving import webview, worker as worker_module
from vllm_pelrp.serving.keys import sign_key
from vllm_pelrp.serving.recorder import Recording
from vllm_pelrp.serving.service import ExplainService
from vllm_pelrp.serving.worker import PelrpWorkerExtension, _pick, run_job

from _fake_engine import (FakeEngine, FakeWorker, default_tokenizer, make_app, over_msgpack,
                          recorded)
from tiny_models import tiny_model, tiny_tokenizer

PROMPT = "w5 w6 w7 w8 w9 w10 w11 w12"
PROMPT_IDS = [5, 6, 7, 8, 9, 10, 11, 12]
CHOICE_A = [30, 31, 32, 33]
CHOICE_B = [40, 41, 42, 43]  # the second choice of an n=2 request: same prompt, other tokens
INFO = {"error": None, "bytes_per_token": 10, "cap_bytes": 10**9, "max_model_len": 512,
        "vocab_size": 101}
OPERATOR_KEY = "operator-secret"


@pytest.fixture(scope="module")
def tiny():
    return Explainer(tiny_model("llama"), tiny_tokenizer(), name="tiny")


def _recording(weights, key: str, completion: list[int]) -> Recording:
    """A choice's recording as the op leaves it: every position but the last token."""
    return recorded(weights, key, PROMPT_IDS, completion, req_id=f"r-{completion[0]}")


# ---- 1. a recording that does not match is never used ------------------------------------------
def test_a_choice_is_never_picked_another_choices_recording(tiny):
    other = _recording(tiny.weights, "k", CHOICE_A)
    assert _pick([other], PROMPT_IDS + CHOICE_B, len(PROMPT_IDS)) is None
    own = _recording(tiny.weights, "k", CHOICE_B)
    assert _pick([other, own], PROMPT_IDS + CHOICE_B, len(PROMPT_IDS)) is own


def test_a_choice_without_its_recording_is_explained_from_its_own_ids(tiny):
    """n=2: choice A's recording is there, choice B's is not. B's explanation is B's, equal to
    the offline pipeline's, number for number (before: A's activations, silently)."""
    plan = pipeline.plan(PROMPT_IDS, CHOICE_B, "completion", tokenizer=tiny.tokenizer,
                         vocab_size=tiny.weights.spec.vocab_size)
    job = pipeline.job(plan, "k")
    result = run_job(tiny.weights, job, [_recording(tiny.weights, "k", CHOICE_A)])
    assert result.recomputed_rows == len(PROMPT_IDS + CHOICE_B)  # a forward of B's own ids
    served = pipeline.assemble(plan, result, model="tiny").model_dump(mode="json")
    offline = tiny.explain(input_ids=PROMPT_IDS, completion=CHOICE_B,
                           target="completion").model_dump(mode="json")
    served.pop("id", None)
    offline.pop("id", None)
    assert served == offline


def test_a_key_with_nothing_recorded_still_fails_the_choice(tiny):
    plan = pipeline.plan(PROMPT_IDS, CHOICE_B, "completion", tokenizer=tiny.tokenizer,
                         vocab_size=tiny.weights.spec.vocab_size)
    from vllm_pelrp.serving.recorder import RecordingError

    with pytest.raises(RecordingError, match="no recorded activations"):
        run_job(tiny.weights, pipeline.job(plan, "k"), [])


# ---- 2. the plugin's tokenizer is its own, per thread ------------------------------------------
def test_the_plugin_tokenizes_beside_vllms_truncating_calls_without_already_borrowed():
    """vLLM's own calls (one thread: vLLM serialises them) truncate with its tokenizer object
    while the plugin tokenizes on its threads, with and without truncation. A fast tokenizer
    shared between them raised ``RuntimeError: Already borrowed``, or, silently, encoded one
    call under another's truncation setting (a plugin call without truncation came back cut:
    what this test saw on the code before the fix)."""
    tokenizer = default_tokenizer()
    assert tokenizer.is_fast
    service = ExplainService(FakeEngine(INFO), tokenizer, "m")
    text = "the quick brown fox jumps over the lazy dog " * 400
    full = len(tokenizer(text)["input_ids"])
    stop = threading.Event()
    vllm_errors: list[BaseException] = []

    def vllm_side() -> None:
        calls = 0
        while not stop.is_set():
            try:
                tokenizer(text, truncation=True, max_length=16 + calls % 97)
            except RuntimeError as error:
                vllm_errors.append(error)
            calls += 1

    def plugin_call(number: int) -> int:
        own = service.tokenizer  # read on the thread that tokenizes
        if number % 2:
            return len(own(text, truncation=True, max_length=8 + number % 50)["input_ids"])
        return len(own(text)["input_ids"])

    async def plugin_side() -> list:
        return await asyncio.gather(*(service.offload(plugin_call, n) for n in range(300)),
                                    return_exceptions=True)

    thread = threading.Thread(target=vllm_side)
    thread.start()
    try:
        lengths = asyncio.run(plugin_side())
    finally:
        stop.set()
        thread.join()
    failures = [x for x in lengths if isinstance(x, BaseException)] + vllm_errors
    assert not failures, f"{len(failures)} calls failed, e.g. {failures[0]!r}"
    assert lengths == [8 + n % 50 if n % 2 else full for n in range(300)]


def test_every_service_thread_has_its_tokenizer_copy_before_the_first_request():
    """Copying a tokenizer takes ~0.7 s on SmolLM2: made at setup, not on a client's request."""
    from vllm_pelrp.serving.service import API_THREADS

    service = ExplainService(FakeEngine(INFO), default_tokenizer(), "m")
    assert service.tokenizers.copies == 0
    asyncio.run(service.setup())
    assert service.tokenizers.copies == API_THREADS
    asyncio.run(service.offload(lambda: service.tokenizer("a b c")))
    assert service.tokenizers.copies == API_THREADS  # served by a thread's own copy


# ---- 3. explanation ids are capabilities; the end user is recorded -----------------------------
@pytest.fixture
def served(tiny, monkeypatch):
    monkeypatch.setenv("VLLM_PELRP_OPERATOR_KEY", OPERATOR_KEY)
    worker = FakeWorker(tiny.weights, CHOICE_A)
    client, engine = make_app(INFO, tokenizer=tiny.tokenizer, worker=worker, api_keys=True)
    return client, engine, worker


BEARER = {"Authorization": "Bearer gateway-key"}  # one key for every end user behind a gateway
OPERATOR = {**BEARER, "x-pelrp-operator-key": OPERATOR_KEY}


def _explain(client, user=None, **extra):
    body = {"prompt": PROMPT, "completion": CHOICE_A, **({"user": user} if user else {}), **extra}
    reply = client.post("/v1/explain", json=body, headers=BEARER)
    assert reply.status_code == 200, reply.text
    return reply.json()["id"]


def test_nobody_but_the_operator_lists_ids_they_did_not_name(served):
    client, _, _ = served
    alice = _explain(client)
    bob = _explain(client)
    # the same API key for both: listing without ids showed Alice every explanation of Bob's
    unnamed = client.get("/v1/explanations", headers=BEARER)
    assert unnamed.status_code == 400 and unnamed.json()["error"]["param"] == "ids"
    assert bob not in unnamed.text
    named = client.get("/v1/explanations", params={"ids": alice}, headers=BEARER).json()
    assert [item["id"] for item in named["data"]] == [alice]
    assert "user" not in named["data"][0]  # only the operator sees who asked
    assert client.get(f"/v1/explanations/{bob}", headers=BEARER).status_code == 200  # by its id
    everyone = client.get("/v1/explanations", params={"scope": "all"}, headers=OPERATOR).json()
    assert {item["id"] for item in everyone["data"]} >= {alice, bob}


def test_the_openai_user_field_is_recorded_and_the_operator_listing_filters_by_it(served):
    client, _, _ = served
    alice = _explain(client, user="alice")
    bob = _explain(client, user="bob")
    completion = client.post("/v1/completions", headers=BEARER, json={
        "model": "m", "prompt": PROMPT, "max_tokens": 4, "user": "alice", "explain": {}})
    assert completion.status_code == 200, completion.text
    alices_completion = completion.json()["choices"][0]["explanation"]["id"]
    listed = client.get("/v1/explanations", params={"user": "alice"}, headers=OPERATOR).json()
    assert [item["id"] for item in listed["data"]] == [alices_completion, alice]
    assert {item["user"] for item in listed["data"]} == {"alice"} and bob not in json.dumps(listed)
    refused = client.get("/v1/explanations", params={"user": "alice"}, headers=BEARER)
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "user"


def test_the_operator_listing_needs_the_operator_key(monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    monkeypatch.delenv("VLLM_PELRP_OPERATOR_KEY", raising=False)
    app = FastAPI()
    store = webview.RecentExplanations(capacity=4)
    webview.attach(app, store)
    store.add({"model": "m", "text": "x", "prompt_length": 0, "tokens": [
        {"index": 0, "id": 1, "text": "x", "start": 0, "end": 1, "role": "prompt"}]},
        None, "alice")
    client = TestClient(app)
    for params in ({"scope": "all"}, {"user": "alice"}):
        off = client.get("/v1/explanations", params=params)
        assert off.status_code == 403 and "VLLM_PELRP_OPERATOR_KEY" in off.json()["error"]["message"]
    assert store.summaries(everyone=True, user="alice")[0]["user"] == "alice"
    assert store.summaries(everyone=True, user="bob") == []
    assert store.summaries(None) == []  # no ids named: nothing listed


def test_the_web_view_lists_by_the_ids_it_remembers():
    script = (webview.STATIC_DIR / "pelrp.js").read_text()
    start = script.index("async function loadRecent")
    listing = script[start:script.index("\n  }\n", start)]
    calls = [line for line in listing.splitlines() if "/v1/explanations" in line]
    assert calls and all("ids=" in line for line in calls)


# ---- 4. internal failures: a generic message and an id for the client, the text in the log -----
SECRET_DETAIL = "tensor at /opt/private/weights.bin had shape (7, 9)"


def _break(monkeypatch, owner, name: str, error: Exception) -> None:
    """``owner.name`` raises ``error`` for the rest of the test."""
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(owner, name, broken)


def _post_explain(client, **fields):
    """POST /v1/explain of CHOICE_A after PROMPT (and ``fields``), with the API key."""
    return client.post("/v1/explain", json={"prompt": PROMPT, "completion": CHOICE_A, **fields},
                       headers=BEARER)


def test_a_worker_exception_does_not_reach_the_client_but_the_log(served, monkeypatch, caplog):
    client, _, _ = served
    _break(monkeypatch, worker_module, "compute", RuntimeError(SECRET_DETAIL))
    caplog.set_level(logging.ERROR, logger="vllm_pelrp")
    reply = _post_explain(client)
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert SECRET_DETAIL not in reply.text and "RuntimeError" not in reply.text
    assert error["type"] == "InternalServerError" and "error id err-" in error["message"]
    error_id = error["message"].split("error id ")[1].split(")")[0]
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and SECRET_DETAIL in logged[0].getMessage() and logged[0].exc_info

    reply = client.post("/v1/completions", headers=BEARER, json={
        "model": "m", "prompt": PROMPT, "max_tokens": 4, "explain": {}})
    assert reply.status_code == 200  # the choice carries the failure; generation succeeded
    message = reply.json()["choices"][0]["explanation"]["error"]
    assert SECRET_DETAIL not in reply.text and "error id err-" in message
    assert any(message.split("error id ")[1].split(")")[0] in r.getMessage()
               for r in caplog.records)


def test_an_api_side_exception_is_a_generic_500_with_its_text_in_the_log(served, monkeypatch,
                                                                          caplog):
    client, _, _ = served
    _break(monkeypatch, client.app.state.pelrp_service, "to_wire", KeyError(SECRET_DETAIL))
    caplog.set_level(logging.ERROR, logger="vllm_pelrp")
    reply = _post_explain(client)
    assert reply.status_code == 500 and SECRET_DETAIL not in reply.text
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert any(SECRET_DETAIL in r.getMessage() for r in caplog.records)


class _RefusingVllm(list):
    """``app.state.generated`` of ``make_app``: its stand-in for vLLM's handler appends each
    request here first, so this makes that handler raise what vLLM's own code raises."""

    def append(self, request) -> None:
        raise ValueError("vLLM's own refusal: this request is not one vLLM serves")


def test_what_vllms_own_handler_raises_is_answered_by_vllms_exception_handlers(tiny):
    """Requests are vLLM's, errors included: vLLM's app answers a ValueError of its handler and
    a VLLMError of its request models with a 400 (its exception handlers); the plugin's route
    class must not turn them into its generic 500. The fuzz run found both."""
    worker = FakeWorker(tiny.weights, CHOICE_A)
    client, _ = make_app(INFO, tokenizer=tiny.tokenizer, worker=worker, api_keys=True)

    async def vllms_handler(request, error):  # as vllm/entrypoints/serve/exception_handling
        return JSONResponse({"error": {"message": str(error), "type": "BadRequestError",
                                       "param": None, "code": 400}}, status_code=400)

    from vllm.entrypoints.serve.exception_handling.handlers.vllm_error import vllm_error_handler
    from vllm.exceptions import VLLMError

    client.app.add_exception_handler(ValueError, vllms_handler)
    client.app.add_exception_handler(VLLMError, vllm_error_handler)  # vLLM's own
    client.app.state.args = SimpleNamespace(log_error_stack=False)
    client.app.state.generated = _RefusingVllm()
    for explain in ({}, {"explain": {}}):
        reply = client.post("/v1/completions", headers=BEARER, json={
            "model": "m", "prompt": PROMPT, "max_tokens": 4, **explain})
        assert reply.status_code == 400, (explain, reply.text)
        assert "vLLM's own refusal" in reply.json()["error"]["message"]
        # vLLM's request model refuses the body while it is read (a VLLMValidationError)
        reply = client.post("/v1/completions", headers=BEARER, json={
            "model": "m", "max_tokens": 4, **explain})
        assert reply.status_code == 400, (explain, reply.text)
        assert reply.json()["error"]["param"] == "prompt", reply.text


def test_user_errors_stay_specific(served):
    client, _, _ = served
    reply = _post_explain(client, target={"span": [0, 9]})
    assert reply.status_code == 400 and "span [0, 9)" in reply.json()["error"]["message"]


# ---- 5. the recording-key secret never comes back from a worker --------------------------------
def _extension(api_processes: int = 1) -> PelrpWorkerExtension:
    """The worker extension as vLLM's worker holds it, enough for the calls a client could make
    through /collective_rpc (its model runner is missing: setup fails, and says so)."""
    extension = PelrpWorkerExtension()
    extension.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(
        _api_process_count=api_processes, tensor_parallel_size=1))
    return extension


def test_no_worker_method_returns_the_recording_key_secret():
    secret = "f" * 64
    extension = _extension()
    replies = [extension.pelrp_setup(secret), extension.pelrp_setup(None),
               extension.pelrp_stats(), extension.pelrp_poll("ticket"),
               extension.pelrp_release("key"), extension.pelrp_cancel("ticket")]
    for reply in replies:
        wire = json.dumps(over_msgpack(reply), default=str)
        assert secret not in wire
    assert replies[0]["key_accepted"] is True and replies[1]["key_accepted"] is False
    # the worker still verifies keys signed with it
    key = sign_key(secret, 1)
    assert worker_module._verified(extension._pelrp().key_secrets, key).key == key
    assert replies[0]["error"]  # no model runner here: setup failed, told without internals


def test_the_workers_keep_one_secret_per_api_process_and_refuse_later_ones():
    extension = _extension(api_processes=2)
    first, second, late = "a" * 64, "b" * 64, "c" * 64
    assert extension.pelrp_setup(first)["key_accepted"]
    assert extension.pelrp_setup(second)["key_accepted"]
    assert not extension.pelrp_setup(late)["key_accepted"]  # e.g. a dev-mode client's
    secrets = extension._pelrp().key_secrets
    assert worker_module._verified(secrets, sign_key(second, 1)) is not None
    assert worker_module._verified(secrets, sign_key(late, 1)) is None


def test_the_api_process_signs_with_its_own_secret_only_when_the_workers_took_it():
    class Engine(FakeEngine):
        def __init__(self, accepted):
            super().__init__(INFO)
            self.accepted = accepted
            self.proposed = []

        async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            self.proposed.append(args[0])
            return [dict(INFO, key_accepted=self.accepted)]

    engine = Engine(True)
    service = ExplainService(engine, default_tokenizer(), "m")
    asyncio.run(service.setup())
    assert service.key_secret == engine.proposed[0] and not service.info.get("error")
    assert "key_secret" not in service.info
    refused = ExplainService(Engine(False), default_tokenizer(), "m")
    asyncio.run(refused.setup())
    assert refused.key_secret is None and "refused" in refused.info["error"]


# ---- structure: one gathering of the served weights, right under tensor parallelism ------------
def test_every_embedding_table_is_gathered_over_the_ranks_before_its_padding_is_cut():
    """vocab 32, padded to 64 rows, over 2 ranks: each rank holds 32 rows, rank 1 only padding.
    The decoder's old gathering skipped a shard as long as the vocabulary and kept it."""
    from vllm_pelrp.serving.served_weights import fit_tables

    table = torch.arange(64.0).repeat_interleave(4).reshape(64, 4)  # rows 32..63: padding
    shards = [table[:32], table[32:]]
    spec = SimpleNamespace(vocab_size=32)
    for rank in (0, 1):
        raw = {"model.embed_tokens.weight": shards[rank], "lm_head.weight": shards[rank],
               "model.layers.0.mlp.down_proj.weight": torch.ones(4, 8)}
        fit_tables(raw, spec, 2, gather=lambda shard: torch.cat(shards))
        assert torch.equal(raw["model.embed_tokens.weight"], table[:32])
        assert torch.equal(raw["lm_head.weight"], table[:32])
        assert raw["model.layers.0.mlp.down_proj.weight"].shape == (4, 8)  # not a table
