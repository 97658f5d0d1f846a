"""A bounded schemathesis run against a live plugin server (tests/_live_server.py): the plugin's
routes and the ``explain`` field of ``/v1/completions`` and ``/v1/chat/completions``, from the
server's own OpenAPI schema, with schema-valid (positive) and schema-invalid (negative) data.

Asserted on every response: no server error, a documented status code, content type and
body (schemathesis' ``not_a_server_error``, ``status_code_conformance``,
``content_type_conformance``, ``response_schema_conformance``), invalid data refused
(``negative_data_rejection``; on the generation routes only where the violation is in the
plugin's ``explain`` / ``vllm_xargs``: vLLM's own fields are vLLM's business, and what it lets
through is counted in ``vllm_fields_accepted_invalid``), and no event-loop stall logged during
the run. Schema-valid
bodies may still be refused for what a schema cannot say (a source text that does not occur,
a span past the completion): those 400s are counted, not failed.

Bounded by counts, not by time: a fixed seed per operation and mode (``SEED``), at most
``EXAMPLES`` examples each, generation requests kept cheap (``max_tokens`` ≤ 3, ``n`` ≤ 2, no
streaming, short texts). Every operation and mode must have sent at least its ``MINIMUM``
requests, asserted one by one: a run that never reached ``/v1/completions`` fails instead of
passing with nothing sent. (Every operation sent all its examples, 1,151 requests, in 146 s on a quiet
machine and 278 s under a load average of 6; pytest-timeout bounds a hang.)
The figures go to ``tests/artifacts/fuzz.json``.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from _live_server import AUTH, MODEL, http, shared_server

pytestmark = pytest.mark.slow

import schemathesis  # noqa: E402  (scripts/test.sh installs it: the test extra)
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

ARTIFACTS = Path(__file__).parent / "artifacts"
SEED = 20261207  # each operation and mode runs under SEED + its index: the same cases every run
EXAMPLES = {"positive": 150, "negative": 100}
OPERATIONS = [
    ("POST", "/v1/explain"),
    ("GET", "/v1/explain/stats"),
    ("GET", "/v1/explanations"),
    ("GET", "/v1/explanations/{explanation_id}"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
]
# Requests each operation and mode must have sent. An operation without parameters or body has
# one request to send and nothing to negate; a path's free-form id has nothing to negate either
# (any string is an id to look up); the others must reach well into their examples.
MINIMUM = {(method, path): {"positive": 100, "negative": 60} for method, path in OPERATIONS}
MINIMUM[("GET", "/v1/explain/stats")] = {"positive": 1}
MINIMUM[("GET", "/v1/explanations/{explanation_id}")] = {"positive": 100}
GENERATION = ("/v1/completions", "/v1/chat/completions")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
MAX_TEXT = 200
# vLLM's own request fields that only make a request expensive or slow; the fuzzing is about
# the explain field and the body parsing, not vLLM's sampling
EXPENSIVE = ("best_of", "use_beam_search", "min_tokens", "prompt_logprobs", "logprobs",
             "top_logprobs", "stream_options", "ignore_eos", "length_penalty",
             "prompt_embeds", "priority", "kv_transfer_params", "echo", "suffix")


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    return shared_server(request.config, tmp_path_factory)


def _shorten(value, depth=0):
    """Cap texts and lists of a generated (positive) body, so every request stays cheap."""
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, list):
        return [_shorten(v, depth + 1) for v in value[:8]]
    if isinstance(value, dict):
        return {k: _shorten(v, depth + 1) for k, v in value.items()}
    return value


def _cheap(case, path: str) -> None:
    """Keep generation requests small: at most 3 new tokens, n <= 2, no stream, the served
    model. Only fields already of a valid type are changed, so a negative case stays invalid.
    Positive cases also get a fixed prompt or message (vLLM's own schema allows none, which
    vLLM refuses) and short texts; the explain field is fuzzed as generated."""
    body = case.body
    if not isinstance(body, dict):
        return
    positive = case.meta is None or case.meta.generation.mode.is_positive
    if path in GENERATION:
        for name in EXPENSIVE:
            body.pop(name, None)
        if positive or isinstance(body.get("model"), str):
            body["model"] = MODEL
        if positive or isinstance(body.get("stream"), bool):
            body["stream"] = False
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if (positive and name == "max_tokens") or (
                    isinstance(value, int) and not isinstance(value, bool)):
                body[name] = 3
        value = body.get("n")
        if isinstance(value, int) and not isinstance(value, bool):
            body["n"] = max(1, min(value, 2))
        elif positive:
            body["n"] = 1
        if body.get("n", 1) != 1 and positive:
            body["temperature"] = 1.0
        if positive and path == "/v1/completions":
            body["prompt"] = "Hi"
        if positive and path == "/v1/chat/completions":
            body["messages"] = [{"role": "user", "content": "Hi"}]
    if positive:
        case.body = _shorten(body)


def _refusal(response) -> str:
    """A 400's message with its numbers and quoted values blanked: one line per kind."""
    try:
        message = response.json()["error"]["message"]
    except Exception:  # noqa: BLE001
        return response.text[:80]
    return re.sub(r"\(got .*?\)|'[^']*'|\d+", "_", message)[:120]


@pytest.mark.timeout(1800)  # 146-278 s here; a slow machine must not cut the run short
def test_fuzz_the_plugin_routes(server):
    schema = schemathesis.openapi.from_url(server + "/openapi.json", headers=AUTH, timeout=60)
    stalls = http.get(server + "/v1/explain/stats", timeout=30).json()["api_loop"]["stalls"]
    started = time.monotonic()
    sent: Counter = Counter({f"{m} {p} ({mode})": 0 for (m, p), modes in MINIMUM.items()
                             for mode in modes})
    statuses: Counter = Counter()
    failures: list[str] = []
    vllm_accepted: Counter = Counter()  # invalid vLLM fields vLLM let through (not asserted)
    refusals: dict[str, Counter] = defaultdict(Counter)  # why schema-valid bodies got a 400
    refused_examples: dict = {}
    runs = [(method, path, mode) for method, path in OPERATIONS for mode in MINIMUM[(method, path)]]
    for index, (method, path, mode) in enumerate(runs):
        operation = schema[path][method]
        generation_mode = GenerationMode(mode)

        @seed(SEED + index)
        @settings(max_examples=EXAMPLES[mode], deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
        @given(case=operation.as_strategy(generation_mode=generation_mode))
        def run(case):
            _cheap(case, path)
            # vLLM's own fields are vLLM's business: on its routes, a schema-violating body is
            # asserted refused only where the violation is in the plugin's fields
            own = mode == "negative" and path not in GENERATION
            checks = CHECKS + ([negative_data_rejection] if own else [])
            try:
                response = case.call(base_url=server, headers=AUTH, timeout=300)
                sent[f"{method} {path} ({mode})"] += 1
                statuses[f"{method} {path} ({mode}) {response.status_code}"] += 1
                if response.status_code == 400 and mode == "positive":
                    refusals[f"{method} {path}"][_refusal(response)] += 1
                    refused_examples.setdefault(_refusal(response), (case.body, response.text[:300]))
                case.validate_response(response, checks=checks, headers=AUTH)
                if mode == "negative" and path in GENERATION:
                    try:
                        case.validate_response(response, checks=[negative_data_rejection],
                                               headers=AUTH)
                    except FailureGroup as error:
                        if not re.search(r"violates .* at /properties/(explain|vllm_xargs)",
                                         str(error)):
                            vllm_accepted[f"{method} {path}"] += 1
                        else:
                            raise
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as error:  # noqa: BLE001 - collected, reported below
                failures.append(f"{method} {path} ({mode}): {str(error)[:1500]}")

        try:
            run()
        except Unsatisfiable:  # nothing to generate: its count stays 0, below its minimum
            failures.append(f"{method} {path} ({mode}): no {mode} case can be generated")
    seconds = time.monotonic() - started
    after = http.get(server + "/v1/explain/stats", timeout=30).json()["api_loop"]
    ARTIFACTS.mkdir(exist_ok=True)
    summary = {"requests": sum(sent.values()), "by_operation": dict(sent),
               "statuses": dict(statuses), "failures": failures, "seconds": round(seconds, 1),
               "positive_refusals": {k: dict(v.most_common(8)) for k, v in refusals.items()},
               "loop_stalls": after["stalls"] - stalls, "longest_stall_s": after["longest_seconds"],
               "vllm_fields_accepted_invalid": dict(vllm_accepted)}
    (ARTIFACTS / "fuzz.json").write_text(json.dumps(summary, indent=2))
    (ARTIFACTS / "fuzz_examples.json").write_text(json.dumps(refused_examples, indent=1, default=str))
    print(f"fuzzed {summary['requests']} requests in {seconds:.0f} s")
    for name, count in sorted(statuses.items()):
        print(f"  {name}: {count}")
    assert not failures, "\n\n".join(failures[:10])
    assert summary["loop_stalls"] == 0, after
    short = {f"{m} {p} ({mode})": (sent[f"{m} {p} ({mode})"], least)
             for (m, p), modes in MINIMUM.items() for mode, least in modes.items()
             if sent[f"{m} {p} ({mode})"] < least}
    assert not short, f"operations that sent fewer requests than their minimum (sent, minimum): {short}"
