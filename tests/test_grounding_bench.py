"""Grounding cases and their measurement (references/grounding, which the benchmark
bench/quality/grounding runs): the shipped snapshot, the cases, ContextCite's ablated prompts,
and one real check on the default model: on the first three dev cases our top-ranked document
is the one the answer came from, and removing it costs the answer far more log-probability than
removing a random document. ContextCite (its own environment, 64 forwards per case) is not run
here; `python -m bench.quality.grounding` runs it. No timing is asserted.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from references.grounding.evaluate import (  # noqa: E402
    RANDOM,
    answer_source,
    prompt_for,
    run_case,
    subset_texts,
)
from references.grounding.tasks import (  # noqa: E402
    DOCUMENTS_PER_CASE,
    load_cases,
    load_packages,
    names_answer,
    words,
)

CHECK_CASES = 3
# Chosen on the dev split (docs/grounding-benchmark.md): the library's `share`, and margins
# well inside what these three cases show in the committed run (top-1 right on 3/3; removing
# our top document costs 12.2, 27.2, 20.1 nats against 3.5, 12.3, 5.5 for a random one, a mean
# difference of 12.8 nats).
SCORE = "share"
MIN_TOP1 = 2
MIN_DROP_OVER_RANDOM = 5.0  # nats


def test_snapshot_is_shipped_and_split():
    packages = load_packages()
    assert len(packages) >= 100
    splits = {p["split"] for p in packages}
    assert splits == {"dev", "test"}
    for p in packages:
        assert p["description"].split() and p["synopsis"]
        assert p["name"].lower() not in words(p["synopsis"])  # the question can't give it away


@pytest.mark.parametrize("split", ["dev", "test"])
def test_cases_have_the_answer_in_exactly_one_document(split):
    cases = load_cases(split)
    assert len(cases) >= 50
    positions = [c.gold for c in cases]
    assert set(positions) == set(range(DOCUMENTS_PER_CASE))  # the gold position varies
    for c in cases:
        assert len(c.documents) == DOCUMENTS_PER_CASE
        holding = [i for i, d in enumerate(c.documents) if c.gold_name.lower() in words(d)]
        assert holding == [c.gold], c.case_id
        for name in c.names:
            assert name.lower() not in words(c.question), c.case_id


def test_answer_source_is_the_first_named_document():
    names = ["curl", "bash", "ca-certificates", "dash"]
    assert answer_source("Document 1:\nPackage: ca-certificates\nbash is", names) == 2
    assert answer_source("The package is bash, not dash.", names) == 1
    assert answer_source("Document 3:", names) is None
    assert answer_source("curly braces", names) is None  # whole words only
    assert names_answer("Package: dash.", "dash") and not names_answer("dashboard", "dash")


def test_contextcite_ablations_are_the_library_rendering(smollm2):
    from vllm_pelrp.grounding import render_documents

    case = load_cases("dev", 1)[0]
    texts = subset_texts(case)
    assert len(texts) == 2 ** DOCUMENTS_PER_CASE
    assert texts["1111"] == render_documents(case.question, case.documents)[0]
    assert texts["0100"] == render_documents(case.question, [case.documents[1]])[0]
    empty = texts["0000"]
    assert case.question in empty and not re.search(r"Document \d", empty)
    # removing a source = the prompt rendered without it (the same for every method)
    kept = [0, 2, 3]
    ids = prompt_for(smollm2, case, kept)
    user = smollm2.tokenizer.decode(ids)
    assert case.documents[1] not in user and all(case.documents[i] in user for i in kept)


@pytest.mark.slow
def test_top_source_is_the_answers_source_and_matters(smollm2, one_thread):
    args = argparse.Namespace(max_new_tokens=16, num_ablations=64, prefix_ablations=[])
    records = [run_case(smollm2, case, args, None, index)
               for index, case in enumerate(load_cases("dev", CHECK_CASES))]
    ours = f"ours[{SCORE}]"
    top1 = [r["methods"][ours]["top1_answer"] for r in records]
    drop = [r["methods"][ours]["drop1"] for r in records]
    random_drop = [r["methods"][RANDOM]["drop1"] for r in records]
    print("answers:", [r["answer"] for r in records], "sources:", [r["answer_source"] for r in records])
    print("top-1 right:", top1, "drops:", drop, "random:", random_drop)
    assert all(r["answer_source"] is not None for r in records)  # each answer names a document
    assert sum(bool(t) for t in top1) >= MIN_TOP1, top1
    assert float(np.mean(drop)) - float(np.mean(random_drop)) >= MIN_DROP_OVER_RANDOM, (drop, random_drop)
    for r in records:  # removing our top source never costs less than removing a random one
        assert r["methods"][ours]["drop1"] >= r["methods"][RANDOM]["drop1"], r["case"]
