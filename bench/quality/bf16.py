"""bf16 against fp32 on the shipped models: does an explanation computed in bf16 (weights and
activations; the library's own ``load_explainer(dtype="bfloat16")`` path) match fp32?

    python -m bench.quality.bf16                # both shipped decoders, 8 passages, 128 tokens
    python -m bench.quality.bf16 --models gemma-3-270m --passages 4

Cases: the last ``--passages`` test-split passages of ``references/faithfulness/data/prose.jsonl``
(GNU Info manuals) long enough for ``--length`` tokens, cut as the faithfulness ``prose`` task
cuts them (a BOS the tokenizer adds comes on top). No faithfulness run at its default scales
reads them (the study reads the first 24 test passages). Target: the fp32 model's argmax next
token, the same token id in both dtypes. Per model: the relative L2 of the combined relevance
(token + positional, the library's default combination, max-normalised as the library returns
it) bf16 vs fp32, median and max over the passages; the top-10 overlap (positions of largest
|combined relevance|), mean and min. Targets (issue 22): relative L2 ≤ 2%, overlap ≥ 0.9.
Writes ``bf16.json`` and ``bf16.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from bench.common.compare import relative_l2, top_k_overlap
from bench.quality.runs import RunCost, cost_sentence, load_model
from references.faithfulness.tasks import load_items, nexttoken_case

DEFAULT_MODELS = ("SmolLM2-135M-Instruct", "gemma-3-270m")  # the shipped decoders
DEFAULT_OUT = Path(__file__).parent / "results"
MAX_REL_L2, MIN_OVERLAP, TOP_K = 0.02, 0.9, 10  # the targets


def passages(tokenizer: Any, count: int, length: int) -> list:
    """The last ``count`` usable test passages, in file order."""
    cases = []
    for item in reversed(load_items("prose")):
        if item["split"] == "test" and (case := nexttoken_case(item, tokenizer, length, "prose")):
            cases.append(case)
        if len(cases) == count:
            break
    return cases[::-1]


def compare_model(model: str, count: int, length: int, threads: int) -> dict[str, Any]:
    full, _ = load_model(model, threads)
    half, _ = load_model(model, threads, dtype="bfloat16")
    rows = []
    for case in passages(full.tokenizer, count, length):
        ref = full.explain(input_ids=case.input_ids, target="next")
        target = ref.target.token_ids[-1]
        low = half.explain(input_ids=case.input_ids, target={"token_id": target})
        a, b = (torch.tensor(e.combined_relevance) for e in (low, ref))
        rows.append({
            "id": case.item_id, "tokens": len(case.input_ids), "target": target,
            "bf16_argmax_same": half.generate(case.input_ids, 1) == [target],
            "combined_rel_l2": relative_l2(a, b),
            "token_rel_l2": relative_l2(torch.tensor(low.token_relevance),
                                        torch.tensor(ref.token_relevance)),
            "positional_rel_l2": relative_l2(torch.tensor(low.positional_relevance),
                                             torch.tensor(ref.positional_relevance)),
            "top10_overlap": top_k_overlap(a, b, TOP_K),
        })
        print(f"{model} {case.item_id}: rel L2 {rows[-1]['combined_rel_l2']:.4f}, "
              f"top-10 overlap {rows[-1]['top10_overlap']:.1f}", flush=True)
    rel = [r["combined_rel_l2"] for r in rows]
    overlap = [r["top10_overlap"] for r in rows]
    summary = {"model": model, "combination": ref.combination, "n": len(rows),
               "rel_l2_median": statistics.median(rel), "rel_l2_max": max(rel),
               "token_rel_l2_median": statistics.median(r["token_rel_l2"] for r in rows),
               "overlap_mean": statistics.fmean(overlap), "overlap_min": min(overlap),
               "bf16_argmax_same": sum(r["bf16_argmax_same"] for r in rows)}
    summary["met"] = summary["rel_l2_max"] <= MAX_REL_L2 and summary["overlap_min"] >= MIN_OVERLAP
    return {"summary": summary, "cases": rows}


COLUMNS = ("model", "passages", "rel. L2 median", "rel. L2 max", "top-10 overlap mean",
           "top-10 overlap min", "token-only rel. L2 median", "bf16 argmax = fp32", "targets met")
SHORT_COLUMNS = ("model", "n", "L2 med", "L2 max", "top10 mean", "top10 min", "token L2 med",
                 "argmax same", "met")  # the terminal's table


def table_rows(result: dict) -> list[list[str]]:
    return [[s["model"], str(s["n"]), f"{s['rel_l2_median']:.2%}", f"{s['rel_l2_max']:.2%}",
             f"{s['overlap_mean']:.2f}", f"{s['overlap_min']:.2f}",
             f"{s['token_rel_l2_median']:.2%}", f"{s['bf16_argmax_same']}/{s['n']}",
             "yes" if s["met"] else "**no**"]
            for s in (m["summary"] for m in result["models"])]


def report(result: dict) -> str:
    lines = ["# bf16 against fp32 (`python -m bench.quality.bf16`)", "",
             f"{result['passages']} test prose passages of {result['length']} tokens, the fp32 "
             "argmax next token as target in both dtypes, the combined relevance "
             f"({result['models'][0]['summary']['combination']}); targets: relative L2 ≤ "
             f"{MAX_REL_L2:.0%}, top-{TOP_K} overlap ≥ {MIN_OVERLAP}. Commit {result['commit']}, "
             f"{result['date']}, torch {result['torch']}, CPU.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    return "\n".join(lines + ["", cost_sentence(result["cost"]) + "."]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--passages", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's own)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    import datetime
    import subprocess

    cost = RunCost()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"passages": args.passages, "length": args.length, "commit": commit,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "torch": torch.__version__,
              "models": [compare_model(m, args.passages, args.length, args.threads)
                         for m in args.models]}
    result["cost"] = cost.measured()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bf16.json").write_text(json.dumps(result, indent=2))
    (args.out / "bf16.md").write_text(report(result))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bf16 vs fp32, combined relevance, {args.passages} × {args.length} "
                  "tokens")
    for column in SHORT_COLUMNS:
        table.add_column(column)
    for row in table_rows(result):
        table.add_row(*(cell.replace("**", "") for cell in row))
    Console().print(table)
    print(f"written: {args.out / 'bf16.md'}")
    return 0 if all(m["summary"]["met"] for m in result["models"]) else 1


if __name__ == "__main__":
    sys.exit(main())
