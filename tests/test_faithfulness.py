"""Faithfulness (references/faithfulness, which the runner bench/quality/faithfulness drives):
the flipping protocol, the metrics, the shipped tasks, the study's statistics, and one real check
on the default model: on fixed 128-token next-token dev cases the default combination's gap
beats our AttnLRP and gradient×input by a stated margin. No timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from references.faithfulness.methods import COMBINATIONS, DEFAULT_COMBINATION, combine, pa_lrp_variants  # noqa: E402
from references.faithfulness.protocol import (  # noqa: E402
    CURVES,
    FRACTIONS,
    CaseCurves,
    Reading,
    ReadingCache,
    curve_inputs,
    n_flipped,
    summarise,
    trapezoid_auc,
)
from references.faithfulness.tasks import DATA, TASKS, load_items  # noqa: E402

NEUTRAL = 7


# ---- protocol ---------------------------------------------------------------------------------
def test_fractions_and_counts():
    assert np.allclose(FRACTIONS, np.arange(11) / 10)
    assert [n_flipped(f, 30) for f in FRACTIONS] == list(range(0, 31, 3))  # no 0.3·30 = 9.000…1 → 10
    assert [n_flipped(f, 7) for f in FRACTIONS] == [0, 1, 1, 2, 3, 4, 4, 5, 6, 6, 7]


def test_flipping_is_in_place_and_ordered():
    ids = list(range(100, 112))
    mutable = list(range(2, 11))  # first two and last one fixed
    relevance = np.array([0.5, -1.0, 3.0, 0.0, 2.0, -2.0, 1.0, 0.1, -0.5])
    inputs = curve_inputs(ids, mutable, relevance, NEUTRAL)
    for name in CURVES:
        seqs = inputs[name]
        assert len(seqs) == len(FRACTIONS)
        for f, seq in zip(FRACTIONS, seqs):
            assert len(seq) == len(ids)  # positions unchanged: same length, no shifting
            for i in range(len(ids)):
                assert seq[i] in (ids[i], NEUTRAL)  # each position holds its own token or neutral
                if i not in mutable:
                    assert seq[i] == ids[i]
            replaced = sum(s == NEUTRAL for s in seq)
            n = n_flipped(f, len(mutable))
            assert replaced == (n if name.startswith("deletion") else len(mutable) - n)
    order = [mutable[i] for i in np.argsort(-relevance)]  # most relevant (signed) first
    deleted = inputs["deletion_morf"][1]  # 10% of 9 → 1 token
    assert deleted[order[0]] == NEUTRAL and sum(s == NEUTRAL for s in deleted) == 1
    inserted = inputs["insertion_morf"][2]  # 20% of 9 → 2 tokens restored
    assert inserted[order[0]] == ids[order[0]] and inserted[order[1]] == ids[order[1]]
    lerf = inputs["deletion_lerf"][1]
    assert lerf[order[-1]] == NEUTRAL  # least relevant = most negative
    # endpoints: deletion starts from the input, insertion ends at it; all-neutral at the other end
    assert inputs["deletion_morf"][0] == tuple(ids) == inputs["insertion_lerf"][-1]
    assert inputs["deletion_lerf"][-1] == inputs["insertion_morf"][0]
    # deleting the top n = inserting the bottom N − n (exact when f·N never ends in .5)
    even = curve_inputs(ids, list(range(2, 12)), np.arange(10.0), NEUTRAL)
    assert even["deletion_morf"][::-1] == even["insertion_lerf"]
    assert even["deletion_lerf"][::-1] == even["insertion_morf"]


def test_auc_and_gaps():
    assert trapezoid_auc([1.0] * 11) == pytest.approx(1.0)
    assert trapezoid_auc(FRACTIONS) == pytest.approx(0.5)
    curves = {name: {"logit": [0.0] * 11, "prob": [0.0] * 11, "nprob": [0.0] * 11, "sqdrop": [0.0] * 11}
              for name in CURVES}
    curves["deletion_lerf"]["prob"] = [1.0] * 11
    curves["insertion_morf"]["prob"] = list(FRACTIONS)
    aucs = summarise(curves)
    assert aucs["deletion_gap_prob"] == pytest.approx(1.0)
    assert aucs["insertion_gap_prob"] == pytest.approx(0.5)
    assert aucs["score_prob"] == pytest.approx(0.75)
    assert aucs["paper_generate_AU_AC"] == pytest.approx(0.5)
    assert aucs["paper_pruning_AU_AC"] == pytest.approx(1.0)


def test_normalised_probability_and_the_gap():
    """nprob = min(p/p0, 1): 1 on the input, capped when a flip makes the target likelier;
    gap = deletion gap + insertion gap."""
    ids = list(range(10, 20))
    inputs = curve_inputs(ids, list(range(10)), np.arange(10.0), 0)
    probs = {tuple(ids): 0.4}

    def read_batch(seqs):
        return [Reading(logit=0.0, prob=probs.get(s, 0.1 * sum(t == 0 for t in s) / 10 + 0.05))
                for s in seqs]

    cache = ReadingCache(read_batch)
    read = cache.read([tuple(ids)] + [s for seqs in inputs.values() for s in seqs])
    curves = CaseCurves.from_readings(inputs, read, read[tuple(ids)])
    for name in CURVES:
        nprob = curves.curves[name]["nprob"]
        assert all(0.0 <= v <= 1.0 for v in nprob)
        assert nprob == [min(p / 0.4, 1.0) for p in curves.curves[name]["prob"]]
    assert curves.curves["deletion_morf"]["nprob"][0] == 1.0
    a = curves.aucs
    assert a["gap_nprob"] == pytest.approx(a["deletion_gap_nprob"] + a["insertion_gap_nprob"])
    assert a["gap_prob"] == pytest.approx(2 * a["score_prob"])


def test_readings_are_deduplicated_and_squared_drop():
    calls = []

    def read_batch(seqs):
        calls.append(len(seqs))
        return [Reading(logit=float(sum(s)), prob=0.5) for s in seqs]

    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    inputs = curve_inputs(ids, list(range(10)), np.arange(10.0), 0)
    cache = ReadingCache(read_batch, batch_size=4)
    wanted = [tuple(ids)] + [s for seqs in inputs.values() for s in seqs]
    read = cache.read(wanted)
    assert cache.evaluated == len(set(wanted)) < len(wanted)
    curves = CaseCurves.from_readings(inputs, read, read[tuple(ids)])
    assert curves.curves["deletion_morf"]["sqdrop"][0] == 0.0
    assert curves.curves["deletion_morf"]["sqdrop"][-1] == pytest.approx(55.0**2)


# ---- combinations ------------------------------------------------------------------------------
def test_combinations():
    token = np.array([1.0, -2.0, 0.5])
    cos = np.array([[0.1, -0.3, 0.0], [0.0, 0.2, -0.1]])
    sin = np.zeros_like(cos)
    single_abs = combine(token, cos, sin, signed=False, per_part=False)
    expected = token + np.abs(cos).sum(0)
    assert np.allclose(single_abs, expected / np.abs(expected).max())
    signed = combine(token, cos, sin, signed=True, per_part=False)
    expected = token + cos.sum(0)
    assert np.allclose(signed, expected / np.abs(expected).max())
    variants = pa_lrp_variants(token, cos, sin)
    assert set(COMBINATIONS) <= set(variants) and DEFAULT_COMBINATION in COMBINATIONS
    assert np.allclose(variants["pa-lrp token-only"], token)
    assert (variants["pa-lrp position-only"] >= 0).all()


# ---- data --------------------------------------------------------------------------------------
def test_shipped_tasks():
    assert (DATA / "SOURCES.md").is_file()
    for task in TASKS:
        items = load_items(task)
        assert len(items) > 300
        ids = [item["id"] for item in items]
        assert len(set(ids)) == len(ids)
        splits = {item["split"] for item in items}
        assert splits == {"dev", "test"}
    for item in load_items("quiz"):
        assert len(item["choices"]) == 4 and 0 <= item["answer"] < 4
        assert len(set(item["choices"])) == 4
    json.dumps(load_items("nexttoken")[0])


def test_prose_data(smollm2):
    """The technical-prose passages: every record names its manual, package and licence; no
    Python documentation; both splits hold at least 150 passages of 513 tokens or more."""
    items = load_items("prose")
    assert len({item["id"] for item in items}) == len(items) >= 300
    for item in items:
        assert item["manual"] and item["package"] and item["version"] and item["license"]
        assert "python" not in (item["manual"] + item["package"]).lower()
        assert item["text"].isascii() and len(item["text"].split()) >= 420
    long_enough = {"dev": 0, "test": 0}
    for item in items:
        if len(smollm2.tokenizer(item["text"])["input_ids"]) >= 513:
            long_enough[item["split"]] += 1
    assert min(long_enough.values()) >= 150, long_enough


# ---- the study's statistics (references/faithfulness/statistics.py) --------------------------------------
def _records(gaps: dict[str, list[float]]) -> list[dict]:
    count = len(next(iter(gaps.values())))
    return [{"id": f"c{i}", "methods": {m: {"aucs": {"gap_nprob": v[i]}, "time_s": 1.0}
                                       for m, v in gaps.items()}} for i in range(count)]


def test_study_paired_statistics_and_choice(tmp_path):
    from references.faithfulness import statistics as study

    base = [0.5, 0.9, 0.2, 0.7, 0.4, 0.6, 0.3, 0.8, 0.55, 0.65]
    records = _records({study.BASELINE: base,
                        "pa-lrp[abs,single]": [b + 0.1 + 0.01 * (i % 2) for i, b in enumerate(base)],
                        "pa-lrp token-only": [b + (0.05 if i % 2 else -0.05) for i, b in enumerate(base)],
                        "grad-x-input": [b - 0.3 for b in base]})
    stats = study.setting_stats(records)
    assert stats["pa-lrp[abs,single]"]["verdict"] == "beats"
    assert stats["pa-lrp[abs,single]"]["delta"] == pytest.approx(0.105)
    assert stats["pa-lrp token-only"]["verdict"] == "ties"
    assert stats["grad-x-input"]["verdict"] == "loses"
    assert stats[study.BASELINE]["ratio"] == pytest.approx(1.0)
    assert stats["pa-lrp[abs,single]"]["ratio"] == pytest.approx((np.mean(base) + 0.105) / np.mean(base))
    few = study.setting_stats(records[:3])  # three cases: no verdict, whatever the difference
    assert few["grad-x-input"]["verdict"] == f"(n < {study.MIN_CASES_FOR_VERDICT})"
    # the choice: mean paired difference over every dev setting of every model
    for model, setting, shift in (("m1", "prose@128", 0.2), ("m2", "quiz", -0.3)):
        path = study.records_path(tmp_path, model, setting, "dev")
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = _records({study.BASELINE: base,
                         "pa-lrp[abs,single]": [b + shift for b in base],
                         "pa-lrp token-only": [b + 0.01 for b in base]})
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    winner, selection = study.choose(tmp_path, ["m1", "m2"])
    assert winner == "pa-lrp token-only"  # +0.01 everywhere beats +0.2 on one and -0.3 on the other
    assert selection["mean_delta"]["pa-lrp[abs,single]"] == pytest.approx(-0.05)


# ---- the real check on the default model (CI) -----------------------------------------------------
# Fixed cases: the first CHECK_CASES dev passages of the prose task at 128 tokens (never the test
# split), on SmolLM2-135M-Instruct, fp32, one thread: the default combination against our
# AttnLRP and gradient×input, by the study's gap (deletion + insertion gap of min(p/p0, 1)).
# Measured when the margins were set (mean over the 4 cases): default (abs-single-w0.25) 1.438,
# AttnLRP 1.030, gradient×input -0.214, i.e. leads of 0.41 and 1.65. The margins are about half
# of that: a default that lost its lead, or a broken engine, fails; float noise does not.
CHECK_CASES = 4
MARGIN_OVER_ATTNLRP = 0.20
MARGIN_OVER_GRAD_X_INPUT = 1.0


@pytest.mark.slow
def test_default_beats_attnlrp_and_gradient_x_input(smollm2, one_thread):
    from references.faithfulness import statistics as study
    from references.faithfulness.evaluate import bind, case_record
    from references.faithfulness.tasks import task_case

    bind(smollm2)
    items = [i for i in load_items("prose") if i["split"] == "dev"
             and task_case("prose", i, smollm2.tokenizer, 128) is not None][:CHECK_CASES]
    names = ["PA-LRP", study.BASELINE, study.GRADIENT]
    gaps = {name: [] for name in names}
    for item in items:
        record = case_record("prose", 128, item, names, DEFAULT_COMBINATION)
        for name in names:
            gaps[name].append(record["methods"][name]["aucs"][study.KEY])
    mean = {name: float(np.mean(v)) for name, v in gaps.items()}
    print("gaps on the fixed cases:", mean)
    assert mean["PA-LRP"] - mean[study.BASELINE] >= MARGIN_OVER_ATTNLRP, mean
    assert mean["PA-LRP"] - mean[study.GRADIENT] >= MARGIN_OVER_GRAD_X_INPUT, mean


# ---- the retrieval task (all-MiniLM-L6-v2, the query–document cosine) ----------------------------
def test_retrieval_data():
    """The frozen pairs: small, unique ids, both splits, and no query copies its document."""
    from references.faithfulness.data.build_retrieval import QUERY_TEMPLATE

    assert (DATA / "retrieval.jsonl").stat().st_size <= 100_000
    items = load_items("retrieval")
    assert len(items) >= 100
    assert len({item["id"] for item in items}) == len(items)
    assert {item["split"] for item in items} == {"dev", "test"}
    assert sum(item["split"] == "dev" for item in items) >= 40
    assert sum(item["split"] == "test" for item in items) >= 60
    prefix, suffix = QUERY_TEMPLATE.split("{}")
    for item in items:
        assert item["query"].startswith(prefix) and item["query"].endswith(suffix)
        synopsis = item["query"][len(prefix):-len(suffix)]
        assert " ".join(synopsis.lower().split()) not in " ".join(item["document"].lower().split())
        assert 20 <= len(item["document"].split()) <= 60 and item["package"]


@pytest.mark.slow
def test_retrieval_end_to_end(one_thread):
    """Two dev pairs through the retrieval task's methods and flipping (no LXT, 4 IG steps):
    shapes, document-only in-place flipping, the unflipped cosine at the curves' ends, and
    random's curves unlike PA-LRP's."""
    from vllm_pelrp import load_explainer

    from references.faithfulness.retrieval import (
        PALRP, RANDOM, REFERENCE, RetrievalMethods, load_retrieval_cases, neutral_token,
        run_split, summarise)

    ex = load_explainer("all-MiniLM-L6-v2")
    neutral_id, text = neutral_token(ex.tokenizer)
    assert text == "." and neutral_id not in ex.tokenizer.all_special_ids
    methods = RetrievalMethods(ex, neutral_id, ig_steps=4, random_seeds=2)
    cases = load_retrieval_cases("dev", 2, ex.tokenizer)
    assert len(cases) == 2
    for case in cases:  # [CLS] and [SEP] stay; every other document token may flip
        assert case.mutable == list(range(1, len(case.doc_ids) - 1))
    wanted = [PALRP, REFERENCE, "integrated-gradients", "attention-last", RANDOM]
    per_case, times, cost = run_split(methods, cases, wanted, neutral_id, None, 64, "check")
    assert set(per_case) == set(wanted) and set(times) == set(wanted)
    for name, curves in per_case.items():
        assert len(curves) == 2
        for case, c in zip(cases, curves):
            assert set(c.curves) == set(CURVES)
            assert all(len(c.curves[k]["cosine"]) == len(FRACTIONS) for k in CURVES)
            cosine = methods.engine_value[case.item_id]  # the engine's cosine = the HF model's
            assert c.curves["deletion_morf"]["cosine"][0] == pytest.approx(cosine, abs=1e-5)
            assert c.curves["insertion_morf"]["cosine"][-1] == pytest.approx(cosine, abs=1e-5)
            assert c.aucs["deletion_gap"] == pytest.approx(
                c.aucs["deletion_lerf"] - c.aucs["deletion_morf"])
    assert len(per_case[RANDOM][0].aucs["per_seed_score"]) == 2
    for case_index in range(2):
        pa, rnd = per_case[PALRP][case_index], per_case[RANDOM][case_index]
        assert not np.allclose(pa.curves["deletion_morf"]["cosine"], rnd.curves["deletion_morf"]["cosine"])
    summary = summarise(per_case)
    assert summary[PALRP]["n"] == 2 and "vs_reference" in summary[PALRP]
    assert cost["forwards"] > 0
