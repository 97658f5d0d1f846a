"""How the tests run LXT 2.1 (the reference AttnLRP): ``references/lxt_reference.py``, the one LXT
driver (also behind bench/quality/faithfulness and bench/perf/cpu_bench.py), in its own environment
``.venv-lxt`` (LXT needs transformers 4.x; ``bash references/lxt_env.sh`` makes it, scripts/test.sh
does). A helper module, not a test module: the test modules import it.

- ``run_lxt(model_dir, cases, mode)``: one process, the driver's output as it is (decoders:
  per case ``relevance`` = Σ_d E ⊙ g and ``logit``);
- ``run_lxt_jobs([(model_dir, cases, mode), ...])``: several such processes at once (a process
  holds one LXT rule set: attnlrp and cp-lrp need one each);
- ``lxt_relevances(cases, mode)`` / ``lxt_relevance(dir, ids, target)``: BERT and GPT-2 cases
  (each naming its own ``"model"``; both families go into one process), per-token lists as
  float64 arrays: ``relevance`` (Σ_d E ⊙ g at the word embeddings), ``relevance_embedding_sum``
  (Σ_d (E + P (+ T)) ⊙ g at the embedding sum) = ``relevance + relevance_position
  (+ relevance_token_type)``, ``target_value``; a cosine target's second text with the suffix
  ``_other``. Targets: ``{"kind": "logit", "position": p, "token_id": t}`` (or the flat
  ``target_position`` / ``target_token_id``), ``{"kind": "pooled", "dim": k, "pooling": "mean" |
  "cls"}``, ``{"kind": "cosine", "other_input_ids": [...], "pooling": ...}``, ``{"kind":
  "class", "label": i}`` (see references/lxt_reference.py).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LXT_PYTHON = ROOT / ".venv-lxt" / "bin" / "python"
REFERENCE = ROOT / "references" / "lxt_reference.py"


def run_lxt_jobs(jobs: list[tuple]) -> list[dict]:
    """Run each ``(model_dir, cases, mode)`` in its own ``.venv-lxt`` process, all started at
    once; the outputs in order. A failed process raises ``RuntimeError`` with its stderr (after
    every process has ended)."""
    if not LXT_PYTHON.exists():
        pytest.fail(f"{LXT_PYTHON} is missing: run `bash references/lxt_env.sh` (scripts/test.sh does)")
    with tempfile.TemporaryDirectory(prefix="lxt-") as work:
        work = Path(work)
        running = []
        for index, (model_dir, cases, mode) in enumerate(jobs):
            spec, out = work / f"in{index}.json", work / f"out{index}.json"
            spec.write_text(json.dumps({"cases": cases, "mode": mode, "time": False}))
            running.append((out, subprocess.Popen(
                [str(LXT_PYTHON), str(REFERENCE), "--model", str(model_dir),
                 "--input-json", str(spec), "--output-json", str(out)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        ended = [(out, process, process.communicate(timeout=600)[1]) for out, process in running]
        for _, process, stderr in ended:
            if process.returncode != 0:
                raise RuntimeError(f"lxt_reference.py failed:\n{stderr[-4000:]}")
        results = [json.loads(out.read_text()) for out, _, _ in ended]
    for result in results:
        assert result["versions"]["transformers"].startswith("4.")
    return results


def run_lxt(model_dir, cases: list[dict], mode: str = "attnlrp") -> dict:
    """LXT's explanations of ``cases`` on ``model_dir`` in one process: the driver's output."""
    return run_lxt_jobs([(model_dir, cases, mode)])[0]


def as_arrays(result: dict) -> list[dict]:
    """The driver's per-case results with their per-token lists as float64 numpy arrays."""
    return [{key: np.asarray(value, dtype=np.float64)
             if isinstance(value, list) and key != "input_ids" else value
             for key, value in case.items()} for case in result["cases"]]


def lxt_relevances(cases: list[dict], mode: str = "attnlrp") -> list[dict]:
    """BERT / GPT-2 ``cases`` (each with its ``"model"``) in one process (``as_arrays``)."""
    return as_arrays(run_lxt(cases[0]["model"], cases, mode))


def lxt_relevance(checkpoint_dir, input_ids, target: dict, mode: str = "attnlrp",
                  token_type_ids=None) -> dict:
    """LXT's explanation of one target (see ``lxt_relevances``) on one checkpoint."""
    case = {"model": str(checkpoint_dir), "input_ids": [int(t) for t in input_ids],
            "target": target}
    if token_type_ids is not None:
        case["token_type_ids"] = [int(t) for t in token_type_ids]
    return lxt_relevances([case], mode)[0]


def relative_l2(ours, theirs) -> float:
    """‖ours − theirs‖₂ / ‖theirs‖₂ in float64."""
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-30))
