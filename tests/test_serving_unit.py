"""The plugin's HTTP layer and recorder without a server: a fake engine answers collective_rpc.
Fast; covers what a real server on the default model cannot show (an unsupported architecture)."""

from __future__ import annotations

import asyncio
import functools
import json

import pytest

import vllm  # noqa: F401  (scripts/test.sh installs it)
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from vllm_pelrp.serving.api import PelrpEndpointPlugin  # noqa: E402
from vllm_pelrp.serving.keys import new_secret, sign_key, verify_key  # noqa: E402
from vllm_pelrp.serving.protocol import extract_explain, parse_explain  # noqa: E402

from _fake_engine import make_app  # noqa: E402


UNSUPPORTED = ("UnsupportedModelError: architecture OPTForCausalLM is not supported by the "
               "PA-LRP engine; supported: LlamaForCausalLM, MistralForCausalLM")


def test_unsupported_architecture_is_a_clear_400_and_plain_requests_still_work():
    client, engine = make_app({"error": UNSUPPORTED})
    reply = client.post("/v1/completions", json={"model": "m", "prompt": "hi", "explain": {}})
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert "OPTForCausalLM is not supported" in message and "LlamaForCausalLM" in message
    assert "pelrp_submit" not in engine.calls  # nothing was generated or explained
    plain = client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert plain.status_code == 200 and plain.json()["choices"][0]["text"] == "ok"


def test_integers_beyond_64_bits_are_a_400_naming_the_field():
    """vLLM's engine messages carry 64-bit integers: a larger one (found by the fuzz test, in
    vLLM's own stream_interval) answered 500 with an empty message; it is a 400 naming the field,
    and the next request is served."""
    client, engine = make_app({"error": None, "bytes_per_token": 1000, "cap_bytes": 10_000,
                               "max_model_len": 64, "vocab_size": 100})
    for path, body in (
            ("/v1/completions", {"model": "m", "prompt": "hi", "stream_interval": 2**68}),
            ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                      "stop_token_ids": [1, -(2**70)]})):
        reply = client.post(path, json=body)
        assert reply.status_code == 400, reply.text
        message = reply.json()["error"]["message"]
        assert "does not fit a 64-bit integer" in message
        assert ("stream_interval" if "stream_interval" in body else "stop_token_ids[1]") in message
    plain = client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert plain.status_code == 200


def test_worker_reports_unsupported_architecture():
    from transformers import OPTConfig

    from vllm_pelrp.models import decoder_architecture_for
    from vllm_pelrp.engine.spec import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="supported: LlamaForCausalLM"):
        decoder_architecture_for(OPTConfig(architectures=["OPTForCausalLM"]))


def test_cap_is_checked_before_generation():
    info = {"error": None, "bytes_per_token": 1000, "cap_bytes": 10_000, "max_model_len": 64,
            "vocab_size": 100}
    client, engine = make_app(info)
    reply = client.post("/v1/completions", json={"model": "m", "prompt": [1, 2, 3],
                                                 "max_tokens": 20, "explain": {}})
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert "23 tokens" in message and "cap" in message
    assert engine.calls == ["pelrp_setup"]


def test_explain_options_parsing():
    assert parse_explain({}).mode == "pa-lrp"
    assert parse_explain('{"mode": "cp-lrp", "target": {"span": [0, 2]}}').target.span == (0, 2)
    with pytest.raises(ValueError, match="unknown mode 'x'"):
        parse_explain({"mode": "x"})
    with pytest.raises(ValueError, match="target"):
        parse_explain({"target": "everything"})
    with pytest.raises(ValueError, match="top_k"):
        parse_explain({"top_k": 0})
    options, body = extract_explain({"prompt": "p", "vllm_xargs": {"explain": json.dumps({}),
                                                                   "other": 1}})
    assert options is not None and body["vllm_xargs"] == {"other": 1}
    assert extract_explain({"prompt": "p"})[0] is None


# --- the recorder on a fake model runner: rows map to requests -------------------------------
class _Layer(__import__("torch").nn.Module):
    def forward(self, positions, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        return hidden * 0.5 + 1.0, residual


def _runner(requests):
    import types

    import numpy as np

    batch = types.SimpleNamespace(req_ids=[], num_reqs=0,
                                  num_computed_tokens_cpu=np.zeros(8, int))
    return types.SimpleNamespace(requests=requests, input_batch=batch,
                                 query_start_loc=types.SimpleNamespace(np=np.zeros(8, int)),
                                 _prepare_inputs=lambda: None)


def _request(key, prompt, max_tokens=4):
    import types

    params = types.SimpleNamespace(extra_args={"pelrp_key": key} if key else None,
                                   max_tokens=max_tokens)
    return types.SimpleNamespace(sampling_params=params, prompt_token_ids=prompt,
                                 output_token_ids=[])


SECRET = new_secret()
VERIFY = functools.partial(verify_key, SECRET)


def _recorder(runner, layers, cap_bytes, hidden=8):
    """A recorder over a pool in host memory, the op hooked on ``layers`` (as the plugin does
    at load time)."""
    import torch

    from vllm_pelrp.serving.record_pool import RecordingPool, install_layer_hooks, set_pool
    from vllm_pelrp.serving.recorder import Recorder

    pool = RecordingPool(len(layers), hidden, torch.float32, "cpu", cap_bytes=cap_bytes,
                         max_batch_tokens=64, page_tokens=4)
    install_layer_hooks(layers)
    set_pool(pool)
    recorder = Recorder(runner, pool, max_model_len=64, verify=VERIFY)
    recorder.install()
    return recorder


def _step(runner, layers, batch):
    """Run the fake model on a batch [(req_id, first_position, rows)] as the runner does (the
    host arrays, ``_prepare_inputs``, the forward); returns each request's (positions, layer
    inputs) as the model saw them."""
    import torch

    runner.input_batch.req_ids = [r for r, _, _ in batch]
    runner.input_batch.num_reqs = len(batch)
    starts = [0]
    for i, (_, first, n) in enumerate(batch):
        starts.append(starts[-1] + n)
        runner.input_batch.num_computed_tokens_cpu[i] = first
    runner.query_start_loc.np[: len(starts)] = starts
    runner._prepare_inputs()
    positions = torch.cat([torch.arange(p, p + n) for _, p, n in batch])
    hidden = torch.randn(len(positions), 8)
    residual = None
    seen = []
    for layer in layers:
        seen.append(hidden.clone() if residual is None else hidden + residual)
        hidden, residual = layer(positions, hidden, residual)
    return {req: (p, [s[starts[i]:starts[i + 1]] for s in seen])
            for i, (req, p, _) in enumerate(batch)}


def test_recorder_maps_rows_to_requests_across_chunks_and_decode():
    import torch

    layers = [_Layer() for _ in range(3)]
    key_a, key_c = sign_key(SECRET, 1), sign_key(SECRET, 1)
    requests = {"a": _request(key_a, [1, 2, 3, 4, 5, 6]), "b": _request(None, [7, 8, 9]),
                "c": _request(key_c, [1, 2, 3, 4, 5, 6, 7, 8])}
    runner = _runner(requests)
    recorder = _recorder(runner, layers, cap_bytes=10**6)
    expected = {"a": {}, "c": {}}
    steps = [
        [("a", 0, 4), ("b", 0, 3)],             # chunked prefill of a, b's prompt
        [("b", 3, 1), ("a", 4, 2), ("c", 5, 3)],  # a's last chunk; c starts at 5 (cached prefix)
        [("a", 6, 1), ("c", 8, 1)],             # decode steps
        [("b", 4, 1)],                          # b alone: a and c's slots are not written
    ]
    for batch in steps:
        for req, (first, inputs) in _step(runner, layers, batch).items():
            if req in expected:
                for offset in range(inputs[0].shape[0]):
                    expected[req][first + offset] = [x[offset] for x in inputs]
    assert "b" not in recorder.recordings  # did not ask: nothing recorded
    # capacity = prompt + max_tokens: a 6 + 4, c 8 + 4 positions, in pages of 4 positions;
    # 3 layers x 8 floats each
    assert recorder.stats()["bytes"] == 3 * (12 + 12) * 8 * 4
    for req, rows in expected.items():
        recording = recorder.recordings[req]
        assert recording.first_position == min(rows) and recording.end_position == max(rows) + 1
        recorded = recording.pool.gather(recording.pages, max(rows) + 1)
        for position, per_layer in rows.items():
            for layer, row in enumerate(per_layer):
                torch.testing.assert_close(recorded[layer, position], row)
    assert recorder.release(key_a) > 0 and "a" not in recorder.recordings
    assert recorder.used_bytes == recorder.recordings["c"].nbytes
    assert recorder.pool.free_pages == recorder.pool.num_pages - 3  # a's pages are back


def test_recorder_refuses_over_the_cap():
    import torch

    from vllm_pelrp.serving.recorder import Recorder

    layers = [_Layer() for _ in range(2)]
    runner = _runner({"a": _request(sign_key(SECRET, 1), list(range(10)), max_tokens=10)})
    recorder = _recorder(runner, layers, cap_bytes=2 * 8 * 4 * 16)  # 16 positions: 4 pages
    _step(runner, layers, [("a", 0, 10)])
    recording = recorder.recordings["a"]
    assert recording.pages is None and "cap" in recording.error and "needs" in recording.error


def test_recorder_records_only_keys_the_api_process_signed():
    """Finding 1 (forged recordings): a client-made ``pelrp_key`` (anything, a well-formed key
    with a wrong tag, or a signed key reused after its request was explained or released) and
    more recordings than the key was signed for are all refused; nothing is allocated."""
    import torch

    from vllm_pelrp.serving.keys import verify_key
    from vllm_pelrp.serving.recorder import Recorder

    good = sign_key(SECRET, 2)
    forged = good[:-64] + "0" * 64
    other = sign_key(new_secret(), 1)  # signed, but by another secret
    requests = {"f1": _request("anything", [1, 2]), "f2": _request(forged, [1, 2]),
                "f3": _request(other, [1, 2]), "g1": _request(good, [1, 2]),
                "g2": _request(good, [1, 2]), "g3": _request(good, [1, 2])}
    layers = [_Layer() for _ in range(2)]
    runner = _runner(requests)
    recorder = _recorder(runner, layers, cap_bytes=10**6)
    _step(runner, layers, [(r, 0, 2) for r in requests])
    assert sorted(recorder.recordings) == ["g1", "g2"]  # signed for 2 recordings: g3 refused
    assert recorder.stats()["refused_keys"] == 4 and "keys" not in recorder.stats()
    assert verify_key(SECRET, good).recordings == 2 and verify_key(SECRET, forged) is None
    assert len(recorder.take(good)) == 2
    runner.requests["g4"] = _request(good, [1, 2])  # the same key after it was claimed
    _step(runner, layers, [("g4", 0, 2)])
    assert "g4" not in recorder.recordings and recorder.used_bytes == 0


def test_pelrp_serve_command_passes_vllm_arguments_through(monkeypatch, tmp_path):
    from vllm_pelrp import cli

    monkeypatch.setenv("VLLM_PLUGINS", "other")
    (tmp_path / "config.json").write_text("{}")
    parser = cli.build_parser()
    args, unknown = parser.parse_known_args(
        ["serve", "--model", str(tmp_path), "--port", "8123", "--record-cap-mb", "64",
         "--dtype", "float32", "--max-model-len", "4096"])
    args.vllm_args = unknown
    command, env = cli.serve_command(args)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert command[command.index("--model") + 1] == str(tmp_path)
    assert command[command.index("--port") + 1] == "8123"
    assert command[command.index("--dtype") + 1] == "float32"
    assert command.count("--max-model-len") == 1 and "4096" in command  # the user's value wins
    assert env["VLLM_PLUGINS"] == "other,pelrp" and env["VLLM_PELRP_MAX_RECORD_MB"] == "64.0"
    assert cli.main(["explain", "x", "--not-an-option"]) == 2  # other commands stay strict


def test_a_shipped_model_name_serves_and_loads_its_converted_checkpoint(tmp_path, monkeypatch):
    """``--model gemma3-270m`` (any spelling of a shipped name) is the converted checkpoint,
    served under its canonical name; a directory of that name in the working directory wins."""
    from vllm_pelrp import cli
    from vllm_pelrp.explainer import resolve_model_path
    from vllm_pelrp.shipped_models import checkpoint_dir

    parser = cli.build_parser()
    args, unknown = parser.parse_known_args(["serve", "--model", "Gemma3-270M"])
    args.vllm_args = unknown
    command, _ = cli.serve_command(args)
    assert command[command.index("--model") + 1] == str(checkpoint_dir("gemma-3-270m"))
    assert command[command.index("--served-model-name") + 1] == "gemma-3-270m"
    assert resolve_model_path("google/gemma-3-270m") == checkpoint_dir("gemma-3-270m")
    local = tmp_path / "gemma-3-270m"
    local.mkdir()
    (local / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("gemma-3-270m").resolve() == local
    with pytest.raises(FileNotFoundError, match="shipped model's name"):
        resolve_model_path(str(tmp_path / "missing"))


def test_pelrp_serve_keeps_vllms_compilation_and_names_the_activation_source(monkeypatch,
                                                                           tmp_path):
    from vllm_pelrp import cli
    from vllm_pelrp.serving import plugin

    (tmp_path / "config.json").write_text("{}")
    parser = cli.build_parser()
    for argv, eager, source in (([], False, None), (["--eager"], True, None),
                                (["--explain-activations", "recompute"], False, "recompute")):
        args, unknown = parser.parse_known_args(["serve", "--model", str(tmp_path), *argv])
        args.vllm_args = unknown
        command, env = cli.serve_command(args)
        assert ("--enforce-eager" in command) == eager
        assert env.get("VLLM_PELRP_ACTIVATIONS") == source
    monkeypatch.delenv("VLLM_PELRP_ACTIVATIONS", raising=False)
    assert plugin.activations_source("cpu") == "record"  # auto
    assert plugin.activations_source("cuda") == "recompute"
    monkeypatch.setenv("VLLM_PELRP_ACTIVATIONS", "Record")
    assert plugin.activations_source("cuda") == "record"
    monkeypatch.setenv("VLLM_PELRP_ACTIVATIONS", "replay")
    with pytest.raises(ValueError, match="allowed: record, recompute, auto"):
        plugin.activations_source("cpu")


def test_general_plugin_is_inert_without_vllm_plugins(monkeypatch):
    from vllm_pelrp.serving import plugin

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    assert not plugin.enabled()
    monkeypatch.setenv("VLLM_PLUGINS", "a, pelrp")
    assert plugin.enabled()


def test_loop_watch_reports_a_blocked_event_loop_with_its_stack(caplog):
    """A synchronous call that blocks the API loop is logged while it lasts (with the stack it
    is blocked in) and counted once it ends; a loop that only awaits is never reported."""
    import time

    from vllm_pelrp.serving.loopwatch import LoopWatch

    def blocking_assembly():
        time.sleep(0.8)  # stands in for long synchronous work on the loop

    async def scenario():
        watch = LoopWatch(asyncio.get_running_loop(), threshold=0.3, period=0.05)
        watch.start()
        await asyncio.sleep(0.5)  # awaiting is not a stall
        quiet = watch.stats()["stalls"]
        blocking_assembly()
        await asyncio.sleep(0.3)  # the loop beats again; the watch sees the stall end
        watch.stop()
        return quiet, watch.stats()

    with caplog.at_level("WARNING", logger="vllm_pelrp.serving"):
        quiet, stats = asyncio.run(scenario())
    assert quiet == 0
    assert stats["stalls"] == 1
    assert 0.7 <= stats["longest_seconds"] <= 1.5
    text = caplog.text
    assert "event loop has been blocked" in text and "blocking_assembly" in text
    assert "ran again after a" in text


def test_forward_on_a_fresh_chunk_stops_frame_stack_chunk_mappings(monkeypatch):
    """A ~12 KiB frame that ends just short of its 16 KiB frame-stack chunk maps and unmaps a new
    chunk for every Python call it makes (each new mapping costs a minor page fault when first
    touched). Found by sweeping the caller's depth; through ``run_forward_on_fresh_chunk`` no
    depth does it, and the forward's result is unchanged."""
    import resource

    import torch

    from vllm_pelrp.serving import compiled

    value = torch.ones(1)
    namespace: dict = {}
    body = "\n".join(f"    local_{i} = value" for i in range(1500))
    exec(f"def big_frame(value, calls):\n{body}\n    for _ in range(calls):\n"
         f"        torch.ops.aten.neg.default(value)\n", {"torch": torch}, namespace)

    class BigFrameModel(torch.nn.Module):
        def forward(self, value, calls):
            return namespace["big_frame"](value, calls)

    def at_depth(depth, function, *args):
        return function(*args) if depth == 0 else at_depth(depth - 1, function, *args)

    def depths_that_map_chunks(model) -> list[int]:
        found = []
        for depth in range(260):  # the callers' frames sweep more than one 16 KiB chunk
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            at_depth(depth, model, value, 400)
            if resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before >= 300:
                found.append(depth)
        return found

    direct = BigFrameModel()
    assert depths_that_map_chunks(direct), "no caller depth made the big frame map chunks"

    monkeypatch.delenv("VLLM_PELRP_FRESH_CHUNK", raising=False)
    padded = BigFrameModel()
    assert compiled.run_forward_on_fresh_chunk(padded)
    assert not compiled.run_forward_on_fresh_chunk(padded)  # once per model
    assert depths_that_map_chunks(padded) == []

    linear = torch.nn.Linear(3, 2)
    expected = linear(torch.arange(3.0))
    compiled.run_forward_on_fresh_chunk(linear)
    assert torch.equal(linear(torch.arange(3.0)), expected)

    monkeypatch.setenv("VLLM_PELRP_FRESH_CHUNK", "0")
    assert not compiled.run_forward_on_fresh_chunk(BigFrameModel())


def test_openapi_schema_is_built_before_serving_and_served_as_built():
    """FastAPI would build the schema on the first GET /openapi.json, on the event loop."""
    app = FastAPI()
    plugin = PelrpEndpointPlugin()
    plugin.attach_router(app)
    assert app.openapi_schema is None
    plugin.build_openapi_schema()
    built = app.openapi_schema
    assert built is not None
    assert "/v1/explain" in built["paths"] and "/v1/completions" in built["paths"]
    plugin.build_openapi_schema()  # once
    assert app.openapi_schema is built
    assert TestClient(app).get("/openapi.json").json() == built

    no_docs = FastAPI(openapi_url=None)  # vLLM's --disable-fastapi-docs
    plugin = PelrpEndpointPlugin()
    plugin.attach_router(no_docs)
    plugin.build_openapi_schema()
    assert no_docs.openapi_schema is None


def test_environment_settings_are_read_one_way_and_bad_values_are_refused(monkeypatch):
    """Every on/off switch accepts the same spellings; a typo is an error that names the
    setting and what it allows, not a silent default."""
    from vllm_pelrp import settings
    from vllm_pelrp.serving import compiled, record_pool
    from vllm_pelrp.serving.webview import RecentExplanations

    switches = {"VLLM_PELRP_FRESH_CHUNK": compiled.fresh_chunk_forward,
                "VLLM_PELRP_SPARE_CORES": lambda: settings.get("VLLM_PELRP_SPARE_CORES")}
    for name, read in switches.items():
        for value, expected in [("", True), (" OFF ", False), ("No", False), ("on", True),
                                ("TRUE", True), ("0", False)]:
            monkeypatch.setenv(name, value)
            assert read() is expected, (name, value)
        monkeypatch.setenv(name, "of")
        with pytest.raises(ValueError, match=f"{name}='of'.*allowed: 1, true, yes, on"):
            read()
        monkeypatch.delenv(name)
        assert read() is True
    monkeypatch.setenv("VLLM_PELRP_MAX_RECORD_MB", "0.5")
    assert record_pool.pool_cap_bytes() == 2**19
    monkeypatch.setenv("VLLM_PELRP_MAX_RECORD_MB", "2GB")
    with pytest.raises(ValueError, match="VLLM_PELRP_MAX_RECORD_MB='2GB' is not a number"):
        record_pool.pool_cap_bytes()
    monkeypatch.setenv("VLLM_PELRP_MAX_RECORD_MB", "-1")
    with pytest.raises(ValueError, match="out of range; allowed: a number >= 0"):
        record_pool.pool_cap_bytes()
    monkeypatch.setenv("VLLM_PELRP_RECENT_EXPLANATIONS", "12")
    monkeypatch.setenv("VLLM_PELRP_RECENT_MB", "1.5")
    store = RecentExplanations.from_env()
    assert (store.capacity, store.max_bytes) == (12, 3 * 2**19)
    monkeypatch.setenv("VLLM_PELRP_RECENT_EXPLANATIONS", "2.5")
    with pytest.raises(ValueError, match="VLLM_PELRP_RECENT_EXPLANATIONS='2.5' is out of range; "
                                         "allowed: a whole number >= 0"):
        RecentExplanations.from_env()
    monkeypatch.setenv("VLLM_PELRP_RECENT_EXPLANATIONS", "nan")
    with pytest.raises(ValueError, match="out of range"):
        settings.get("VLLM_PELRP_RECENT_EXPLANATIONS")
