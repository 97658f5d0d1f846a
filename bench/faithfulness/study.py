"""Faithfulness at scale: PA-LRP's combinations against AttnLRP on two models, next-token
prediction at 128 and 512 tokens and multiple choice, with paired statistics; the default
combination is chosen on the dev splits of all of them together.

    python -m bench.faithfulness.study                      # the default run (sizes below)
    python -m bench.faithfulness.study --scale full         # 150 dev + 150 test per setting
    python -m bench.faithfulness.study --report             # tables from what is on disk

Settings (one "setting" = model × task × context length):

* models: SmolLM2-135M-Instruct and Gemma 3 270M (base), fp32, the shipped checkpoints;
* tasks: ``prose@128`` and ``prose@512`` (next-token on GNU Info manual passages, the model's
  argmax next token, ``tasks.py``), and ``quiz`` (four-way multiple choice, the answer letter);
* the protocol of ``protocol.py``: in-place flipping to the neutral token at 0, 0.1, …, 1.0;
  **gap** = deletion gap + insertion gap on the normalised target probability min(p/p₀, 1).

Stages. ``dev``: every candidate combination (``methods.CANDIDATES``) and our AttnLRP on the
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

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .methods import CANDIDATES, DEFAULT_COMBINATION, PAPER_DEFAULT
from .protocol import CURVES

DEFAULT_OUT = Path(__file__).parent / "results" / "study"
MODELS = ("SmolLM2-135M-Instruct", "gemma-3-270m")
SETTINGS = {"prose@128": ("prose", 128), "prose@512": ("prose", 512), "quiz": ("quiz", 0)}
BASELINE = "attnlrp (ours)"
GRADIENT = "grad-x-input"
KEY = "gap_nprob"  # the ranking quantity
# cases per split and setting: the default run takes 1.5 to 2 hours on this 2-core machine
DEFAULT_SIZES = {"dev": {"prose@128": 16, "prose@512": 2, "quiz": 20},
                 "test": {"prose@128": 24, "prose@512": 10, "quiz": 30}}
FULL_SIZES = {split: {s: 150 for s in SETTINGS} for split in ("dev", "test")}
MIN_CASES_FOR_VERDICT = 10  # below this a standard error says too little to call a difference
TEST_METHODS = ("PA-LRP", PAPER_DEFAULT, BASELINE, GRADIENT)


# ---- one case (in a worker process) -------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _start_worker(model: str, threads: int) -> None:
    import torch

    from vllm_pelrp import load_explainer
    from vllm_pelrp.explainer import resolve_model_path

    torch.set_num_threads(threads)
    bind(load_explainer(str(resolve_model_path(model))))


def bind(ex: Any) -> None:
    """Make ``ex`` (a loaded ``Explainer``) the model that ``case_record`` explains."""
    from .methods import Methods
    from .tasks import neutral_token_id

    neutral_id, neutral_text = neutral_token_id(ex.tokenizer)
    _WORKER.update(ex=ex, methods=Methods(ex, neutral_id), neutral=(neutral_id, neutral_text))


def case_record(task: str, length: int, item: dict, names: Sequence[str], winner: str | None,
                batch_size: int = 8) -> dict | None:
    """Explain one item with every method in ``names`` and flip: the case's record."""
    from .methods import timed
    from .run import evaluate_case, resolve_target
    from .tasks import task_case

    ex, methods = _WORKER["ex"], _WORKER["methods"]
    neutral_id = _WORKER["neutral"][0]
    case = task_case(task, item, ex.tokenizer, length)
    if case is None:
        return None
    case = resolve_target(ex.hf_model, case)
    relevances: dict[str, np.ndarray] = {}
    times: dict[str, float] = {}
    candidates = [n for n in names if n in CANDIDATES or n == "PA-LRP"]
    if candidates:
        parts, seconds = timed(methods.engine, case, "pa-lrp")
        for name in candidates:
            relevances[name] = CANDIDATES[winner if name == "PA-LRP" else name](*parts)
            times[name] = seconds
    single = methods.single()
    for name in names:
        if name in single:
            relevances[name], times[name] = timed(single[name], case)
    start = time.perf_counter()
    curves, evaluated = evaluate_case(ex.hf_model, case, relevances, neutral_id, batch_size)
    return {
        "id": case.item_id, "pa_lrp": winner, "tokens": len(case.input_ids), "mutable": len(case.mutable),
        "target_id": case.target_id, "target_logit": case.meta["target_logit"],
        "correct": case.meta.get("correct"), "forwards": evaluated,
        "flip_s": time.perf_counter() - start,
        "methods": {name: {"aucs": {k: v for k, v in c.aucs.items() if not k.startswith("paper_")},
                           "curves": {n: c.curves[n]["nprob"] for n in CURVES},
                           "time_s": times[name]} for name, c in curves.items()},
    }


def _run_job(job: tuple) -> tuple[str, dict | None]:
    key, task, length, item, names, winner = job
    return key, case_record(task, length, item, names, winner)


# ---- storage ------------------------------------------------------------------------------------
def records_path(out: Path, model: str, setting: str, split: str) -> Path:
    return out / model / f"{setting}-{split}.jsonl"


def load_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- running ------------------------------------------------------------------------------------
def run_stage(out: Path, model: str, split: str, sizes: dict[str, int], names: Sequence[str],
              winner: str | None, workers: int) -> None:
    """Every missing case of ``split`` for ``model``; records are appended as they finish."""
    from transformers import AutoTokenizer

    from vllm_pelrp.explainer import resolve_model_path

    from .tasks import load_items, task_case

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
    with context.Pool(workers, initializer=_start_worker, initargs=(model, threads)) as pool:
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


def write_records(path: Path, records: Iterable[dict]) -> None:
    """All records of one file, replaced at once (a stop mid-write leaves the old file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


# ---- statistics ---------------------------------------------------------------------------------
def mean_se(values: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return (float(x.mean()) if len(x) else float("nan")), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x)))


def setting_stats(records: list[dict], key: str = KEY) -> dict[str, dict]:
    """Per method: its mean gap ± SE, and the paired difference to AttnLRP ± SE on the cases
    both have, the ratio of the means, and the verdict (beyond two standard errors or a tie)."""
    methods = sorted({m for r in records for m in r["methods"]})
    out = {}
    for method in methods:
        values = [r["methods"][method]["aucs"][key] for r in records if method in r["methods"]]
        both = [r for r in records if method in r["methods"] and BASELINE in r["methods"]]
        diff = [r["methods"][method]["aucs"][key] - r["methods"][BASELINE]["aucs"][key] for r in both]
        base = [r["methods"][BASELINE]["aucs"][key] for r in both]
        mean, se = mean_se(values)
        d, d_se = mean_se(diff)
        verdict = ("—" if method == BASELINE else
                   f"(n < {MIN_CASES_FOR_VERDICT})" if len(diff) < MIN_CASES_FOR_VERDICT else
                   "beats" if d > 2 * d_se else "loses" if d < -2 * d_se else "ties")
        out[method] = {"n": len(values), "gap": mean, "se": se, "delta": d, "delta_se": d_se,
                       "ratio": float(np.mean(values) / np.mean(base)) if both and np.mean(base) else float("nan"),
                       "verdict": verdict,
                       "time_s": float(np.mean([r["methods"][method]["time_s"] for r in records
                                                if method in r["methods"]]))}
    return out


def choose(out: Path, models: Sequence[str]) -> tuple[str | None, dict[str, Any]]:
    """The candidate with the largest mean, over every dev setting of every model, of its paired
    difference to AttnLRP's gap (each setting counts once; a difference, not a ratio, because
    AttnLRP's gap is near zero in some settings)."""
    deltas: dict[str, list[float]] = {}
    settings_used = []
    for model in models:
        for setting in SETTINGS:
            records = load_records(records_path(out, model, setting, "dev"))
            if not records:
                continue
            settings_used.append(f"{model} {setting}")
            for method, s in setting_stats(records).items():
                if method in CANDIDATES:
                    deltas.setdefault(method, []).append(s["delta"])
    if not deltas:
        return None, {}
    mean_delta = {m: float(np.mean(v)) for m, v in deltas.items() if len(v) == len(settings_used)}
    return max(mean_delta, key=mean_delta.get), {"mean_delta": mean_delta, "settings": settings_used}


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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faithfulness.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma list of shipped models or dirs")
    p.add_argument("--scale", choices=("default", "full"), default="default",
                   help="default: the sizes in DEFAULT_SIZES; full: 150 dev + 150 test per setting")
    p.add_argument("--stages", default="dev,test", help="comma list of: dev, test")
    p.add_argument("--size", action="append", default=[], metavar="SPLIT:SETTING=N",
                   help="override one size, e.g. test:prose@512=30")
    p.add_argument("--winner", default=None, choices=sorted(CANDIDATES),
                   help="skip the dev choice and test this candidate as PA-LRP")
    p.add_argument("--test-method", action="append", default=None, metavar="NAME",
                   help="a method for the test split, repeatable (default: "
                        f"{'; '.join(TEST_METHODS)}; PA-LRP is the dev winner)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--report", action="store_true", help="only write the report")
    args = p.parse_args(argv)
    given = list(argv if argv is not None else sys.argv[1:])
    command = " ".join(["python -m bench.faithfulness.study"] + [a for a in given if a != "--report"])
    models = [m for m in args.models.split(",") if m]
    sizes = json.loads(json.dumps(FULL_SIZES if args.scale == "full" else DEFAULT_SIZES))
    for override in args.size:
        where, _, n = override.partition("=")
        split, _, setting = where.partition(":")
        if split not in sizes or setting not in SETTINGS or not n.isdigit():
            p.error(f"--size {override!r}: expected SPLIT:SETTING=N with SPLIT dev or test and "
                    f"SETTING one of {', '.join(SETTINGS)}")
        sizes[split][setting] = int(n)
    stages = [s for s in args.stages.split(",") if s]
    if not args.report:
        if "dev" in stages:
            names = list(CANDIDATES) + [BASELINE]
            for model in models:
                run_stage(args.out, model, "dev", sizes["dev"], names, None, args.workers)
        if "test" in stages:
            winner = args.winner or choose(args.out, models)[0] or DEFAULT_COMBINATION
            print(f"test: PA-LRP = {winner}", flush=True)
            names = args.test_method or list(TEST_METHODS)
            for model in models:
                run_stage(args.out, model, "test", sizes["test"], names, winner, args.workers)
    report(args.out, models, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
