"""Grounding benchmark: which document did the answer come from? One-pass PA-LRP source
attribution (``explanation.grounding``) against ContextCite, same cases, same model, same run.

    python -m bench.quality.grounding                    # default model and size (~30 min on 2 busy cores)
    python -m bench.quality.grounding --n-dev 12 --n-test 16 --no-contextcite   # ours only, quick

Steps: (1) dev split, ours only: which per-source number ranks the sources (``share``,
``token_share``, signed ``relevance`` = token + positional relevance, signed
``token_relevance``); the best top-1 accuracy against the answer's source wins (ties: the larger
top-1 removal drop). (2) test split: the winner against ContextCite (64 ablations, its default,
and the first 32 of them), leave-one-out ablation and random order, case by case, with the
methods' timings interleaved. Writes ``results.json`` and ``results.md`` into ``--out``.

Cases and the removal of a source: ``references/grounding/tasks.py``; one case measured, and the
metrics (top-1 accuracy against the answer's source and the gold document, the answer's
log-probability drop with the top one or two sources removed, time per explanation):
``references/grounding/evaluate.py`` and docs/grounding-benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from bench.quality.runs import RunCost, cost_sentence, load_model
from references.grounding.evaluate import (
    LOO,
    OURS,
    RANDOM,
    SCORES,
    ContextCiteWorker,
    choose_score,
    contextcite_name,
    contextcite_python,
    mean_se,
    paired,
    run_split,
    summarise,
    warm_up,
)
from references.grounding.tasks import DEFAULT_QUESTION, DOCUMENTS_PER_CASE, QUESTION_TEMPLATES, load_cases

DEFAULT_OUT = Path(__file__).parent / "results"


# ---- report -----------------------------------------------------------------------------------
def fmt(value: tuple | float, digits: int = 2) -> str:
    if isinstance(value, tuple):
        mean, se = value[0], value[1]
        if not np.isfinite(mean):
            return "—"
        return f"{mean:.{digits}f} ± {se:.{digits}f}" if np.isfinite(se) else f"{mean:.{digits}f}"
    return f"{value:.{digits}f}"


def report(result: dict) -> str:
    test = result["test"]
    methods = test["order"]
    summary = test["summary"]
    ours_time = summary[OURS]["time_s"][0]
    lines = [f"# Grounding benchmark: {result['model']}", "",
             f"Command: `{result['command'].strip()}`", "",
             f"Cases: {result['documents_per_case']} Debian package descriptions per prompt, a "
             "question made from one package's synopsis, the model's greedy answer "
             f"(≤ {result['args']['max_new_tokens']} tokens); details in "
             "docs/grounding-benchmark.md. Mean ± standard error over cases.", "",
             f"Model answers on test: {test['n']} cases; the answer names one of the documents' "
             f"packages in {test['n_answer_source']}, the right one (gold) in {test['n_correct']} "
             f"(accuracy {test['n_correct'] / max(test['n'], 1):.2f}).", ""]
    if result.get("dev"):
        dev = result["dev"]
        lines += ["## Dev split: which per-source number ranks the sources (ours)", "",
                  f"{dev['n']} cases. Ranked by top-1 accuracy against the answer's source "
                  "(ties: top-1 drop).", "",
                  "| score | top-1 (answer source) | top-1 (gold, all) | top-1 drop (nats) |",
                  "|---|---|---|---|"]
        for name, s in dev["table"].items():
            lines.append(f"| {name} | {fmt(s['top1_answer_source'])} | {fmt(s['top1_gold_all'])} "
                         f"| {fmt(s['drop1'])} |")
        lines += ["", f"Chosen: **{dev['chosen']}** (`{OURS}` below).", ""]
    lines += ["## Test split", "",
              "| method | top-1 (answer source) ↑ | top-1 (gold, all) ↑ | top-1 (gold, correct "
              "answers) ↑ | drop, top-1 removed ↑ | drop, top-2 removed ↑ | s / explanation | "
              "time vs ours |", "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        s = summary[m]
        t = s["time_s"][0]
        ratio = "—" if not np.isfinite(t) else f"{t / ours_time:.1f}×"
        name = f"**{m}**" if m == OURS else m
        lines.append(f"| {name} | {fmt(s['top1_answer_source'])} | {fmt(s['top1_gold_all'])} | "
                     f"{fmt(s['top1_gold_correct'])} | {fmt(s['drop1'])} | {fmt(s['drop2'])} | "
                     f"{'—' if not np.isfinite(t) else f'{t:.2f}'} | {ratio} |")
    lines += ["", "Drops: log p(answer) with all documents minus log p(answer) with the method's top "
              "(top two) documents removed, in nats; `random order` is the mean over every single "
              "document (every pair), i.e. the expected drop of removing random ones. Top-1 "
              f"(answer source) counts the {test['n_answer_source']} cases whose answer names a "
              f"package; top-1 (gold, correct answers) the {test['n_correct']} answered correctly.",
              ""]
    comp = test.get("paired")
    if comp:
        lines += ["Paired differences, ours minus ContextCite (same cases; > 0: ours better):", "",
                  "| against | top-1 (answer source) | top-1 (gold, all) | drop, top-1 | drop, top-2 |",
                  "|---|---|---|---|---|"]
        for other, d in comp.items():
            lines.append(f"| {other} | {fmt(d['top1_answer'])} | {fmt(d['top1_gold'])} | "
                         f"{fmt(d['drop1'])} | {fmt(d['drop2'])} |")
        lines.append("")
    if "targets" in test:
        lines += ["## The issue's targets", ""]
        for line in test["targets"]:
            lines.append(f"- {line}")
        lines.append("")
    if "ours_with_sentence_rows" in test:
        w = test["ours_with_sentence_rows"]
        lines += [f"Ours is timed as `explain(..., sentences=False)`: the sources of the whole answer, "
                  "what ContextCite's `get_attributions()` gives. The library's default call also "
                  "explains each answer sentence as an extra row of the same backward "
                  f"({fmt(w['sentences'], 1)} sentences per answer here): {fmt(w['time_s'])} s per "
                  f"explanation, so ContextCite takes {test['time_ratio_with_sentence_rows']:.1f}× "
                  f"that; its whole-answer sources were the same in {w['same_sources']}/{test['n']} "
                  "cases.", ""]
    checks = test.get("checks")
    if checks:
        lines += [f"Same model in both environments: largest |log p(answer)| difference "
                  f"{checks['max_logprob_diff']:.2e} nats; prompt ids identical in "
                  f"{checks['prompt_ids_match']}/{test['n']} cases, answer ids in "
                  f"{checks['response_ids_match']}/{test['n']}.", ""]
    lines.append(f"{cost_sentence(result)}; torch threads {result['threads']} in each process.")
    return "\n".join(lines) + "\n"


# ---- main -------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Grounding benchmark: PA-LRP source attribution vs ContextCite.")
    p.add_argument("--model", default=None, help="LLaMA checkpoint directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--n-dev", type=int, default=12, help="dev cases (choice of the per-source score)")
    p.add_argument("--n-test", type=int, default=10,
                   help="test cases (ContextCite: 64 forwards each, 1-3 min on a shared 2-core machine)")
    p.add_argument("--documents", type=int, default=DOCUMENTS_PER_CASE, help="documents per prompt")
    p.add_argument("--question", default=DEFAULT_QUESTION, choices=list(QUESTION_TEMPLATES),
                   help="question template (references/grounding/tasks.py)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest answer")
    p.add_argument("--num-ablations", type=int, default=64, help="ContextCite ablations (its default: 64)")
    p.add_argument("--prefix-ablations", type=int, nargs="*", default=[32],
                   help="also report ContextCite cut after this many of its ablations")
    p.add_argument("--score", default=None, choices=SCORES, help="skip the dev split and rank sources by this")
    p.add_argument("--no-contextcite", action="store_true", help="skip ContextCite (.venv-contextcite)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in each process (default 1, as the faithfulness benchmark)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    run_cost = RunCost()
    ex, model_dir = load_model(args.model, args.threads)
    print(f"model {ex.name} ({model_dir}); threads {torch.get_num_threads()}", flush=True)
    result: dict[str, Any] = {
        "model": ex.name, "model_dir": str(model_dir), "documents_per_case": args.documents,
        "question_template": QUESTION_TEMPLATES[args.question],
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": "python -m bench.quality.grounding " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": torch.get_num_threads(),
    }

    # 1. dev: which per-source number ranks the sources
    chosen = args.score
    if chosen is None:
        dev_cases = load_cases("dev", args.n_dev, args.question, args.documents)
        print(f"dev: {len(dev_cases)} cases (ours only)", flush=True)
        dev_records = run_split(ex, dev_cases, args, None, "dev")
        chosen, table = choose_score(dev_records)
        result["dev"] = {"n": len(dev_records), "chosen": chosen, "table": table, "records": dev_records}
        print(f"dev: chosen score {chosen!r}", flush=True)

    # 2. test: ours (chosen) against ContextCite, leave-one-out and random
    worker = None
    if not args.no_contextcite:
        python = contextcite_python()
        if python is None:
            print("ContextCite: .venv-contextcite missing (run `bash references/contextcite_env.sh`); "
                  "skipped", flush=True)
        else:
            log = Path(tempfile.gettempdir()) / "pelrp-contextcite-worker.log"  # its stderr
            worker = ContextCiteWorker(python, model_dir, args.threads, log)
            result["contextcite_versions"] = worker.versions
    test_cases = load_cases("test", args.n_test, args.question, args.documents)
    print(f"test: {len(test_cases)} cases", flush=True)
    try:
        warm_up(ex, test_cases[0], args, worker)
        records = run_split(ex, test_cases, args, worker, "test")
    finally:
        if worker is not None:
            worker.close()
    for r in records:
        r["methods"][OURS] = r["methods"][f"ours[{chosen}]"]
        r["times"][OURS] = r["times"]["ours"]
    names = [OURS] + ([contextcite_name(args.num_ablations)]
                      + [contextcite_name(n) for n in args.prefix_ablations] if worker else [])
    names += [LOO, RANDOM] + [f"ours[{s}]" for s in SCORES if s != chosen]
    names = [m for m in names if all(m in r["methods"] for r in records)]
    summary = {m: summarise(records, m) for m in names}
    test: dict[str, Any] = {
        "n": len(records), "n_answer_source": sum(r["answer_source"] is not None for r in records),
        "n_correct": sum(r["correct"] for r in records), "order": names, "summary": summary,
        "records": records,
    }
    if worker is not None:
        cc = contextcite_name(args.num_ablations)
        test["paired"] = {m: {k: paired(records, OURS, m, k) for k in
                              ("top1_answer", "top1_gold", "drop1", "drop2")}
                          for m in names if m.startswith("ContextCite")}
        test["checks"] = {
            "max_logprob_diff": max(abs(r["contextcite"]["answer_logprob_diff"]) for r in records),
            "prompt_ids_match": sum(r["contextcite"]["prompt_ids_match"] for r in records),
            "response_ids_match": sum(r["contextcite"]["response_ids_match"] for r in records),
        }
        o, c = summary[OURS], summary[cc]
        ratio = c["time_s"][0] / o["time_s"][0]
        test["time_ratio"] = ratio
        test["ours_with_sentence_rows"] = {
            "time_s": mean_se([r["times"]["ours, with sentence rows"] for r in records]),
            "sentences": mean_se([r["ours_sentences"] for r in records]),
            "same_sources": sum(r["ours_same_sources"] for r in records),
        }
        test["time_ratio_with_sentence_rows"] = (
            c["time_s"][0] / test["ours_with_sentence_rows"]["time_s"][0])
        per_case = [r["times"][cc] / r["times"]["ours"] for r in records]
        test["time_ratio_median_per_case"] = float(np.median(per_case))

        def verdict(ok: bool) -> str:
            return "**met**" if ok else "**missed**"

        test["targets"] = [
            f"top-1 accuracy (answer source) ≥ ContextCite's: {fmt(o['top1_answer_source'])} vs "
            f"{fmt(c['top1_answer_source'])}: "
            f"{verdict(o['top1_answer_source'][0] >= c['top1_answer_source'][0])}",
            f"top-1 accuracy (gold, all cases) ≥ ContextCite's: {fmt(o['top1_gold_all'])} vs "
            f"{fmt(c['top1_gold_all'])}: {verdict(o['top1_gold_all'][0] >= c['top1_gold_all'][0])}",
            f"top-1 removal drop ≥ ContextCite's: {fmt(o['drop1'])} vs {fmt(c['drop1'])} nats: "
            f"{verdict(o['drop1'][0] >= c['drop1'][0])}",
            f"top-2 removal drop ≥ ContextCite's: {fmt(o['drop2'])} vs {fmt(c['drop2'])} nats: "
            f"{verdict(o['drop2'][0] >= c['drop2'][0])}",
            f"≥ 10× less time per explanation: ContextCite takes {ratio:.1f}× ours (mean times; "
            f"median of per-case ratios {test['time_ratio_median_per_case']:.1f}×): "
            f"{verdict(ratio >= 10)}",
        ]
    result["test"] = test
    result.update(run_cost.measured())

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    md = report(result)
    (args.out / "results.md").write_text(md)
    print(md)
    print(f"wrote {args.out}/results.md, results.json ({result['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
