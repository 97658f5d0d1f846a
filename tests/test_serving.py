"""The vLLM plugin end to end: a real ``pelrp serve`` on loopback (default model, float32,
chunked prefill forced to 32 tokens, prefix caching on), the OpenAI Python client with
``extra_body``, explanations compared with the offline engine.

Tolerance: the server's recorded residual stream comes from vLLM's kernels, the offline
reference from the engine's own forward; in float32 they agree to ~1e-6 relative. We require a
relative L2 error below 1e-4 on token, positional and combined relevance and on the target logit.

One plugin server (recording), one plain vLLM server (no plugin, for the "unchanged outputs"
check) and one eager plugin server with ``--explain-activations recompute`` (nothing of vLLM's
forward touched: the worker's own forward from the ids) start once for the module, in parallel.
Skipped when vLLM is not installed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vllm
import openai
import httpx
import torch

from vllm_pelrp import settings

from _live_server import STARTUP_SECONDS, stop_server, wait_until_serving

# two compiled servers start in the first test's setup (up to STARTUP_SECONDS): more than the
# default 900 s limit allows on a busy machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

MODEL = "SmolLM2-135M-Instruct"
CAP_MB = 96  # recorded-activation cap of the test server: 96 MiB = 1456 tokens of SmolLM2
REL_TOL = 1e-4
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "2048", "--max-num-batched-tokens", "32",
               "--max-num-seqs", "16", "--kv-cache-memory-bytes", str(256 << 20), "--block-size", "32",
               "--seed", "0"]
# A long shared prefix: the 8 concurrent requests hit the prefix cache on it.
PREFIX = ("You are a careful assistant. Read the following notes and answer briefly. "
          "Notes: the river flows north through three valleys; the old mill stands by the "
          "second bridge; the market opens on Tuesdays and Fridays; the library keeps maps of "
          "every valley; the ferry leaves at dawn and returns at dusk. The baker sells rye "
          "bread on Mondays, the smith shoes horses by the east gate, and the school bell "
          "rings at eight. Travellers should carry water, a lamp and a copy of the valley "
          "map, because the northern road is steep and the inn closes early in winter. ")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Both servers keep vLLM's torch.compile, the deployment default: the plugin records through
# its custom op. VLLM_PELRP_TEST_EAGER=1 runs both eager instead (the plugin then records with
# Python hooks; startup is faster).
COMPILED = not settings.get("VLLM_PELRP_TEST_EAGER")


def _start_command(args: list[str], log: Path, env_extra: dict | None = None):
    """``pelrp serve`` on a free loopback port with ``args``; returns (process, base URL)."""
    port = _free_port()
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    env.update(env_extra or {})
    command = [sys.executable, "-m", "vllm_pelrp.cli", "serve", "--port", str(port),
               *([] if COMPILED else ["--eager"]), *args]
    process = subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def _start(plugin: bool, log: Path) -> tuple[subprocess.Popen, str]:
    if plugin:
        return _start_command(["--record-cap-mb", str(CAP_MB), *SERVER_ARGS], log)
    from vllm_pelrp.default_model import ensure_default_checkpoint

    port = _free_port()
    env = dict(os.environ)
    env["VLLM_PLUGINS"] = ""  # no plugin at all: vLLM as shipped
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(ensure_default_checkpoint()), "--served-model-name", MODEL, "--host",
               "127.0.0.1", "--port", str(port), *([] if COMPILED else ["--enforce-eager"]),
               *SERVER_ARGS]
    process = subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from vllm_pelrp.default_model import ensure_default_checkpoint

    ensure_default_checkpoint()
    logs = tmp_path_factory.mktemp("servers")
    plugin, plugin_url = _start(True, logs / "plugin.log")
    plain, plain_url = _start(False, logs / "plain.log")
    # eager: its startup overlaps the compiled servers' compilation
    recompute, recompute_url = _start_command(
        ["--explain-activations", "recompute", *SERVER_ARGS, *(["--eager"] if COMPILED else [])],
        logs / "recompute.log")
    try:
        deadline = time.time() + STARTUP_SECONDS
        wait_until_serving(plugin, plugin_url, logs / "plugin.log", deadline)
        wait_until_serving(plain, plain_url, logs / "plain.log", deadline)
        wait_until_serving(recompute, recompute_url, logs / "recompute.log", deadline)
        yield {"plugin": plugin_url, "plain": plain_url, "recompute": recompute_url,
               "logs": logs}
    finally:
        stop_server(plugin)
        stop_server(plain)
        stop_server(recompute)


@pytest.fixture(scope="module")
def client(servers):
    return openai.OpenAI(base_url=servers["plugin"] + "/v1", api_key="none", timeout=300)


@pytest.fixture(scope="module")
def plain_client(servers):
    return openai.OpenAI(base_url=servers["plain"] + "/v1", api_key="none", timeout=300)


def _rel(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def assert_matches_offline(explainer, explanation: dict, target="completion", mode="pa-lrp"):
    ids = [t["id"] for t in explanation["tokens"]]
    length = explanation["prompt_length"]
    reference = explainer.explain(input_ids=ids[:length], completion=ids[length:], target=target,
                                  mode=mode, per_layer=bool(explanation.get(
                                      "positional_relevance_per_layer")))
    assert explanation["mode"] == mode
    for name in ("token_relevance", "positional_relevance", "combined_relevance"):
        assert _rel(explanation[name], getattr(reference, name)) < REL_TOL, name
    assert abs(explanation["target_logit"] - reference.target_logit) <= REL_TOL * abs(
        reference.target_logit)
    if reference.rows:
        assert len(explanation["rows"]) == len(reference.rows)
        for row, ref_row in zip(explanation["rows"], reference.rows):
            assert _rel(row["token_relevance"], ref_row.token_relevance) < REL_TOL
    return reference


def _stats(servers) -> dict:
    return httpx.get(servers["plugin"] + "/v1/explain/stats", timeout=30).json()


def _wait_freed(servers, seconds: float = 60) -> dict:
    deadline = time.time() + seconds
    while True:
        stats = _stats(servers)
        worker = stats["workers"][0]
        if (worker["bytes"] == 0 and stats["reserved_bytes"] == 0) or time.time() > deadline:
            return stats
        time.sleep(0.5)


# --- SDK call ---------------------------------------------------------------------------------
def test_completion_explanation_equals_offline(client, smollm2, servers):
    response = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
        extra_body={"explain": {"mode": "pa-lrp", "target": "completion", "per_layer": True}})
    choice = response.choices[0]
    explanation = choice.model_extra["explanation"]
    assert explanation["text"].endswith(choice.text)
    assert explanation["positional_relevance_per_layer"] is not None
    assert len(explanation["positional_relevance_per_layer"]) == 30
    assert "token_ids" not in (choice.model_extra or {}) or choice.model_extra["token_ids"] is None
    assert_matches_offline(smollm2, explanation)
    assert _wait_freed(servers)["workers"][0]["bytes"] == 0


def test_idle_engine_lends_its_core_to_the_backward(client, smollm2, servers):
    """With no request generating, the backward's layer recomputes run on the core vLLM keeps
    for its scheduler (where the worker has one OpenMP thread and a core is left over), and the
    explanation still equals the offline engine's."""
    stats = _stats(servers)
    spare = stats["info"]["spare_cores"]
    before = stats["workers"][0]
    response = client.completions.create(
        model=MODEL, prompt="A short story about a lighthouse keeper:", max_tokens=12,
        temperature=0, extra_body={"explain": {"mode": "pa-lrp"}})
    assert_matches_offline(smollm2, response.choices[0].model_extra["explanation"])
    after = _stats(servers)["workers"][0]
    offloaded = after["recomputes_on_spare_cores"] - before["recomputes_on_spare_cores"]
    inline = after["recomputes_inline"] - before["recomputes_inline"]
    if spare:
        assert offloaded + inline == 29  # every layer below the last (30 layers)
        assert offloaded > 0, (offloaded, inline)
    else:
        assert offloaded == inline == 0


def test_chat_per_token_via_vllm_xargs(client, smollm2):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a primary color."}],
        max_tokens=5, temperature=0,
        extra_body={"vllm_xargs": {"explain": {"mode": "attnlrp", "target": "per_token"}}})
    explanation = response.choices[0].model_extra["explanation"]
    assert len(explanation["rows"]) == len(explanation["tokens"]) - explanation["prompt_length"]
    assert_matches_offline(smollm2, explanation, target="per_token", mode="attnlrp")


def test_request_without_explain_is_unchanged(client, plain_client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    ours, plain = client.completions.create(**kwargs), plain_client.completions.create(**kwargs)
    assert ours.choices[0].text == plain.choices[0].text
    assert "explanation" not in (ours.choices[0].model_extra or {})


# --- concurrency, chunked prefill, prefix cache ----------------------------------------------
def test_concurrent_mixed_requests_share_a_cached_prefix(client, plain_client, smollm2, servers):
    questions = ["Where is the mill?", "When does the market open?", "What does the library keep?",
                 "When does the ferry leave?", "Which way does the river flow?",
                 "How many valleys are there?", "What stands by the bridge?", "Name a weekday."]
    client.completions.create(model=MODEL, prompt=PREFIX + "Summary:", max_tokens=1,
                              temperature=0)  # fills the prefix cache
    before = _stats(servers)["workers"][0]["recomputed_rows"]
    explain = [{"mode": "pa-lrp"}, {"mode": "cp-lrp"}, {"mode": "attnlrp"},
               {"mode": "pa-lrp", "target": {"span": [1, 4]}}]

    def call(i):
        extra = {"explain": explain[i // 2]} if i % 2 == 0 else {}
        return client.completions.create(model=MODEL, prompt=PREFIX + "Q: " + questions[i] + " A:",
                                         max_tokens=10, temperature=0, extra_body=extra)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(8)))
    # the prefix-cache hits skipped rows that the worker recomputed
    assert _stats(servers)["workers"][0]["recomputed_rows"] > before
    for i, response in enumerate(responses):
        choice = response.choices[0]
        if i % 2:
            plain = plain_client.completions.create(
                model=MODEL, prompt=PREFIX + "Q: " + questions[i] + " A:", max_tokens=10,
                temperature=0)
            assert choice.text == plain.choices[0].text
            assert "explanation" not in (choice.model_extra or {})
            continue
        explanation = choice.model_extra["explanation"]
        # its own tokens, nobody else's
        assert explanation["text"] == PREFIX + "Q: " + questions[i] + " A:" + choice.text
        options = explain[i // 2]
        target = options.get("target", "completion")
        assert_matches_offline(smollm2, explanation, target=target, mode=options["mode"])
    assert _wait_freed(servers)["workers"][0]["bytes"] == 0


# --- streaming, n=2, /v1/explain --------------------------------------------------------------
def test_streaming_explanation_in_final_chunk(client, smollm2):
    stream = client.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=6,
                                       temperature=0, stream=True,
                                       extra_body={"explain": {"top_k": 3}})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    last = chunks[-1].choices[0].model_extra["explanation"]
    assert all(not (c.choices and c.choices[0].model_extra.get("explanation")) for c in chunks[:-1])
    assert len(last["top_tokens"]) == 3 and last["num_tokens"] > 5
    full = client.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=6,
                                     temperature=0, extra_body={"explain": {}})
    assert full.choices[0].text == text
    reference = full.choices[0].model_extra["explanation"]
    assert abs(last["target_logit"] - reference["target_logit"]) < 1e-3

    chat = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
        temperature=0, stream=True, extra_body={"explain": {"mode": "cp-lrp"}}))
    final = chat[-1].choices[0]
    assert final.delta.content in (None, "") and final.model_extra["explanation"]["mode"] == "cp-lrp"
    text = "".join(c.choices[0].delta.content or "" for c in chat[:-1] if c.choices)
    assert final.model_extra["explanation"]["text"].endswith(text)
    assert_matches_offline(smollm2, final.model_extra["explanation"], mode="cp-lrp")


def test_n2_one_explanation_per_choice(client, smollm2):
    response = client.completions.create(model=MODEL, prompt="My favourite fruit is", n=2,
                                         max_tokens=6, temperature=1.0, seed=7,
                                         extra_body={"explain": {"mode": "pa-lrp"}})
    assert len(response.choices) == 2
    for choice in response.choices:
        explanation = choice.model_extra["explanation"]
        assert explanation["text"].endswith(choice.text)
        assert_matches_offline(smollm2, explanation)


def test_explain_endpoint_without_generation(servers, smollm2):
    reply = httpx.post(servers["plugin"] + "/v1/explain", timeout=300, json={
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "completion": "Paris.", "mode": "pa-lrp", "target": "completion"})
    assert reply.status_code == 200, reply.text
    explanation = reply.json()
    assert_matches_offline(smollm2, explanation)
    reply = httpx.post(servers["plugin"] + "/v1/explain", timeout=300,
                       json={"prompt": "The capital of France is", "target": "next"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["target"]["kind"] == "next"


def test_openapi_documents_the_new_fields(servers):
    schema = httpx.get(servers["plugin"] + "/openapi.json", timeout=30).json()
    assert "/v1/explain" in schema["paths"]
    text = json.dumps(schema)
    for name in ("ExplainOptions", "ExplainRequest", "CompactExplanation", "per_layer", "top_k"):
        assert name in text


# --- bad inputs: clear 4xx, server stays up -----------------------------------------------------
@pytest.mark.parametrize("body, status, words", [
    ({"explain": {"mode": "lrp-magic"}}, 400, "unknown mode"),
    ({"explain": {"target": {"span": [2, 40]}}}, 400, "out of range"),
    ({"explain": {"target": "sideways"}}, 400, "target"),
    ({"explain": {}, "max_tokens": 1800}, 400, "cap"),
    ({"explain": {"target": "per_token"}, "max_tokens": 100}, 400, "at most 64"),  # not generated
    ({"explain": {"top_k": "3"}}, 400, "explain.top_k"),
    ({"vllm_xargs": {"explain": "{not json"}}, 400, "JSON"),
])
def test_bad_inputs_get_4xx(servers, body, status, words):
    request = {"model": MODEL, "prompt": "Hi there", "max_tokens": 8, **body}
    reply = httpx.post(servers["plugin"] + "/v1/completions", json=request, timeout=120)
    assert reply.status_code == status, reply.text
    assert words.lower() in reply.json()["error"]["message"].lower()
    ok = httpx.post(servers["plugin"] + "/v1/completions", timeout=120,
                    json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_span_beyond_a_short_completion(servers):
    # max_tokens allows the span, but generation stops early at EOS / stop: 400 afterwards
    reply = httpx.post(servers["plugin"] + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": "Say yes:", "max_tokens": 8, "stop": [" ", "\n", "."],
        "explain": {"target": {"span": [6, 8]}}})
    # greedy and deterministic: the default model stops well before 8 tokens here
    assert reply.status_code == 400 and "out of range" in reply.json()["error"]["message"]


# --- client disconnect frees the recording -------------------------------------------------------
def test_client_disconnect_frees_recorded_activations(servers):
    body = {"model": MODEL, "prompt": "Write a long story about a dragon.", "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True, "explain": {}}
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", servers["plugin"] + "/v1/completions", json=body) as reply:
            lines = reply.iter_lines()
            for _ in range(6):
                next(lines)
            during = _stats(servers)
            assert during["workers"][0]["bytes"] > 0  # rows are being recorded
    after = _wait_freed(servers)
    assert after["workers"][0]["bytes"] == 0 and after["reserved_bytes"] == 0

    # non-streaming: the client times out mid-generation
    body.update(stream=False)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(servers["plugin"] + "/v1/completions", json=body, timeout=3)
    after = _wait_freed(servers)
    assert after["workers"][0]["bytes"] == 0 and after["reserved_bytes"] == 0


# --- --explain-activations recompute: nothing of vLLM's forward touched ------------------------
def test_recompute_mode_equals_offline_with_a_shared_prefix_and_n2(servers, plain_client,
                                                                  smollm2):
    """The recompute server records nothing (no pool, no op in the model) and explains from the
    ids: concurrent requests sharing a cached prefix, a chat request and n=2 all equal the
    offline engine, and plain requests give vLLM's own outputs."""
    client = openai.OpenAI(base_url=servers["recompute"] + "/v1", api_key="none", timeout=300)
    stats = httpx.get(servers["recompute"] + "/v1/explain/stats", timeout=30).json()
    assert stats["info"]["activations"] == "recompute" and stats["info"]["cap_bytes"] == 0
    questions = ["Where is the mill?", "When does the market open?", "Name a weekday.",
                 "When does the ferry leave?"]
    client.completions.create(model=MODEL, prompt=PREFIX + "Summary:", max_tokens=1,
                              temperature=0)  # fills the prefix cache

    def call(i):
        extra = {"explain": {"mode": "pa-lrp"}} if i != 2 else {}
        return client.completions.create(model=MODEL, prompt=PREFIX + "Q: " + questions[i] + " A:",
                                         max_tokens=8, temperature=0, extra_body=extra)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(call, range(4)))
    for i, response in enumerate(responses):
        choice = response.choices[0]
        if i == 2:
            plain = plain_client.completions.create(
                model=MODEL, prompt=PREFIX + "Q: " + questions[i] + " A:", max_tokens=8,
                temperature=0)
            assert choice.text == plain.choices[0].text
            continue
        explanation = choice.model_extra["explanation"]
        assert explanation["text"] == PREFIX + "Q: " + questions[i] + " A:" + choice.text
        assert_matches_offline(smollm2, explanation)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a primary color."}],
        max_tokens=5, temperature=0, extra_body={"explain": {"target": "per_token"}})
    assert_matches_offline(smollm2, chat.choices[0].model_extra["explanation"],
                           target="per_token")
    both = client.completions.create(model=MODEL, prompt="My favourite fruit is", n=2,
                                     max_tokens=6, temperature=1.0, seed=7,
                                     extra_body={"explain": {"mode": "pa-lrp"}})
    for choice in both.choices:
        assert choice.model_extra["explanation"]["text"].endswith(choice.text)
        assert_matches_offline(smollm2, choice.model_extra["explanation"])
    worker = httpx.get(servers["recompute"] + "/v1/explain/stats", timeout=30).json()["workers"][0]
    assert worker["bytes"] == 0 and worker["recordings"] == 0
    assert worker["recomputed_rows"] > 0


def test_recompute_mode_answers_the_readme_demo(servers, tmp_path):
    """``scripts/demo.py`` (the end of the README's main command) against the recompute server:
    the explained answer is shown and written as HTML."""
    from urllib.parse import urlsplit

    root = Path(__file__).resolve().parents[1]
    html = tmp_path / "explanation.html"
    result = subprocess.run(
        [sys.executable, str(root / "scripts" / "demo.py"), "--port",
         str(urlsplit(servers["recompute"]).port), "--html", str(html), "--wait", "60"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert html.exists() and "combined" in html.read_text().lower()
