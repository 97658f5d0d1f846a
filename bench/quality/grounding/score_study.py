"""Dev-split study: which one-pass per-source number best predicts the removal drops?

    python -m bench.quality.grounding.score_study [--n-dev 40] [--out score_study.json]

For each dev case (the same cases, answers and removal operation as ``python -m
bench.quality.grounding``) it explains the model's answer once with ``target="completion"`` (the sum of
the answer tokens' logits, the library's grounding) and once from the answer's log-probability
(seeded, per answer position, with +1 on the answer token and -p_k on the K most likely tokens:
the gradient of log p, truncated to K tokens), then ranks the four documents by each candidate
number and reads the top-1 and top-2 removal drops, under two removal operations:

* ``renumbered`` (the benchmark's): the kept documents are rendered again, numbered 1, 2, …;
* ``numbers kept``: the kept documents keep their original "Document n" headers, so removing
  one document leaves every other document's text unchanged.

Oracle = the best single / pair by exhaustive removal. Only the dev split is read: the test
split stays for the benchmark's report.

    python -m bench.quality.grounding.score_study --two-pass-from score_study.json

checks a greedy second pass on the saved cases: explain the same answer again with the
top-``share`` document removed (renumbered), take the top of that pass as the second source,
and compare its top-2 drop with the one-pass ranking's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from vllm_pelrp import load_explainer
from vllm_pelrp.engine.backward import (
    LogitSeeds,
    final_logits,
    relevance_from_layer_inputs,
    run_forward,
)
from vllm_pelrp.grounding import DOCUMENT_HEADER, DOCUMENT_INSTRUCTION, QUESTION_HEADER, SEPARATOR

from references.grounding.evaluate import answer_logprob, answer_source, generate_answer, prompt_for
from references.grounding.tasks import load_cases

TOP_K = 64


def prompt_numbers_kept(ex, case, kept) -> list[int]:
    """The prompt with only ``kept`` documents, each under its original number."""
    parts = [DOCUMENT_INSTRUCTION]
    for i in kept:
        parts += [SEPARATOR + DOCUMENT_HEADER.format(number=i + 1), case.documents[i]]
    parts += [SEPARATOR, QUESTION_HEADER, case.question]
    return ex.encode_prompt(messages=[{"role": "user", "content": "".join(parts)}])


def logprob_relevance(ex, ids: list[int], prompt_length: int, answer: list[int]):
    """Token and positional relevance of log p(answer), truncated to the TOP_K likeliest tokens."""
    positions = torch.arange(len(ids))
    forward = run_forward(ex.weights, torch.tensor(ids), positions)
    predicting = list(range(prompt_length - 1, prompt_length - 1 + len(answer)))
    probs = final_logits(ex.weights, forward.last_output[predicting]).softmax(-1)
    top_p, top_ids = probs.topk(TOP_K, -1)
    pos, tok, weight = [], [], []
    for j, p in enumerate(predicting):
        pos += [p] * (TOP_K + 1)
        tok += [answer[j]] + top_ids[j].tolist()
        weight += [1.0] + (-top_p[j]).tolist()
    seeds = LogitSeeds(torch.tensor([pos]), torch.tensor([tok]), torch.tensor([weight]))
    result = relevance_from_layer_inputs(ex.weights, forward.layer_inputs, positions, seeds)
    return result.token[0].tolist(), result.positional[0].tolist()


def removal_table(ex, case, answer: list[int], render) -> dict[tuple[int, ...], float]:
    n = len(case.documents)
    table = {}
    for removed in itertools.chain([()], itertools.combinations(range(n), 1),
                                   itertools.combinations(range(n), 2)):
        kept = [i for i in range(n) if i not in removed]
        table[removed] = answer_logprob(ex.hf_model, render(ex, case, kept), answer)
    return table


def candidate_scores(spans, tok, pos, lp_tok, lp_pos) -> dict[str, list[float]]:
    tok, pos, lp_tok, lp_pos = map(np.asarray, (tok, pos, lp_tok, lp_pos))

    def per(f):
        return [float(f(a, b)) for a, b in spans]

    return {
        "share (library)": per(lambda a, b: np.abs(tok[a:b]).sum() + np.abs(pos[a:b]).sum()),
        "token_share": per(lambda a, b: np.abs(tok[a:b]).sum()),
        "relevance (signed)": per(lambda a, b: tok[a:b].sum() + pos[a:b].sum()),
        "token_relevance": per(lambda a, b: tok[a:b].sum()),
        "positional_relevance": per(lambda a, b: pos[a:b].sum()),
        "positive part": per(lambda a, b: np.clip(tok[a:b], 0, None).sum()
                             + np.clip(pos[a:b], 0, None).sum()),
        "largest token": per(lambda a, b: np.abs(tok[a:b]).max()),
        "log p: relevance": per(lambda a, b: lp_tok[a:b].sum() + lp_pos[a:b].sum()),
        "log p: share": per(lambda a, b: np.abs(lp_tok[a:b]).sum() + np.abs(lp_pos[a:b]).sum()),
        "log p: positive part": per(lambda a, b: np.clip(lp_tok[a:b], 0, None).sum()
                                    + np.clip(lp_pos[a:b], 0, None).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-dev", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None, help="write every case as JSON here")
    parser.add_argument("--two-pass-from", type=Path, default=None,
                        help="a saved --out file: check the greedy second pass on its cases")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ex = load_explainer()
    if args.two_pass_from:
        two_pass(ex, json.loads(args.two_pass_from.read_text()))
        return
    operations = {"renumbered": lambda e, c, kept: prompt_for(e, c, kept),
                  "numbers kept": prompt_numbers_kept}
    records = []
    for case in load_cases("dev", args.n_dev):
        started = time.perf_counter()
        prompt = prompt_for(ex, case, range(len(case.documents)))
        answer = generate_answer(ex, prompt, 16)
        if not answer:
            continue
        explanation = ex.explain(messages=[{"role": "user", "content": case.question}],
                                 documents=case.documents, completion=answer,
                                 target="completion", sentences=False)
        spans = [(s.token_start, s.token_end) for s in explanation.grounding.sources]
        lp_tok, lp_pos = logprob_relevance(ex, prompt + answer, len(prompt), answer)
        scores = candidate_scores(spans, explanation.token_relevance,
                                  explanation.positional_relevance, lp_tok, lp_pos)
        source = answer_source(ex.tokenizer.decode(answer), case.names)
        record = {"case": case.case_id, "answer_source": source, "scores": scores,
                  "removals": {}}
        for name, render in operations.items():
            table = removal_table(ex, case, answer, render)
            record["removals"][name] = {",".join(map(str, k)): v for k, v in table.items()}
        records.append(record)
        print(f"{case.case_id}: {time.perf_counter() - started:.1f}s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(records))
    report(records, list(operations))


def two_pass(ex, records: list[dict]) -> None:
    cases = {case.case_id: case for case in load_cases("dev", 10_000)}
    one, two, oracle = [], [], []
    for record in records:
        case = cases[record["case"]]
        answer = generate_answer(ex, prompt_for(ex, case, range(len(case.documents))), 16)
        share = record["scores"]["share (library)"]
        order = [int(i) for i in np.argsort(-np.asarray(share), kind="stable")]
        kept = order[1:]
        kept.sort()
        again = ex.explain(messages=[{"role": "user", "content": case.question}],
                           documents=[case.documents[i] for i in kept], completion=answer,
                           target="completion", sentences=False)
        second = kept[int(np.argmax([s.share for s in again.grounding.sources]))]
        table = record["removals"]["renumbered"]
        full = table[""]

        def drop(pair):
            return full - table[",".join(map(str, sorted(pair)))]

        one.append(drop(order[:2]))
        two.append(drop([order[0], second]))
        oracle.append(max(drop(p) for p in itertools.combinations(range(len(share)), 2)))
        print(f"{record['case']}: one pass {one[-1]:.2f}, two passes {two[-1]:.2f}, "
              f"oracle {oracle[-1]:.2f}", flush=True)
    diff = np.asarray(two) - np.asarray(one)
    print(f"\ntop-2 drop over {len(one)} dev cases (renumbered removal): one pass "
          f"{np.mean(one):.2f}, greedy two passes {np.mean(two):.2f} (paired "
          f"{diff.mean():+.2f} ± {diff.std(ddof=1) / np.sqrt(len(diff)):.2f}), oracle "
          f"{np.mean(oracle):.2f}")


def report(records: list[dict], operations: list[str]) -> None:
    names = list(records[0]["scores"])
    for operation in operations:
        print(f"\n## {operation} ({len(records)} dev cases)\n")
        print("| per-source number | top-1 (answer source) | drop, top-1 | drop, top-2 |")
        print("|---|---|---|---|")
        rows: dict[str, list] = {name: [] for name in names + ["oracle (exhaustive removal)"]}
        for r in records:
            table = {tuple(int(i) for i in k.split(",") if i): v
                     for k, v in r["removals"][operation].items()}
            full = table[()]
            n = len(r["scores"][names[0]])
            for name in names:
                order = list(np.argsort(-np.asarray(r["scores"][name]), kind="stable"))
                hit = None if r["answer_source"] is None else order[0] == r["answer_source"]
                rows[name].append((hit, full - table[(order[0],)],
                                   full - table[tuple(sorted(order[:2]))]))
            rows["oracle (exhaustive removal)"].append((None, max(full - table[(i,)] for i in range(n)),
                max(full - table[p] for p in itertools.combinations(range(n), 2))))
        for name, values in rows.items():
            hits = [h for h, _, _ in values if h is not None]
            accuracy = f"{np.mean(hits):.3f}" if hits else "—"
            print(f"| {name} | {accuracy} | {np.mean([d for _, d, _ in values]):.2f} | "
                  f"{np.mean([d for _, _, d in values]):.2f} |")


if __name__ == "__main__":
    main()
