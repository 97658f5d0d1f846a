"""One decoder case through the flipping protocol: the model's readings, the target (its
argmax), every method's curves; and ``case_record``, the study's record of one case (every
method explained, flipped and scored). Used by the faithfulness runner
(``python -m bench.quality.faithfulness``) and by the tests' check on the default model."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .methods import CANDIDATES, Methods, timed
from .protocol import CURVES, CaseCurves, Reading, ReadingCache, curve_inputs
from .tasks import Case, neutral_token_id, task_case

REFERENCES = Path(__file__).resolve().parents[1]
REPO = REFERENCES.parent
LXT_NAME = "lxt-attnlrp (external)"


# ---- model readings ---------------------------------------------------------------------------
def make_reader(model: Any, case: Case):
    prob_ids = case.prob_ids
    target = case.target_id

    @torch.no_grad()
    def read_batch(sequences: list[tuple[int, ...]]) -> list[Reading]:
        logits = model(torch.tensor(sequences), use_cache=False, logits_to_keep=1).logits[:, -1].float()
        if prob_ids is None:
            probs = torch.softmax(logits, -1)[:, target]
        else:
            probs = torch.softmax(logits[:, prob_ids], -1)[:, prob_ids.index(target)]
        return [Reading(float(l), float(p)) for l, p in zip(logits[:, target], probs)]

    return read_batch


@torch.no_grad()
def resolve_target(model: Any, case: Case) -> Case:
    """The model's argmax (over the vocabulary, or over the answer letters) at the last position."""
    logits = model(torch.tensor([case.input_ids]), use_cache=False, logits_to_keep=1).logits[0, -1]
    if case.prob_ids is None:
        case.target_id = int(logits.argmax())
    else:
        case.target_id = case.prob_ids[int(logits[case.prob_ids].argmax())]
        case.meta["correct"] = case.prob_ids.index(case.target_id) == case.meta.get("answer")
    case.meta["target_logit"] = float(logits[case.target_id])
    return case


def evaluate_case(model: Any, case: Case, relevances: dict[str, np.ndarray], neutral_id: int,
                  batch_size: int = 32) -> tuple[dict[str, CaseCurves], int]:
    """Curves of every method on one case (perturbed inputs shared and batched)."""
    cache = ReadingCache(make_reader(model, case), batch_size)
    mutable = np.asarray(case.mutable)
    inputs = {name: curve_inputs(case.input_ids, case.mutable, np.asarray(rel)[mutable], neutral_id)
              for name, rel in relevances.items()}
    original = tuple(case.input_ids)
    wanted = [original] + [s for per in inputs.values() for seqs in per.values() for s in seqs]
    read = cache.read(wanted)
    out = {name: CaseCurves.from_readings(per, read, read[original]) for name, per in inputs.items()}
    return out, cache.evaluated


# ---- external LXT -----------------------------------------------------------------------------
def lxt_python() -> Path | None:
    path = REPO / ".venv-lxt" / "bin" / "python"
    return path if path.exists() else None


def run_lxt(model_dir: Path, cases: Sequence[Case], threads: int | None) -> dict[str, Any] | None:
    """LXT AttnLRP for all cases in one subprocess (its own env); None when unavailable."""
    python = lxt_python()
    if python is None:
        print("  lxt: .venv-lxt missing (run `bash references/lxt_env.sh`); skipped", flush=True)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.json", Path(tmp) / "out.json"
        source.write_text(json.dumps({"model": str(model_dir), "threads": threads, "cases": [
            {"input_ids": c.input_ids, "target_position": c.target_position,
             "target_token_id": c.target_id} for c in cases]}))
        proc = subprocess.run([str(python), str(REFERENCES / "lxt_flipping_worker.py"),
                               str(source), str(target)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"  lxt failed; skipped:\n{proc.stderr[-2000:]}", flush=True)
            return None
        return json.loads(target.read_text())


# ---- one case (in a worker process) -------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def start_worker(model: str, threads: int) -> None:
    """A worker process's start: load ``model`` with ``threads`` torch threads and bind it."""
    from vllm_pelrp import load_explainer
    from vllm_pelrp.explainer import resolve_model_path

    torch.set_num_threads(threads)
    bind(load_explainer(str(resolve_model_path(model))))


def bind(ex: Any) -> None:
    """Make ``ex`` (a loaded ``Explainer``) the model that ``case_record`` explains."""
    neutral_id, neutral_text = neutral_token_id(ex.tokenizer)
    _WORKER.update(ex=ex, methods=Methods(ex, neutral_id), neutral=(neutral_id, neutral_text))


def case_record(task: str, length: int, item: dict, names: Sequence[str], winner: str | None,
                batch_size: int = 8) -> dict | None:
    """Explain one item with every method in ``names`` and flip: the case's record."""
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


