"""Faithfulness at scale: PA-LRP's combinations against AttnLRP on two models, next-token
prediction at 128 and 512 tokens and multiple choice, with paired statistics; the default
combination is chosen on the dev splits of all of them together.

    python -m bench.quality.faithfulness --scale study            # the default run (sizes below)
    python -m bench.quality.faithfulness --scale full             # 150 dev + 150 test per setting
    python -m bench.quality.faithfulness --scale study --report   # tables from what is on disk

Settings (one "setting" = model × task × context length):

* models: SmolLM2-135M-Instruct and Gemma 3 270M (base), fp32, the shipped checkpoints;
* tasks: ``prose@128`` and ``prose@512`` (next-token on GNU Info manual passages, the model's
  argmax next token, ``references/faithfulness/tasks.py``), and ``quiz`` (four-way multiple choice, the answer letter);
* the protocol of ``references/faithfulness/protocol.py``: in-place flipping to the neutral token at 0, 0.1, …, 1.0;
  **gap** = deletion gap + insertion gap on the normalised target probability min(p/p₀, 1).

Stages. ``dev``: every candidate combination (``references/faithfulness/methods.CANDIDATES``) and our AttnLRP on the
dev split; the winner is the candidate with the largest mean, over all dev settings, of its
paired difference to AttnLRP's gap. ``test``: the winner (as ``PA-LRP``), the paper's
combination, our AttnLRP and gradient×input on the test split (``--test-method``; every method
costs the same 18 flipped forwards per case, whatever its explanation costs).

Every case is one record in ``OUT/<model>/<setting>-<split>.jsonl`` as soon as it is done, so a
run can be stopped and resumed (cases on disk are skipped; a case on disk that lacks a requested
method, e.g. a candidate added later, gets only that method run and merged in), and
``--report`` turns whatever is there into ``OUT/study.md`` and ``OUT/study.json``.

Speed: the flipped inputs of all methods of a case are de-duplicated and run in batches; cases
go to ``--workers`` processes (default 2, one per core, one thread each).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from references.faithfulness.evaluate import start_worker, case_record
from references.faithfulness.methods import CANDIDATES, DEFAULT_COMBINATION, PAPER_DEFAULT
from references.faithfulness.protocol import CURVES
from references.faithfulness.statistics import (
    BASELINE,
    GRADIENT,
    KEY,
    SETTINGS,
    choose,
    load_records,
    records_path,
    setting_stats,
    write_records,
)

DEFAULT_OUT = Path(__file__).parent / "results" / "study"
MODELS = ("SmolLM2-135M-Instruct", "gemma-3-270m")
# cases per split and setting: the default run takes 1.5 to 2 hours on this 2-core machine
DEFAULT_SIZES = {"dev": {"prose@128": 16, "prose@512": 2, "quiz": 20},
                 "test": {"prose@128": 24, "prose@512": 10, "quiz": 30}}
FULL_SIZES = {split: {s: 150 for s in SETTINGS} for split in ("dev", "test")}
TEST_METHODS = ("PA-LRP", PAPER_DEFAULT, BASELINE, GRADIENT)


def _run_job(job: tuple) -> tuple[str, dict | None]:
    key, task, length, item, names, winner = job
    return key, case_record(task, length, item, names, winner)


# ---- running ------------------------------------------------------------------------------------
def run_stage(out: Path, model: str, split: str, sizes: dict[str, int], names: Sequence[str],
              winner: str | None, workers: int) -> None:
    """Every missing case of ``split`` for ``model``; records are appended as they finish."""
    from transformers import AutoTokenizer

    from vllm_pelrp.explainer import resolve_model_path

    from references.faithfulness.tasks import load_items, task_case

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(model)))
    jobs, stored = [], {}
    for setting, (task, length) in SETTINGS.items():
        wanted = sizes.get(setting, 0)
        if wanted <= 0:
            continue
        path = records_path(out, model, setting, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        stored[setting] = {r["id"]: r for r in load_records(path)}
        usable = [i for i in load_items(task) if i["split"] == split
                  and task_case(task, i, tokenizer, length) is not None][:wanted]
        new = extra = 0
        for item in usable:
            record = stored[setting].get(item["id"])
            missing = [n for n in names if record is None or n not in record["methods"]]
            if (record is not None and "PA-LRP" in names and "PA-LRP" in record["methods"]
                    and record.get("pa_lrp") != winner):
                raise SystemExit(f"{path} holds PA-LRP = {record.get('pa_lrp')}, not {winner}: "
                                 "use another --out, or remove it")
            if missing:
                jobs.append((setting, task, length, item, missing, winner))
                new, extra = new + (record is None), extra + (record is not None)
        print(f"{model} {split} {setting}: {len(usable) - new} on disk ({extra} of them missing "
              f"a method), {new} to run", flush=True)
    if not jobs:
        return
    start, finished = time.perf_counter(), 0
    context = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    with context.Pool(workers, initializer=start_worker, initargs=(model, threads)) as pool:
        for setting, record in pool.imap_unordered(_run_job, jobs):
            finished += 1
            if record is None:
                continue
            previous = stored[setting].get(record["id"])
            if previous is None:
                stored[setting][record["id"]] = record
            else:  # more methods for a case on disk: same case, same target
                if previous["target_id"] != record["target_id"]:
                    raise RuntimeError(f"{record['id']}: target {record['target_id']} differs from "
                                       f"the stored {previous['target_id']}")
                previous["methods"].update(record["methods"])
                previous["forwards"] += record["forwards"]
                previous["flip_s"] += record["flip_s"]
                previous["pa_lrp"] = previous.get("pa_lrp") or record["pa_lrp"]
            write_records(records_path(out, model, setting, split), stored[setting].values())
            elapsed = time.perf_counter() - start
            print(f"  {model} {split} {setting} {finished}/{len(jobs)} {record['id']} "
                  f"({record['tokens']} tokens, {record['forwards']} forwards) {elapsed:.0f}s "
                  f"(~{elapsed / finished * (len(jobs) - finished) / 60:.0f} min left)", flush=True)


# ---- report -------------------------------------------------------------------------------------
def fmt(mean: float, se: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" if not np.isfinite(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def stats_table(stats: dict[str, dict]) -> list[str]:
    lines = ["| method | n | gap ± SE | Δ vs AttnLRP ± SE (paired) | ratio to AttnLRP | verdict | "
             "explain s |", "|---|---|---|---|---|---|---|"]
    for method in sorted(stats, key=lambda m: -stats[m]["gap"]):
        s = stats[method]
        name = f"**{method}**" if method in ("PA-LRP", BASELINE) else method
        delta = "—" if method == BASELINE else fmt(s["delta"], s["delta_se"])
        lines.append(f"| {name} | {s['n']} | {fmt(s['gap'], s['se'])} | {delta} | "
                     f"{s['ratio']:.3f} | {s['verdict']} | {s['time_s']:.2f} |")
    return lines


def summary_table(out: Path, models: Sequence[str], split: str) -> list[str]:
    """One row per model and setting: PA-LRP (the default) against our AttnLRP, and the paired
    differences of the paper's combination and of gradient×input to AttnLRP."""
    lines = [f"## Summary ({split} split)", "",
             "| model | setting | n | PA-LRP gap | AttnLRP gap | Δ PA-LRP ± SE | ratio | verdict | "
             f"Δ {PAPER_DEFAULT} ± SE | Δ grad×input ± SE |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model in models:
        for setting in SETTINGS:
            records = load_records(records_path(out, model, setting, split))
            stats = setting_stats(records) if records else {}
            if "PA-LRP" not in stats:
                continue
            pa, base = stats["PA-LRP"], stats[BASELINE]

            def delta(name: str) -> str:
                return fmt(stats[name]["delta"], stats[name]["delta_se"]) if name in stats else "—"

            lines.append(f"| {model} | {setting} | {pa['n']} | {fmt(pa['gap'], pa['se'])} | "
                         f"{fmt(base['gap'], base['se'])} | {delta('PA-LRP')} | {pa['ratio']:.3f} | "
                         f"{pa['verdict']} | {delta(PAPER_DEFAULT)} | {delta(GRADIENT)} |")
    return lines


def report(out: Path, models: Sequence[str], command: str) -> dict[str, Any]:
    winner, selection = choose(out, models)
    result: dict[str, Any] = {"command": command, "key": KEY, "winner": winner,
                              "selection": selection, "settings": {}}
    lines = ["# Faithfulness at scale: PA-LRP against AttnLRP", "",
             f"Command: `{command}` (records on disk are reused: a run resumes; the report "
             "covers every record there)", "",
             "gap = deletion gap + insertion gap on the normalised target probability p/p₀ "
             "(flipping to the neutral token in place at 0, 0.1, …, 1.0); mean ± standard error "
             "over cases; Δ = the method's gap minus our AttnLRP's on the same cases; a verdict "
             "other than a tie needs |Δ| > 2 SE.", ""]
    if winner:
        lines += ["## Dev: choosing the default", "",
                  f"Settings: {', '.join(selection['settings'])}.", "",
                  "Δ gap vs AttnLRP (paired, ± SE) per dev setting; n cases in the header.", ""]
        per_setting = {}
        for model in models:
            for setting in SETTINGS:
                records = load_records(records_path(out, model, setting, "dev"))
                if records:
                    per_setting[f"{model} {setting} (n={len(records)})"] = setting_stats(records)
        lines += ["| candidate | mean Δ | " + " | ".join(per_setting) + " |",
                  "|---|---|" + "---|" * len(per_setting)]
        for m, v in sorted(selection["mean_delta"].items(), key=lambda kv: -kv[1]):
            cells = [fmt(st[m]["delta"], st[m]["delta_se"]) if m in st else "—"
                     for st in per_setting.values()]
            lines.append(f"| {'**' + m + '**' if m == winner else m} | {v:+.3f} | " + " | ".join(cells) + " |")
        lines.append("| attnlrp (ours): gap | — | " + " | ".join(
            fmt(st[BASELINE]["gap"], st[BASELINE]["se"]) for st in per_setting.values()) + " |")
        lines.append("")
    lines += summary_table(out, models, "test") + [""]
    for split in ("test", "dev"):
        for model in models:
            for setting in SETTINGS:
                records = load_records(records_path(out, model, setting, split))
                if not records:
                    continue
                stats = setting_stats(records)
                result["settings"][f"{split}/{model}/{setting}"] = stats
                lines += [f"## {split.capitalize()}: {model}, {setting}", ""] + stats_table(stats) + [""]
    (out / "study.md").write_text("\n".join(lines) + "\n")
    (out / "study.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines))
    return result


def run(args: Any, given: Sequence[str], error: Any) -> int:
    """``--scale study`` / ``--scale full`` of the faithfulness runner (``run.main`` parses the
    flags; ``error`` reports a bad one)."""
    command = " ".join(["python -m bench.quality.faithfulness"] + [a for a in given if a != "--report"])
    out = args.out or DEFAULT_OUT
    models = [m for m in args.models.split(",") if m]
    sizes = json.loads(json.dumps(FULL_SIZES if args.scale == "full" else DEFAULT_SIZES))
    for override in args.size:
        where, _, n = override.partition("=")
        split, _, setting = where.partition(":")
        if split not in sizes or setting not in SETTINGS or not n.isdigit():
            error(f"--size {override!r}: expected SPLIT:SETTING=N with SPLIT dev or test and "
                  f"SETTING one of {', '.join(SETTINGS)}")
        sizes[split][setting] = int(n)
    stages = [s for s in args.stages.split(",") if s]
    if not args.report:
        if "dev" in stages:
            names = list(CANDIDATES) + [BASELINE]
            for model in models:
                run_stage(out, model, "dev", sizes["dev"], names, None, args.workers)
        if "test" in stages:
            winner = args.winner or choose(out, models)[0] or DEFAULT_COMBINATION
            print(f"test: PA-LRP = {winner}", flush=True)
            names = args.test_method or list(TEST_METHODS)
            for model in models:
                run_stage(out, model, "test", sizes["test"], names, winner, args.workers)
    report(out, models, command)
    return 0
