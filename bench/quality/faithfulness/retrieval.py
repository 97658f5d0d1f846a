"""The faithfulness runner's retrieval task (``--tasks retrieval``): its run, tables, plot and
report. The task itself (cases, methods, flipping of the document, curves) is
``references/faithfulness/retrieval.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from bench.quality.runs import RunCost, cost_sentence, load_model
from references.faithfulness.methods import combination_label
from references.faithfulness.retrieval import (
    DEFAULT_MODEL,
    DEFAULTS,
    KEYS,
    LXT_SUM,
    LXT_WORD,
    PALRP,
    RANDOM,
    REFERENCE,
    SE_RULE,
    TASK,
    RetrievalMethods,
    load_retrieval_cases,
    neutral_token,
    run_lxt,
    run_split,
    summarise,
)

from .tables import fmt, plot, timing_table

DEFAULT_OUT = Path(__file__).parent / "results" / "retrieval-minilm"


def verdict(mean: float, se: float) -> str:
    if not np.isfinite(se) or se == 0:
        return "—"
    z = mean / se
    return f"{z:+.1f}" + (" ✓" if z > SE_RULE else " ✗" if z < -SE_RULE else "")


def split_table(summary: dict[str, dict]) -> list[str]:
    head = ("| method | del MoRF ↓ | del LeRF ↑ | **del gap ↑** | ins MoRF ↑ | ins LeRF ↓ | "
            "**ins gap ↑** | ins − del ↑ | score ↑ | Δscore vs AttnLRP (ours) | Δ / SE |")
    lines = [head, "|---" * 11 + "|"]
    for m in sorted(summary, key=lambda m: -summary[m]["auc"]["score"][0]):
        a = summary[m]["auc"]
        cells = [fmt(a[k][0]) if k in ("deletion_morf", "deletion_lerf", "insertion_morf",
                                       "insertion_lerf") else fmt(*a[k]) for k in KEYS]
        if m == REFERENCE or "vs_reference" not in summary[m]:
            cells += ["—", "—"]
        else:
            d = summary[m]["vs_reference"]["score"]
            cells += [fmt(*d), verdict(*d)]
        name = f"**{m}**" if m in (PALRP, REFERENCE) else m
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def all_methods(combination: str) -> list[str]:
    from vllm_pelrp.assemble import COMBINATIONS

    return ([PALRP] + [combination_label(c) for c in COMBINATIONS if c != combination]
            + ["pa-lrp token-only", "pa-lrp position-only", REFERENCE, "cp-lrp (ours)",
               LXT_WORD, LXT_SUM, "grad-x-input", "integrated-gradients", "attention-last",
               "attention-rollout", RANDOM])


def run(args: Any, argv: Sequence[str] | None) -> int:
    """``python -m bench.quality.faithfulness --tasks retrieval`` (``run.main`` parses the flags)."""
    from vllm_pelrp.explainer import EncoderExplainer

    run_cost = RunCost()
    n_dev = DEFAULTS["n_dev"] if args.n_dev is None else args.n_dev
    n_test = DEFAULTS["n_test"] if args.n_test is None else args.n_test
    ig_steps = DEFAULTS["ig_steps"] if args.ig_steps is None else args.ig_steps
    batch_size = DEFAULTS["batch_size"] if args.batch_size is None else args.batch_size
    out_dir = DEFAULT_OUT if args.out is None else args.out
    ex, model_dir = load_model(args.model or DEFAULT_MODEL, args.threads)
    if not isinstance(ex, EncoderExplainer) or ex.pooling is None:
        raise SystemExit(f"{model_dir}: the retrieval task needs a sentence-embedding encoder")
    from vllm_pelrp.assemble import DEFAULT_COMBINATION

    from references.faithfulness.methods import COMBINATIONS as LABELS  # benchmark label -> library name

    combination = LABELS.get(args.combination, args.combination) or DEFAULT_COMBINATION
    neutral_id, neutral_text = neutral_token(ex.tokenizer, args.neutral)
    methods = RetrievalMethods(ex, neutral_id, ig_steps=ig_steps, random_seeds=args.random_seeds,
                               combination=combination)
    wanted = all_methods(combination)
    if args.no_lxt:
        wanted = [m for m in wanted if m not in (LXT_WORD, LXT_SUM)]
    print(f"retrieval: model {ex.name} ({model_dir}), pooling {ex.pooling}; neutral token "
          f"{neutral_text!r} (id {neutral_id}); PA-LRP = {combination}; threads "
          f"{torch.get_num_threads()}", flush=True)
    result: dict[str, Any] = {
        "task": TASK, "model": ex.name, "model_dir": str(model_dir), "neutral_token": neutral_text,
        "combination": combination, "ig_steps": ig_steps, "random_seeds": args.random_seeds,
        "batch_size": batch_size, "args": {k: str(v) for k, v in vars(args).items()},
        "command": "python -m bench.quality.faithfulness " + " ".join(argv if argv is not None else sys.argv[1:]),
        "splits": {}}
    summaries, all_times, per_split_cases = {}, {}, {}
    splits = [("dev", n_dev)] + ([] if args.dev_only else [("test", n_test)])
    for split, count in splits:
        if count <= 0:
            continue
        cases = load_retrieval_cases(split, count, ex.tokenizer, ex.max_length)
        lxt = None
        if LXT_WORD in wanted or LXT_SUM in wanted:
            lxt = run_lxt(model_dir, cases, args.threads or None)
        names = [m for m in wanted if lxt is not None or m not in (LXT_WORD, LXT_SUM)]
        per_case, times, cost = run_split(methods, cases, names, neutral_id, lxt, batch_size, split)
        summary = summarise(per_case)
        summaries[split] = summary
        per_split_cases[split] = per_case
        for m, ts in times.items():
            all_times.setdefault(m, []).extend(ts)
        ours = [methods.engine_value[c.item_id] for c in cases]
        hf = [per_case[REFERENCE][i].aucs["original"] for i in range(len(cases))]
        entry = {
            "n": len(cases), "item_ids": [c.item_id for c in cases],
            "doc_tokens": [len(c.doc_ids) for c in cases],
            "summary": summary,
            "per_case": {m: {k: [c.aucs[k] for c in cs] for k in KEYS} for m, cs in per_case.items()},
            "random_per_seed_score": [c.aucs["per_seed_score"] for c in per_case.get(RANDOM, [])],
            "cosine_original": hf,
            "ig_relative_completeness_error": [methods.ig_relative_delta.get(c.item_id)
                                               for c in cases],
            "max_abs_cosine_engine_vs_hf": float(np.max(np.abs(np.subtract(ours, hf)))),
            "flipping": {"documents_evaluated": cost["forwards"], "seconds": cost["flip_s"],
                         "per_case_mean": float(np.mean(cost["sequences_per_case"]))},
        }
        if lxt is not None:
            entry["lxt_versions"] = lxt["versions"]
            entry["lxt_wall_s"] = lxt["wall_s"]
            entry["max_abs_cosine_lxt_vs_ours"] = float(max(
                abs(o["target_value"] - v) for o, v in zip(lxt["cases"], ours)))
        result["splits"][split] = entry
    result["times_s"] = {m: float(np.mean(ts)) for m, ts in all_times.items()}
    result.update(run_cost.measured())
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "dev" if args.dev_only else "results"
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    md = report(result, summaries, all_times)
    (out_dir / f"{name}.md").write_text(md)
    plot(summaries, out_dir / ("dev_curves.png" if args.dev_only else "curves.png"),
         f"{ex.name}: flipping document tokens, cosine to the query",
         ylabel="cosine(query, document)", flipped="document tokens")
    print(md)
    print(f"wrote {out_dir}/{name}.md, {name}.json ({result['wall_s']:.0f}s)")
    return 0


def combination_choice(result: dict, summaries: dict[str, dict]) -> list[str]:
    """Which combination dev would have picked, and how that pick does on test (PA-LRP's
    combination is fixed beforehand: the library's default, not chosen on dev)."""
    if "dev" not in summaries:
        return []
    dev = summaries["dev"]
    names = [m for m in dev if m == PALRP or m.startswith("pa-lrp[")]
    best = max(names, key=lambda m: dev[m]["auc"]["score"][0])
    label = f"PA-LRP ({result['combination']})" if best == PALRP else best
    lines = ["## The combination", "", f"Best combination on dev by score: **{label}** "
             f"({fmt(*dev[best]['auc']['score'])}; PA-LRP {fmt(*dev[PALRP]['auc']['score'])})."]
    if "test" in summaries and best != PALRP and best in summaries["test"]:
        test = summaries["test"]
        lines.append(f"On test: {fmt(*test[best]['auc']['score'])} against PA-LRP's "
                     f"{fmt(*test[PALRP]['auc']['score'])}.")
    return lines + [""]


def report(result: dict, summaries: dict[str, dict], times: dict[str, list[float]]) -> str:
    lines = [f"# Faithfulness, retrieval: {result['model']}", "",
             f"Command: `{result['command'].strip()}`", "",
             f"Target: cosine(query, document) of the served embeddings; document tokens flipped "
             f"in place to {result['neutral_token']!r} ([CLS]/[SEP] and the query fixed); "
             "fractions 0, 0.1, …, 1.0; AUC = trapezoid over fractions; mean ± standard error "
             "over cases. Gaps: deletion = LeRF − MoRF, insertion = MoRF − LeRF, score = their "
             "mean; ins − del = AUC(insertion MoRF) − AUC(deletion MoRF). Δscore = the method "
             "minus our AttnLRP on the same cases (paired); Δ / SE beyond ±2 is marked ✓ (better) "
             f"or ✗ (worse). `PA-LRP` = `combined_relevance`, combination {result['combination']}.",
             ""]
    for split, summary in summaries.items():
        entry = result["splits"][split]
        lines += [f"## {split} split ({entry['n']} pairs, {np.mean(entry['doc_tokens']):.0f} "
                  f"document tokens on average; cosine {np.mean(entry['cosine_original']):.3f})", ""]
        lines += split_table(summary)
        seeds = np.asarray(entry["random_per_seed_score"])
        if seeds.size:
            lines += ["", "random: score per seed (mean over cases) "
                      + ", ".join(f"{v:.3f}" for v in seeds.mean(0))]
        lines += ["", f"Flipping cost: {entry['flipping']['documents_evaluated']} flipped documents "
                  f"({entry['flipping']['per_case_mean']:.0f} per pair after de-duplication) in "
                  f"{entry['flipping']['seconds']:.0f} s; |engine cosine − HF cosine| ≤ "
                  f"{entry['max_abs_cosine_engine_vs_hf']:.1e}"
                  + (f"; |LXT cosine − ours| ≤ {entry['max_abs_cosine_lxt_vs_ours']:.1e}"
                     if "max_abs_cosine_lxt_vs_ours" in entry else "") + "."]
        ig = [v for v in entry["ig_relative_completeness_error"] if v is not None]
        if ig:
            lines.append(f"Integrated Gradients ({result['ig_steps']} steps): completeness error "
                         f"|Σ attributions − (f(x) − f(baseline))| / |f(x) − f(baseline)|, median "
                         f"{np.median(ig):.3f}, max {np.max(ig):.3f}.")
        lines.append("")
    lines += combination_choice(result, summaries)
    lines += [f"## Time per explanation ({' and '.join(summaries)} split"
              f"{'s' if len(summaries) > 1 else ''} of this run)", ""] + timing_table(times)
    lines += ["", "PA-LRP rows share one engine pass (query and document). LXT runs in its own "
              "process (transformers 4.57, eager attention); its time is one explanation of "
              "both texts.", ""]
    lines.append(cost_sentence(result) + ".")
    return "\n".join(lines) + "\n"
