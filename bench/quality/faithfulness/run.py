"""The faithfulness runner: token flipping (the PA-LRP paper's protocol) on real text, every
task and scale from one command line. The protocol, tasks, methods and statistics it runs are
``references/faithfulness/`` (the tests use them too); this module only drives and reports.

    python -m bench.quality.faithfulness                     # --scale quick: default model, < 30 min
    python -m bench.quality.faithfulness --model DIR         # a checkpoint directory (LLaMA, Mistral,
                                                             # Qwen2, Qwen3, Gemma 3; base or instruct)
    python -m bench.quality.faithfulness --n-dev 40 --n-test 100 --length 64   # larger
    python -m bench.quality.faithfulness --tasks retrieval   # query-document cosine under
                                                             # all-MiniLM-L6-v2 (retrieval.py)
    python -m bench.quality.faithfulness --scale study       # the study at scale: two models,
                                                             # 128/512-token prose and a quiz,
                                                             # paired statistics (study.py, ~2 h)
    python -m bench.quality.faithfulness --scale full        # the study with 150 + 150 cases
    python -m bench.quality.faithfulness --scale study --report   # its tables from the records

Quick scale, steps: (1) dev split: the four ways of combining token and positional relevance (plus the
token-only and position-only parts) are scored; the best mean score over the tasks wins.
(2) test split: the winner ("PA-LRP") against every other method. Writes ``results.md``,
``results.json``, ``curves_prob.png`` and ``curves_logit.png`` into ``--out``.

Ranking: by the probability gaps (``score`` = mean of the deletion gap and the insertion gap,
target probability). Logit gaps are reported beside them: raw logits move when the input is
degraded (all of them shift with the neutral tokens), which inflates logit AUCs of both orders.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from bench.quality.runs import RunCost, cost_sentence, load_model
from references.faithfulness.evaluate import LXT_NAME, evaluate_case, resolve_target, run_lxt
from references.faithfulness.methods import CANDIDATES, COMBINATIONS, DEFAULT_COMBINATION, PAPER_DEFAULT, Methods, timed
from references.faithfulness.protocol import CURVES, CaseCurves
from references.faithfulness.statistics import mean_se
from references.faithfulness.tasks import TASKS, Case, load_cases, neutral_token_id

from .tables import PALRP, fmt, plot, timing_table

REPO = Path(__file__).resolve().parents[3]
DEFAULT_OUT = Path(__file__).parent / "results"
SCALES = ("quick", "study", "full")


# ---- aggregation ------------------------------------------------------------------------------
def summarise_method(per_case: list[CaseCurves]) -> dict[str, Any]:
    keys = per_case[0].aucs.keys()
    aucs = {k: mean_se([c.aucs[k] for c in per_case]) for k in keys}
    curves = {name: {r: np.mean([c.curves[name][r] for c in per_case], axis=0).tolist()
                     for r in ("logit", "prob", "sqdrop")} for name in CURVES}
    return {"n": len(per_case), "auc": aucs, "curves": curves}


def paired(per_case: dict[str, list[CaseCurves]], method: str, reference: str,
           key: str = "score_prob") -> tuple[float, float]:
    d = [a.aucs[key] - b.aucs[key] for a, b in zip(per_case[method], per_case[reference])]
    return mean_se(d)


# ---- one split --------------------------------------------------------------------------------
def run_split(ex: Any, methods: Methods, cases: list[Case], wanted: list[str], neutral_id: int,
              winner: str | None, lxt: dict | None, batch_size: int, log_prefix: str
              ) -> tuple[dict[str, list[CaseCurves]], dict[str, list[float]]]:
    """Per method: the per-case curves and the explanation times."""
    per_case: dict[str, list[CaseCurves]] = {}
    times: dict[str, list[float]] = {}
    single = methods.single()
    start = time.perf_counter()
    for index, case in enumerate(cases):
        relevances: dict[str, np.ndarray] = {}
        variants, seconds = timed(methods.pa_lrp, case)
        for name, rel in variants.items():
            label = PALRP if name == winner else name
            if label in wanted or name in wanted:
                relevances[label] = rel
                times.setdefault(label, []).append(seconds)
        for name, fn in single.items():
            if name in wanted:
                relevances[name], seconds = timed(fn, case)
                times.setdefault(name, []).append(seconds)
        if lxt is not None and LXT_NAME in wanted:
            relevances[LXT_NAME] = np.asarray(lxt["cases"][index]["relevance"])
            times.setdefault(LXT_NAME, []).append(lxt["cases"][index]["time_s"])
        curves, evaluated = evaluate_case(ex.hf_model, case, relevances, neutral_id, batch_size)
        for name, c in curves.items():
            per_case.setdefault(name, []).append(c)
        print(f"  {log_prefix} {case.task} {index + 1}/{len(cases)} ({case.item_id}, "
              f"{len(case.input_ids)} tokens, {evaluated} forwards) "
              f"{time.perf_counter() - start:.0f}s", flush=True)
    return per_case, times


# ---- report -----------------------------------------------------------------------------------
def table(summary: dict[str, dict], per_case: dict[str, list[CaseCurves]], reading: str,
          reference: str | None) -> list[str]:
    order = sorted(summary, key=lambda m: -summary[m]["auc"][f"score_{reading}"][0])
    head = ("| method | del MoRF ↓ | del LeRF ↑ | **del gap ↑** | ins MoRF ↑ | ins LeRF ↓ | "
            "**ins gap ↑** | score ↑ |")
    sep = "|---|---|---|---|---|---|---|---|"
    if reference is not None:
        head += f" Δscore vs {reference} |"
        sep += "---|"
    lines = [head, sep]
    for m in order:
        a = summary[m]["auc"]
        row = [m] + [fmt(*a[f"{k}_{reading}"]) if k.endswith("gap") or k == "score" else fmt(a[f"{k}_{reading}"][0])
                     for k in ("deletion_morf", "deletion_lerf", "deletion_gap", "insertion_morf",
                               "insertion_lerf", "insertion_gap", "score")]
        if reference is not None:
            row.append("—" if m == reference else fmt(*paired(per_case, m, reference, f"score_{reading}")))
        name = f"**{m}**" if m == reference else m
        lines.append("| " + " | ".join([name] + row[1:]) + " |")
    return lines


def paper_table(summary: dict[str, dict]) -> list[str]:
    lines = ["| method | generate AU-AC ↑ | generate AU-MSE ↓ | pruning AU-AC ↑ | pruning AU-MSE ↓ "
             "| MERF ↑ | LERF ↓ |", "|---|---|---|---|---|---|---|"]
    for m in sorted(summary, key=lambda m: -summary[m]["auc"]["paper_generate_AU_AC"][0]):
        a = summary[m]["auc"]
        lines.append("| " + " | ".join([m] + [fmt(a[f"paper_{k}"][0]) for k in (
            "generate_AU_AC", "generate_AU_MSE", "pruning_AU_AC", "pruning_AU_MSE", "MERF", "LERF")]) + " |")
    return lines


# ---- main -------------------------------------------------------------------------------------
TEST_METHODS = [PALRP, "pa-lrp token-only", "pa-lrp position-only", "attnlrp (ours)",
                "cp-lrp (ours)", LXT_NAME, "grad-x-input", "integrated-gradients",
                "attention-last", "attention-rollout", "random"]
DEV_METHODS = list(COMBINATIONS) + ["pa-lrp token-only", "pa-lrp position-only"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.quality.faithfulness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=SCALES, default="quick",
                   help="quick: one model, the tasks of --tasks, dev choice then test (the options "
                        "below); study: the study at scale (two models, prose@128, prose@512, quiz; "
                        "the study options); full: the study with 150 dev + 150 test cases per setting")
    p.add_argument("--model", default=None,
                   help="Hugging Face checkpoint directory of a supported architecture (LLaMA, Mistral, "
                        "Qwen2, Qwen3, Gemma 3; e.g. the shipped Gemma 3 270M: "
                        "vllm_pelrp.shipped_models.ensure_checkpoint('gemma-3-270m')); default: the "
                        "embedded SmolLM2-135M-Instruct. Prompts are plain text (no chat template), so "
                        "base models work as they are"),
    p.add_argument("--tasks", default=",".join(TASKS),
                   help="comma list of: " + ", ".join(TASKS) + "; or 'retrieval' alone (a sentence "
                        "encoder, default all-MiniLM-L6-v2: see references/faithfulness/retrieval.py)")
    p.add_argument("--n-dev", type=int, default=None,
                   help="dev cases per task (decoder tasks: 8, for the combination choice; retrieval: 40)")
    p.add_argument("--n-test", type=int, default=None, help="test cases per task (12; retrieval: 60)")
    p.add_argument("--length", type=int, default=30, help="context tokens for next-token prediction")
    p.add_argument("--ig-steps", type=int, default=None, help="Integrated Gradients steps (16; retrieval: 32)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="perturbed inputs per forward (8; retrieval: 64)")
    p.add_argument("--random-seeds", type=int, default=3,
                   help="retrieval: seeds of the random baseline per case (its curves are their mean)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine one thread was 3-4x "
                        "faster than two; use 2 on an idle one; 0 = torch's default)")
    p.add_argument("--neutral", default="auto",
                   help="replacement token: auto (the paper's UNK-or-'#', see references/faithfulness/tasks.py; retrieval: '.', "
                        "see retrieval.neutral_token), unk, or a token's text (retrieval also: mask, pad)")
    p.add_argument("--no-lxt", action="store_true", help="skip the external LXT AttnLRP")
    p.add_argument("--combination", default=None, choices=list(COMBINATIONS),
                   help="skip the dev split and use this combination as PA-LRP (retrieval: the "
                        "combination PA-LRP stands for, default the library's; no split is skipped)")
    p.add_argument("--dev-only", action="store_true",
                   help="only the dev split (the combination choice); writes dev.md / dev.json")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default {DEFAULT_OUT.relative_to(REPO)}; retrieval: "
                        f"{(DEFAULT_OUT / 'retrieval-minilm').relative_to(REPO)}; study: "
                        f"{(DEFAULT_OUT / 'study').relative_to(REPO)})")
    study = p.add_argument_group("study options (--scale study or full; study.py)")
    from .study import MODELS, TEST_METHODS

    study.add_argument("--models", default=",".join(MODELS), help="comma list of shipped models or dirs")
    study.add_argument("--stages", default="dev,test", help="comma list of: dev, test")
    study.add_argument("--size", action="append", default=[], metavar="SPLIT:SETTING=N",
                       help="override one size, e.g. test:prose@512=30")
    study.add_argument("--winner", default=None, choices=sorted(CANDIDATES),
                       help="skip the dev choice and test this candidate as PA-LRP")
    study.add_argument("--test-method", action="append", default=None, metavar="NAME",
                       help="a method for the test split, repeatable (default: "
                            f"{'; '.join(TEST_METHODS)}; PA-LRP is the dev winner)")
    study.add_argument("--workers", type=int, default=2, help="case processes (one thread each)")
    study.add_argument("--report", action="store_true", help="only write the report from the records")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    given = list(argv if argv is not None else sys.argv[1:])
    tasks = [t for t in args.tasks.split(",") if t]
    if args.scale != "quick":
        from .study import run as run_study

        return run_study(args, given, p.error)
    if args.report:
        p.error("--report reads the study's records: add --scale study")
    if "retrieval" in tasks:
        if tasks != ["retrieval"]:
            p.error("run the retrieval task on its own (--tasks retrieval): it explains a "
                    "sentence encoder, not the decoder of the other tasks")
        from .retrieval import run as run_retrieval

        return run_retrieval(args, argv)
    return run_quick(args, given, tasks, p.error)


def run_quick(args: Any, given: Sequence[str], tasks: Sequence[str], error: Any) -> int:
    """``--scale quick`` on the decoder tasks: the dev choice of the combination, then the test."""
    for name, default in (("n_dev", 8), ("n_test", 12), ("ig_steps", 16), ("batch_size", 8),
                          ("out", DEFAULT_OUT)):
        if getattr(args, name) is None:
            setattr(args, name, default)

    run_cost = RunCost()
    ex, model_dir = load_model(args.model, args.threads)
    neutral_id, neutral_text = neutral_token_id(ex.tokenizer, args.neutral)
    methods = Methods(ex, neutral_id, ig_steps=args.ig_steps)
    print(f"model {ex.name} ({model_dir}); neutral token {neutral_text!r} (id {neutral_id}); "
          f"threads {torch.get_num_threads()}", flush=True)

    def cases_for(split: str, count: int) -> dict[str, list[Case]]:
        return {t: [resolve_target(ex.hf_model, c) for c in
                    load_cases(t, split, count, ex.tokenizer, args.length)] for t in tasks}

    result: dict[str, Any] = {"model": ex.name, "model_dir": str(model_dir), "neutral_token": neutral_text,
                              "args": {k: str(v) for k, v in vars(args).items()},
                              "command": "python -m bench.quality.faithfulness " + " ".join(given)}
    # 1. dev: choose the combination
    dev_summary: dict[str, dict] = {}
    if args.combination is None:
        dev_cases = cases_for("dev", args.n_dev)
        dev_per_case: dict[str, dict] = {}
        for task in tasks:
            per_case, _ = run_split(ex, methods, dev_cases[task], DEV_METHODS, neutral_id, None,
                                    None, args.batch_size, "dev")
            dev_per_case[task] = per_case
            dev_summary[task] = {m: summarise_method(c) for m, c in per_case.items()}
        scores = {m: float(np.mean([dev_summary[t][m]["auc"]["score_prob"][0] for t in tasks]))
                  for m in COMBINATIONS}
        winner = max(scores, key=scores.get)
        result["dev"] = {"summary": dev_summary, "combination_scores": scores, "winner": winner,
                         "paired": {t: {m: paired(dev_per_case[t], m, PAPER_DEFAULT) for m in DEV_METHODS}
                                    for t in tasks},
                         "n": {t: len(dev_cases[t]) for t in tasks}}
        print(f"dev winner: {winner}  ({', '.join(f'{k}={v:.4f}' for k, v in scores.items())})", flush=True)
    else:
        winner = args.combination
        result["dev"] = {"winner": winner, "skipped": True}
    if args.dev_only:
        if args.combination is not None:
            error("--dev-only needs the dev split: drop --combination")
        args.out.mkdir(parents=True, exist_ok=True)
        result["wall_s"] = run_cost.wall_s()
        (args.out / "dev.json").write_text(json.dumps(result, indent=1))
        md = "\n".join(dev_report(result, dev_summary, tasks, winner)) + "\n"
        (args.out / "dev.md").write_text(md)
        print(md)
        return 0
    wanted = list(TEST_METHODS)
    # beside the dev winner: the paper's combination and the library's default
    # (combined_relevance), each when it is not the winner
    for other in (PAPER_DEFAULT, DEFAULT_COMBINATION):
        if other != winner and other not in wanted:
            wanted.insert(1, other)

    # 2. test: every method
    test_cases = cases_for("test", args.n_test)
    lxt = None
    if not args.no_lxt:
        all_cases = [c for t in tasks for c in test_cases[t]]
        out = run_lxt(model_dir, all_cases, args.threads or None)
        if out is not None:
            lxt, offset = {}, 0
            for t in tasks:
                lxt[t] = {"cases": out["cases"][offset : offset + len(test_cases[t])]}
                offset += len(test_cases[t])
            result["lxt_versions"] = out["versions"]
            result["lxt_config_fixes"] = out.get("config_fixes", [])
            # same model in both environments: LXT's target logit must be ours
            result["lxt_max_logit_diff"] = max(
                abs(o["logit"] - c.meta["target_logit"]) for o, c in zip(out["cases"], all_cases))
            print(f"  lxt: {len(all_cases)} cases, max |target logit - ours| = "
                  f"{result['lxt_max_logit_diff']:.2e}", flush=True)
    test_summary, test_per_case, all_times = {}, {}, {}
    for task in tasks:
        per_case, times = run_split(ex, methods, test_cases[task], wanted, neutral_id, winner,
                                    None if lxt is None else lxt[task], args.batch_size, "test")
        test_per_case[task] = per_case
        test_summary[task] = {m: summarise_method(c) for m, c in per_case.items()}
        for m, ts in times.items():
            all_times.setdefault(m, []).extend(ts)
    result["test"] = {"summary": test_summary, "winner": winner,
                      # per case, for paired comparisons of any two methods after the run
                      "item_ids": {t: [c.item_id for c in test_cases[t]] for t in tasks},
                      "per_case": {t: {m: {k: [c.aucs[k] for c in cs] for k in ("score_prob", "score_logit")}
                                       for m, cs in test_per_case[t].items()} for t in tasks}}
    result["times_s"] = {m: float(np.mean(ts)) for m, ts in all_times.items()}
    result["quiz_accuracy"] = {s: float(np.mean([c.meta["correct"] for c in cs["quiz"]]))
                               for s, cs in (("test", test_cases),) if "quiz" in cs and cs["quiz"]}
    result.update(run_cost.measured())

    args.out.mkdir(parents=True, exist_ok=True)
    for reading, name in (("prob", "probability"), ("logit", "logit")):
        plot(test_summary, args.out / f"curves_{reading}.png",
             f"{ex.name}: token flipping, target {name} (test split)",
             ylabel=f"target {reading}", reading=reading)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    md = report(result, dev_summary, test_summary, test_per_case, all_times, tasks, winner, test_cases)
    (args.out / "results.md").write_text(md)
    print(md)
    print(f"wrote {args.out}/results.md, results.json, curves_prob.png, curves_logit.png "
          f"({result['wall_s']:.0f}s)")
    return 0


def dev_report(result, dev_summary, tasks, winner) -> list[str]:
    n = {t: dev_summary[t][DEV_METHODS[0]]["n"] for t in tasks}
    lines = ["## Dev split: combining token and positional relevance", "",
             "Cases: " + ", ".join(f"{t} {n[t]}" for t in tasks) + ". Probability gaps, mean ± SE; "
             f"Δ = paired difference to {PAPER_DEFAULT} (the paper's combination).", "",
             "| combination | " + " | ".join(f"{t} del gap | {t} ins gap | {t} Δscore" for t in tasks)
             + " | mean score |", "|---|" + "---|---|---|" * len(tasks) + "---|"]
    for m in DEV_METHODS:
        cells = []
        for t in tasks:
            a = dev_summary[t][m]["auc"]
            delta = "—" if m == PAPER_DEFAULT else fmt(*result["dev"]["paired"][t][m])
            cells += [fmt(*a["deletion_gap_prob"]), fmt(*a["insertion_gap_prob"]), delta]
        mean = np.mean([dev_summary[t][m]["auc"]["score_prob"][0] for t in tasks])
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean:.4f} |")
    lines += ["", f"Winner on dev (mean probability score over tasks): **{winner}**; it is "
              f"`{PALRP}` in the test tables.", ""]
    return lines


def overview(test_summary, test_per_case, tasks) -> list[str]:
    """One row per method: probability gaps per task, logit score, mean rank."""
    methods = list(test_summary[tasks[0]])
    ranks = {m: [] for m in methods}
    for t in tasks:
        order = sorted(methods, key=lambda m: -test_summary[t][m]["auc"]["score_prob"][0])
        for r, m in enumerate(order, 1):
            ranks[m].append(r)
    head = "| method | " + " | ".join(
        f"{t}: del gap (p) | {t}: ins gap (p) | {t}: Δscore vs PA-LRP (p) | {t}: score (logit)" for t in tasks
    ) + " | mean rank |"
    lines = ["## Test split: overview", "",
             "(p) = target probability, the ranking quantity; gaps mean ± SE over cases; Δscore = "
             "this method minus PA-LRP on the same cases (paired; > 0: better than PA-LRP).", "",
             head, "|---|" + "---|---|---|---|" * len(tasks) + "---|"]
    for m in sorted(methods, key=lambda m: np.mean(ranks[m])):
        cells = []
        for t in tasks:
            a = test_summary[t][m]["auc"]
            delta = "—" if m == PALRP else fmt(*paired(test_per_case[t], m, PALRP))
            cells += [fmt(*a["deletion_gap_prob"]), fmt(*a["insertion_gap_prob"]), delta,
                      fmt(*a["score_logit"], digits=2)]
        name = f"**{m}**" if m == PALRP else m
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {np.mean(ranks[m]):.1f} |")
    lines += ["", "Deletion and insertion are two views of the same perturbations: deleting the "
              "top n of N tokens leaves the same input as inserting the bottom N − n, so deletion "
              "MoRF at f equals insertion LeRF at 1 − f whenever f·N is whole (always for the "
              "next-token task, whose N = --length is a multiple of 10), and the two gaps agree; "
              "with n = round(f·N) they agree for the quiz too up to half-way ties. Both are kept "
              "because the issue and the paper report both.", ""]
    return lines


ATTNLRP = "attnlrp (ours)"


def against_attnlrp(test_per_case, tasks) -> list[str]:
    """Every PA-LRP variant minus our AttnLRP mode, paired per case: what the positional part
    (and its combination) adds over AttnLRP."""
    if any(ATTNLRP not in test_per_case[t] for t in tasks):
        return []
    variants = [m for m in test_per_case[tasks[0]] if m == PALRP or m.startswith("pa-lrp")]
    head = "| variant | " + " | ".join(f"{t}: Δscore (p) | {t}: Δscore (logit)" for t in tasks) + " |"
    lines = [f"## Test split: PA-LRP variants against {ATTNLRP}", "",
             f"Paired differences (variant minus {ATTNLRP}, same cases), mean ± SE; > 0: the "
             "variant is more faithful than AttnLRP.", "", head, "|---|" + "---|---|" * len(tasks)]
    for m in variants:
        cells = []
        for t in tasks:
            cells += [fmt(*paired(test_per_case[t], m, ATTNLRP)),
                      fmt(*paired(test_per_case[t], m, ATTNLRP, "score_logit"), digits=2)]
        name = f"**{m}**" if m == PALRP else m
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def report(result, dev_summary, test_summary, test_per_case, times, tasks, winner, test_cases) -> str:
    lines = [f"# Faithfulness (token flipping): {result['model']}", "",
             f"Command: `{result['command'].strip()}`", "",
             f"Neutral token {result['neutral_token']!r}; fractions 0, 0.1, …, 1.0; AUC = trapezoid "
             "over fractions, mean ± standard error over cases. Gaps: deletion = LeRF − MoRF, "
             "insertion = MoRF − LeRF; score = mean of the two. **Ranked by the probability score.**",
             ""]
    if dev_summary:
        lines += dev_report(result, dev_summary, tasks, winner)
    else:
        lines += [f"Dev split skipped: `{PALRP}` = {winner}.", ""]
    lines += overview(test_summary, test_per_case, tasks)
    lines += against_attnlrp(test_per_case, tasks)
    for task in tasks:
        n = len(test_cases[task])
        lines += [f"## Test split, {task} ({n} cases)", "", "Target probability:", ""]
        lines += table(test_summary[task], test_per_case[task], "prob", PALRP)
        lines += ["", "Target logit:", ""]
        lines += table(test_summary[task], test_per_case[task], "logit", PALRP)
        lines += ["", "The paper's metrics (its table: generate = insertion most-relevant first, "
                  "pruning = deletion least-relevant first; probability AU-AC, AU-MSE of the squared "
                  "logit drop; MERF/LERF = insertion logit AUCs):", ""]
        lines += paper_table(test_summary[task])
        lines.append("")
    lines += ["## Time per explanation (test split, same run)", ""] + timing_table(times)
    lines += ["", "PA-LRP variants share one engine pass (their time is that pass). LXT runs in "
              "its own process (transformers 4.x, eager attention).", ""]
    if result.get("quiz_accuracy"):
        lines.append(f"Quiz accuracy of the model (argmax letter = gold), test: "
                     f"{result['quiz_accuracy']['test']:.2f}")
    lines.append(cost_sentence(result) + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
