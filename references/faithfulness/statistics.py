"""The faithfulness study's records and paired statistics: one JSONL record per case, each
method's mean gap, its paired difference to AttnLRP with its standard error, the verdict, and
the rule that chose the default combination (fixed before the study's first case; see
docs/faithfulness.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .methods import CANDIDATES

SETTINGS = {"prose@128": ("prose", 128), "prose@512": ("prose", 512), "quiz": ("quiz", 0)}
BASELINE = "attnlrp (ours)"
GRADIENT = "grad-x-input"
KEY = "gap_nprob"  # the ranking quantity
MIN_CASES_FOR_VERDICT = 10  # below this a standard error says too little to call a difference


# ---- storage ------------------------------------------------------------------------------------
def records_path(out: Path, model: str, setting: str, split: str) -> Path:
    return out / model / f"{setting}-{split}.jsonl"


def load_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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


