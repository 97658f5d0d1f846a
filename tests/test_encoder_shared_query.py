"""An explained ``/score`` shares its query (``pipeline.compute_similarities``): one query against
N documents runs the query's forward once and its backward once, with one seed row per document,
and every pair's explanation (both sides' token, positional and token-type relevance, what the
softmax and the biases absorb, the cosine) equals the pair computed alone, on a tiny random BERT.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tiny_additive import tiny_additive
from vllm_pelrp import pipeline
from vllm_pelrp.engine.additive import relevance_from_forward, run_forward
from vllm_pelrp.engine.heads import HeadTargetError, Pooling, similarity_seeds
from vllm_pelrp.models import architecture_for
from vllm_pelrp.serving.encoder_worker import EncoderWorkerMixin

TOL = 1e-5
QUERY = [2, 17, 33, 5, 60, 8, 1]
DOCUMENTS = [[2, 9, 11, 1], [2, 40, 41, 42, 43, 44, 45, 46, 47, 1], [2, 70, 1],
             [2, 17, 33, 5, 1], [2, 88, 12, 13, 14, 99, 1], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1],
             [2, 55, 56, 1], [2, 21, 22, 23, 24, 25, 1]]
FIELDS = ("token", "position_embedding", "token_type", "target_logit", "softmax_absorbed",
          "bias_absorbed", "embedding_bias_absorbed", "head_bias_absorbed")


@pytest.fixture(scope="module")
def weights():
    model = tiny_additive("bert")
    return architecture_for(model.config).weights_from_hf(model)


def _jobs(mode: str, query=QUERY, documents=DOCUMENTS) -> list[pipeline.EncoderJob]:
    return [pipeline.EncoderJob(texts=[query, d], target={"similarity": 1}, mode=mode)
            for d in documents]


def _per_pair(weights, query: list[int], document: list[int], mode: str, pooling: Pooling):
    """The pair alone, written out: both forwards, both seeds, a one-row backward each."""
    first = run_forward(weights, torch.tensor(query))
    second = run_forward(weights, torch.tensor(document))
    seeds = similarity_seeds(first.final_hidden, second.final_hidden, pooling)
    return ([relevance_from_forward(weights, forward, seed, mode)
             for forward, seed in ((first, seeds.first), (second, seeds.second))],
            float(seeds.cosine))


def _assert_same(result: pipeline.EncoderResult, reference) -> None:
    sides, cosine = reference
    assert abs(result.value - cosine) < TOL
    for side, expected in zip(result.texts, sides, strict=True):
        got = side.relevance()
        for name in FIELDS:
            a, b = getattr(got, name), getattr(expected, name)
            assert a.shape == b.shape, name
            assert torch.allclose(a, b, atol=TOL, rtol=0), (name, (a - b).abs().max())


@pytest.mark.parametrize("mode, pooling", [("pa-lrp", Pooling("mean", True)),
                                           ("attnlrp", Pooling("cls", False))])
def test_one_query_forward_and_backward_for_all_documents_each_pair_as_alone(
        weights, monkeypatch, mode, pooling):
    forwards, backwards = [], []
    forward, backward = pipeline.run_additive_forward, pipeline.relevance_from_forward

    def counted_forward(w, ids, *args):
        forwards.append(ids.tolist())
        return forward(w, ids, *args)

    def counted_backward(w, passed, seed, *args):
        backwards.append((len(passed.embedding.parts.word), seed.num_rows))
        return backward(w, passed, seed, *args)

    monkeypatch.setattr(pipeline, "run_additive_forward", counted_forward)
    monkeypatch.setattr(pipeline, "relevance_from_forward", counted_backward)
    jobs = _jobs(mode)
    assert pipeline.shared_query_groups(jobs) == [list(range(len(DOCUMENTS)))]
    results = pipeline.compute_similarities(weights, jobs, pooling=pooling)
    assert forwards.count(QUERY) == 1 and len(forwards) == 1 + len(DOCUMENTS)
    assert (len(QUERY), len(DOCUMENTS)) in backwards  # the query: once, one row per document
    assert sorted(backwards) == sorted([(len(QUERY), len(DOCUMENTS))]
                                       + [(len(d), 1) for d in DOCUMENTS])
    monkeypatch.undo()
    for document, result in zip(DOCUMENTS, results, strict=True):
        _assert_same(result, _per_pair(weights, QUERY, document, mode, pooling))
    if mode == "pa-lrp":  # positional relevance is there to compare
        assert results[1].texts[0].relevance().position_embedding.abs().sum() > 1e-3


def test_a_document_without_a_cosine_fails_alone(weights, monkeypatch):
    """A document whose cosine is undefined gets its TargetError; the others their results."""
    def seeds(hidden_a, hidden_b, pooling):
        if hidden_b.shape[0] == len(DOCUMENTS[2]):
            raise HeadTargetError("a text's pooled embedding is zero: its cosine is undefined")
        return similarity_seeds(hidden_a, hidden_b, pooling)

    monkeypatch.setattr(pipeline, "similarity_seeds", seeds)
    pooling = Pooling("mean", True)
    results = pipeline.compute_similarities(weights, _jobs("pa-lrp"), pooling=pooling)
    assert isinstance(results[2], pipeline.TargetError)
    monkeypatch.undo()
    for number in (0, 7):
        _assert_same(results[number], _per_pair(weights, QUERY, DOCUMENTS[number], "pa-lrp",
                                                pooling))


def test_the_worker_groups_by_query_and_answers_in_job_order(weights):
    """Interleaved queries and a job of another target: grouped by query, replies in order,
    each equal to its job computed alone; the budget counts a shared query once."""
    pooling = Pooling("mean", True)
    other = [2, 30, 31, 1]
    jobs = [*_jobs("pa-lrp", QUERY, DOCUMENTS[:2]), *_jobs("pa-lrp", other, DOCUMENTS[2:3]),
            pipeline.EncoderJob(texts=[QUERY], target={"dimension": 3}, mode="pa-lrp"),
            *_jobs("pa-lrp", QUERY, DOCUMENTS[3:4]), *_jobs("attnlrp", QUERY, DOCUMENTS[4:5])]
    groups = pipeline.shared_query_groups(jobs)
    assert groups == [[0, 1, 4], [2], [3], [5]]
    assert pipeline.encoder_passes(jobs)[0] == [(3, len(QUERY)), (1, len(DOCUMENTS[0])),
                                                (1, len(DOCUMENTS[1])), (1, len(DOCUMENTS[3]))]
    state = SimpleNamespace(error=None, encoder_pooling=pooling, encoder_head=None,
                            weights=weights, pool=None, serial=True, cancelled=set())
    worker = SimpleNamespace(_pelrp=lambda: state, _pelrp_cancelled=lambda s, t: False,
                             _pelrp_encoder_group=EncoderWorkerMixin._pelrp_encoder_group)
    replies = EncoderWorkerMixin._pelrp_run_encoder(worker, [j.model_dump() for j in jobs], None)
    assert len(replies) == len(jobs) and all("error" not in r for r in replies)
    for job, reply in zip(jobs, replies):
        alone = pipeline.compute_encoder(weights, job, pooling=pooling)
        got = pipeline.EncoderResult.model_validate(reply)
        assert abs(got.value - alone.value) < TOL
        for mine, theirs in zip(got.texts, alone.texts, strict=True):
            for name in FIELDS:
                a, b = getattr(mine.relevance(), name), getattr(theirs.relevance(), name)
                assert torch.allclose(a, b, atol=TOL, rtol=0), name


def test_a_cancel_stops_the_encoder_backward_between_layers(weights):
    """The additive engine calls the worker's checkpoint after each layer's backward (as the
    rotary engine does): a cancel that arrives during a group's backward stops it at the next
    layer, that group and every later one answer "cancelled", nothing more is computed."""
    pooling = Pooling("mean", True)
    jobs = [*_jobs("pa-lrp", QUERY, DOCUMENTS[:2]),
            pipeline.EncoderJob(texts=[QUERY], target={"dimension": 3}, mode="pa-lrp")]
    state = SimpleNamespace(error=None, encoder_pooling=pooling, encoder_head=None,
                            weights=weights, pool=None, serial=True, cancelled=set())
    checks: list[bool] = []

    def cancelled(state_, ticket):
        if len(checks) == 2:  # after the group's start and one layer: the client goes away
            state.cancelled.add(ticket)
        checks.append(ticket in state.cancelled)
        return checks[-1]

    worker = SimpleNamespace(_pelrp=lambda: state, _pelrp_cancelled=cancelled,
                             _pelrp_encoder_group=EncoderWorkerMixin._pelrp_encoder_group)
    replies = EncoderWorkerMixin._pelrp_run_encoder(worker, [j.model_dump() for j in jobs], "t")
    assert [r.get("error") for r in replies] == ["cancelled"] * 3
    # the first group's start, two layer checkpoints, then the second group's start only
    assert checks == [False, False, True, True]
    assert weights.spec.num_layers == 2


def test_checkpoints_come_once_per_layer(weights):
    calls = []
    job = pipeline.EncoderJob(texts=[QUERY], target={"dimension": 3}, mode="pa-lrp")
    pipeline.compute_encoder(weights, job, pooling=Pooling("mean"),
                             checkpoint=lambda: calls.append(1))
    assert len(calls) == weights.spec.num_layers
    calls.clear()
    pipeline.compute_similarities(weights, _jobs("pa-lrp", QUERY, DOCUMENTS[:3]),
                                  pooling=Pooling("mean", True), checkpoint=lambda: calls.append(1))
    assert len(calls) == 4 * weights.spec.num_layers  # three documents and the shared query
