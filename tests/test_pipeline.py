"""The explanation pipeline (vllm_pelrp/pipeline.py) on tiny models: the plan and its 'next'
row, the typed user errors, the messages between the API process and the worker (through
vLLM's msgpack encoding), and the server's path (tests/_fake_engine.py: the real worker
extension on the tiny model) against the offline Explainer, which runs the same pipeline in
process: their explanations are equal, number for number."""

from __future__ import annotations

import pickle

import pytest
import torch

import vllm  # noqa: F401  (scripts/test.sh installs it)

from vllm_pelrp import Explainer, pipeline
from vllm_pelrp.errors import CostError, ExplainInputError, PromptError, TargetError
from vllm_pelrp.grounding import GroundingError, documents_into_messages

from _fake_engine import FakeWorker, make_app, over_msgpack
from tiny_models import tiny_model, tiny_tokenizer

PROMPT = "w5 w6 w7 w8 w9 w10 w11 w12"
PROMPT_IDS = [5, 6, 7, 8, 9, 10, 11, 12]
COMPLETION_IDS = [30, 31, 32, 33]
INFO = {"error": None, "bytes_per_token": 10, "cap_bytes": 10**9, "max_model_len": 512,
        "vocab_size": 101}


@pytest.fixture(scope="module")
def tiny():
    return Explainer(tiny_model("llama"), tiny_tokenizer(), name="tiny")


def _plan(explainer, target="completion", completion=COMPLETION_IDS, **kwargs):
    return pipeline.plan(PROMPT_IDS, completion, target, tokenizer=explainer.tokenizer,
                         vocab_size=explainer.weights.spec.vocab_size, **kwargs)


# ---- the plan ---------------------------------------------------------------------------------
def test_plan_resolves_targets_tokens_and_sentence_rows(tiny):
    plan = _plan(tiny, "per_token", sources=[{"text": "w7 w8"}])
    assert not plan.next_first and plan.per_token
    assert [t.span for t in plan.targets] == [(k, k + 1) for k in range(4)]
    assert plan.spans[0] == PROMPT + " w30 w31 w32 w33"
    # the completion is one sentence: the span of all four tokens, a row after the main ones
    assert plan.grounding is not None and len(plan.grounding.sentences) == 1
    assert plan.rows[:4] == plan.targets and plan.sentence_row == [4]
    assert plan.rows[4].span == (0, 4) and plan.num_rows == 5
    assert plan.seed_rows()[0] == [(7, 30)]  # completion token 0 is predicted at position 7


def test_next_is_one_row_decided_by_the_forward_and_completed_once(tiny):
    plan = _plan(tiny, "next", sources=[{"text": "w7 w8"}])
    assert plan.next_first and plan.targets == [] and plan.num_rows == len(plan.rows) + 1
    job = pipeline.job(plan)
    assert job.next_first and job.seeds == plan.seed_rows()
    result = pipeline.compute(tiny.weights, job)
    with torch.no_grad():
        logits = tiny.hf_model(torch.tensor([PROMPT_IDS + COMPLETION_IDS])).logits[0, -1]
    assert result.next_token_id == int(logits.argmax())
    assert result.target_logit.shape == [plan.num_rows]
    assert result.target_logit.to_numpy()[0] == pytest.approx(float(logits.max()), rel=1e-5)
    done = pipeline.complete_next(plan, result.next_token_id)
    assert [t.kind for t in done.targets] == ["next"] and done.rows[0] == done.targets[0]
    assert done.targets[0].positions == [len(PROMPT_IDS) + len(COMPLETION_IDS) - 1]
    assert done.sentence_row == [b + 1 for b in plan.sentence_row] and not done.next_first
    assert pipeline.complete_next(done, 3) is done  # nothing left to complete
    explanation = pipeline.assemble(plan, result, model="tiny")
    assert explanation.target.token_ids == [result.next_token_id]
    assert explanation.grounding is not None
    assert explanation == tiny.explain(input_ids=PROMPT_IDS, completion=COMPLETION_IDS,
                                       target="next", sources=[{"text": "w7 w8"}])


def test_recorded_layer_inputs_without_the_last_token_give_the_same_relevance(tiny):
    """A recording holds every position but the last completion token (never fed to the
    model); the completion's rows do not reach it, and its relevance is padded with zeros."""
    from vllm_pelrp.engine.backward import forward_layer_inputs

    plan = _plan(tiny, "per_token")
    ids = torch.tensor(plan.ids)
    recorded, _ = forward_layer_inputs(tiny.weights, ids[:-1])
    short = pipeline.compute(tiny.weights, pipeline.job(plan), recorded)
    full = pipeline.compute(tiny.weights, pipeline.job(plan))
    assert full.recomputed_rows == len(plan.ids) and short.recomputed_rows == 0
    assert (short.token.to_numpy()[:, -1] == 0.0).all()
    torch.testing.assert_close(short.relevance().token, full.relevance().token)
    torch.testing.assert_close(short.relevance().positional_cos, full.relevance().positional_cos)
    with pytest.raises(ValueError, match="do not fit the job's 12 tokens"):
        pipeline.compute(tiny.weights, pipeline.job(plan), [x[:5] for x in recorded])


# ---- typed errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, kind, param, words", [
    ({"target": {"span": [2, 9]}}, TargetError, "target", "span [2, 9) is out of range"),
    ({"target": "completion", "completion": []}, TargetError, "target", "needs a completion"),
    ({"target": "sideways"}, TargetError, "target", "unknown target 'sideways'"),
    ({"target": {"token_id": 500}}, TargetError, "target", "out of range [0, 101)"),
    ({"target": "per_token", "max_per_token_rows": 2}, CostError, "target", "exceed the cap"),
    ({"mode": "magic"}, ExplainInputError, "mode", "allowed: pa-lrp, attnlrp, cp-lrp"),
    ({"sources": [{"text": "zebra"}]}, GroundingError, "sources", "does not occur in the prompt"),
    ({"sources": [{"message": 0}]}, GroundingError, "sources", "needs a chat prompt"),
    ({"sources": [{"chars": [0, 500]}]}, GroundingError, "sources", "reach beyond the prompt"),
    ({"sources": [{"nothing": 1}]}, GroundingError, "sources", "sources[0]"),
    ({"sources": [{"text": "w5"}], "grounding_threshold": 2}, GroundingError,
     "grounding_threshold", "out of range; allowed: 0 to 1"),
])
def test_user_errors_are_typed_and_name_their_field(tiny, kwargs, kind, param, words):
    with pytest.raises(kind) as caught:
        _plan(tiny, **kwargs)
    error = caught.value
    assert isinstance(error, ExplainInputError) and isinstance(error, ValueError)
    assert error.param == param and words in str(error)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is kind and again.param == param and str(again) == str(error)


def test_prompt_errors(tiny):
    with pytest.raises(PromptError, match="the prompt is empty"):
        pipeline.plan([], [1], "completion", tokenizer=tiny.tokenizer, vocab_size=101)
    with pytest.raises(PromptError, match=r"token ids must lie in \[0, 101\)") as caught:
        pipeline.plan([5, 101], [], "next", tokenizer=tiny.tokenizer, vocab_size=101)
    assert caught.value.param == "prompt"
    with pytest.raises(GroundingError, match="no message with role 'user'") as caught:
        documents_into_messages([{"role": "system", "content": "x"}], ["doc"])
    assert caught.value.param == "documents"
    with pytest.raises(PromptError, match="exactly one of text, input_ids or messages"):
        tiny.explain()
    with pytest.raises(ExplainInputError, match="unknown combination") as caught:
        tiny.explain(input_ids=PROMPT_IDS, combination="sum")
    assert caught.value.param == "combination"


# ---- the messages -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_messages_cross_msgpack_and_validate(family):
    explainer = Explainer(tiny_model(family), tiny_tokenizer(), name=family)
    plan = _plan(explainer, {"span": [1, 3]})
    job = pipeline.job(plan, key="k")
    sent = over_msgpack(job.model_dump())
    assert pipeline.BackwardJob.model_validate(sent) == job
    result = pipeline.compute(explainer.weights, pipeline.BackwardJob.model_validate(sent))
    back = pipeline.backward_reply(over_msgpack(result.model_dump()))
    assert isinstance(back, pipeline.BackwardResult) and back == result
    # biases: what they keep is booked per layer (qwen2); a bias-free model sends None
    if family == "qwen2":
        assert back.bias_absorbed is not None and back.bias_absorbed.shape[1] == 3
        assert explainer.explain(input_ids=PROMPT_IDS, completion=COMPLETION_IDS,
                                 target={"span": [1, 3]}).conservation.bias_absorbed != 0
    else:
        assert back.bias_absorbed is None
    failure = pipeline.backward_reply(over_msgpack(
        pipeline.BackwardFailure(error="cancelled", queue_seconds=0.5).model_dump()))
    assert isinstance(failure, pipeline.BackwardFailure) and failure.error == "cancelled"
    with pytest.raises(ValueError):
        pipeline.BackwardJob.model_validate({**sent, "mode": "magic"})


@pytest.mark.parametrize("target", ["per_token", {"span": [1, 3]}])
@pytest.mark.parametrize("combination", ["abs-single-w0.25", "abs-single", "signed-single"])
def test_rotary_parts_summed_on_the_worker_give_the_same_explanation(tiny, target, combination):
    """Without per_layer output or a per-part combination the worker sends each rotary part's
    sums over layers (Σ_l R, Σ_l |R|, and for per_token the rows' Σ_l |Σ_b R|), not (B, L, T):
    the explanation is the one assembled from the layers."""
    plan = _plan(tiny, target, sources=[{"text": "w7 w8"}])
    summed_job = pipeline.job(plan, combination=combination)
    layered_job = pipeline.job(plan, per_layer=True)
    assert not summed_job.per_layer and layered_job.per_layer
    assert summed_job.summary_rows == (4 if target == "per_token" else 0)
    summed = pipeline.backward_reply(over_msgpack(
        pipeline.compute(tiny.weights, summed_job).model_dump()))
    layered = pipeline.compute(tiny.weights, layered_job)
    assert summed.positional_cos.layers is None and layered.positional_cos.layers.shape[1] == 3
    light = pipeline.assemble(plan, summed, model="m", combination=combination)
    full = pipeline.assemble(plan, layered, model="m", combination=combination)
    for row, reference in zip([light, *(light.rows or [])], [full, *(full.rows or [])]):
        for name in ("token_relevance", "positional_relevance", "combined_relevance"):
            assert getattr(row, name) == pytest.approx(getattr(reference, name), abs=1e-6), name
        for part, other in zip(row.positional_parts, reference.positional_parts):
            assert part.relevance == pytest.approx(other.relevance, abs=1e-6)
    assert light.grounding.grounding_score == pytest.approx(full.grounding.grounding_score,
                                                            abs=1e-6)
    assert [s.source_shares for s in light.grounding.sentences] == [
        pytest.approx(s.source_shares, abs=1e-6) for s in full.grounding.sentences]
    with pytest.raises(ValueError, match="layer by layer"):
        pipeline.assemble(plan, summed, model="m", per_layer=True)
    with pytest.raises(ValueError, match="layer by layer"):
        pipeline.assemble(plan, summed, model="m", combination="abs-per-part")
    assert pipeline.job(plan, combination="signed-per-part").per_layer


def test_arrays_travel_as_bytes():
    """A result's arrays are fp32 bytes in the message (msgpack bin), not lists of floats."""
    from vllm.v1.serial_utils import MsgpackEncoder

    values = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4) / 7
    array = pipeline.Float32Array.from_tensor(values)
    dumped = array.model_dump()
    assert dumped == {"shape": [2, 3, 4], "data": values.float().numpy().tobytes()}
    back = pipeline.Float32Array.model_validate(over_msgpack(dumped))
    assert torch.equal(back.to_tensor(), values.float())
    encoded = b"".join(bytes(b) for b in MsgpackEncoder().encode(dumped))
    assert len(encoded) < 24 * 4 + 40  # 4 bytes a number, a few for the keys
    with pytest.raises(ValueError, match="do not hold an fp32 array of shape"):
        pipeline.Float32Array.model_validate({"shape": [2, 3], "data": b"\0" * 20})


# ---- the server's path ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tiny):
    worker = FakeWorker(tiny.weights, COMPLETION_IDS)
    client, engine = make_app(INFO, tokenizer=tiny.tokenizer, worker=worker)
    client.app.state.pelrp_service.model_name = "tiny"
    return client, engine, worker


def _offline(tiny, **kwargs):
    return tiny.explain(PROMPT, completion=COMPLETION_IDS, **kwargs).model_dump(mode="json")


@pytest.mark.parametrize("body", [
    {"target": "completion"},
    {"target": "per_token", "per_layer": True},
    {"target": "next"},
    {"target": {"span": [1, 3]}, "mode": "cp-lrp", "sources": [{"text": "w7 w8"}]},
])
def test_explain_endpoint_equals_the_offline_explainer(tiny, served, body):
    client, _, worker = served
    reply = client.post("/v1/explain", json={"prompt": PROMPT, "completion": COMPLETION_IDS,
                                             **body})
    assert reply.status_code == 200, reply.text
    served_explanation = reply.json()
    assert served_explanation.pop("id").startswith("expl-")  # the web view's store gave it one
    expected = _offline(tiny, **body)
    expected.pop("id")
    assert served_explanation == expected
    (job,) = worker.submitted[-1]  # what crossed to the worker: a BackwardJob's dict
    assert set(job) == set(pipeline.BackwardJob.model_fields)
    assert job["next_first"] == (body["target"] == "next") and job["key"] is None


def test_completions_explained_from_the_recording_equal_the_offline_explainer(tiny, served):
    client, _, worker = served
    reply = client.post("/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": 4,
                                                 "explain": {"target": "per_token"}})
    assert reply.status_code == 200, reply.text
    explanation = reply.json()["choices"][0]["explanation"]
    expected = _offline(tiny, target="per_token")
    assert explanation["rows"][0]["token_relevance"] == pytest.approx(
        expected["rows"][0]["token_relevance"], rel=1e-5, abs=1e-7)
    assert explanation["target_logit"] == pytest.approx(expected["target_logit"], rel=1e-5)
    assert worker.submitted[-1][0]["key"]  # the recording's key went along


def test_user_errors_are_400s_by_type_and_worker_failures_are_not(served):
    client, engine, worker = served
    # after generation: the 4-token completion has no span [2, 9): the request's fault
    reply = client.post("/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": 9,
                                                 "explain": {"target": {"span": [2, 9]}}})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "explain.target" and "span [2, 9) is out of range" in error["message"]
    reply = client.post("/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": 4,
                                                 "explain": {"sources": [{"chars": [0, 500]}]}})
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == "explain.sources"
    assert error["message"].startswith("sources: sources[0]: chars [0, 500] reach beyond")
    reply = client.post("/v1/explain", json={"prompt": PROMPT, "completion": COMPLETION_IDS,
                                             "sources": [{"text": "zebra"}]})
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == "sources"
    assert error["message"] == "sources: sources[0]: text 'zebra' does not occur in the prompt"
    reply = client.post("/v1/explain", json={"prompt": PROMPT, "completion": COMPLETION_IDS,
                                             "target": {"span": [0, 9]}})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "target"
    # the worker finds no recording (here: it lost it): not the request's fault, so the choice
    # carries the error and the response is a 200
    record = worker.record
    worker.record = lambda *args: None
    try:
        reply = client.post("/v1/completions", json={"model": "m", "prompt": PROMPT,
                                                     "max_tokens": 4, "explain": {}})
    finally:
        worker.record = record
    assert reply.status_code == 200, reply.text
    assert "no recorded activations" in reply.json()["choices"][0]["explanation"]["error"]


def test_the_worker_says_done_and_the_api_process_fetches_once(tiny):
    """No polling while the backward runs: the API process awaits the worker's "done" on its
    notification socket (serving/notify.py), then fetches the result with one pelrp_poll."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from vllm_pelrp.serving.service import SAFETY_POLL_SECONDS

    worker = FakeWorker(tiny.weights, COMPLETION_IDS)
    extension = worker.extension
    extension._pelrp().pool = ThreadPoolExecutor(1)  # on a thread, as on a served worker
    run = extension._pelrp_run

    def slow_run(*args, **kwargs):
        time.sleep(0.3)  # long enough for 15 polls every 20 ms
        return run(*args, **kwargs)

    extension._pelrp_run = slow_run
    client, engine = make_app(INFO, tokenizer=tiny.tokenizer, worker=worker)
    started = time.perf_counter()
    reply = client.post("/v1/explain", json={"prompt": PROMPT, "completion": COMPLETION_IDS,
                                             "target": "completion"})
    elapsed = time.perf_counter() - started
    assert reply.status_code == 200, reply.text
    # one fetch once told; a loaded machine may add the safety net's poll once a second
    assert engine.calls.count("pelrp_poll") <= 1 + int(elapsed / SAFETY_POLL_SECONDS)
    assert extension._pelrp().notifier.sent == 1
    assert client.app.state.pelrp_service.listener.received == 1
