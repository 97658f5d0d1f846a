"""Our ``attnlrp`` mode against LXT's efficient AttnLRP (``lxt`` from PyPI) on SmolLM2, fp32.

LXT 2.1 needs transformers 4.x, so it runs in its own environment (``bench/lxt_env.sh``, which
``scripts/test.sh`` creates) on the same converted checkpoint. Target: token relevance within
1e-3 relative L2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_pelrp.default_model import default_checkpoint_dir

ROOT = Path(__file__).resolve().parents[1]
LXT_PYTHON = ROOT / ".venv-lxt" / "bin" / "python"
TEXTS = [
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
]


def run_lxt(cases, mode="attnlrp"):
    if not LXT_PYTHON.exists():
        pytest.fail(f"{LXT_PYTHON} is missing: run `bash bench/lxt_env.sh` (scripts/test.sh does)")
    work = Path(__import__("tempfile").mkdtemp())
    (work / "in.json").write_text(json.dumps({"cases": cases, "mode": mode, "time": False}))
    subprocess.run(
        [str(LXT_PYTHON), str(ROOT / "bench" / "lxt_reference.py"), "--model",
         str(default_checkpoint_dir()), "--input-json", str(work / "in.json"),
         "--output-json", str(work / "out.json")],
        check=True, timeout=600,
    )
    return json.loads((work / "out.json").read_text())


def test_attnlrp_matches_lxt(smollm2):
    cases = []
    for text in TEXTS:
        ids = smollm2.encode_prompt(text, chat=False)
        ours = smollm2.explain(input_ids=ids, target="next", mode="attnlrp")
        cases.append({"input_ids": ids, "target_position": len(ids) - 1,
                      "target_token_id": ours.target.token_ids[0], "ours": ours})
    reference = run_lxt([{k: v for k, v in c.items() if k != "ours"} for c in cases])
    assert reference["versions"]["transformers"].startswith("4.")
    for case, lxt_case in zip(cases, reference["cases"]):
        ours = torch.tensor(case["ours"].token_relevance, dtype=torch.float64)
        theirs = torch.tensor(lxt_case["relevance"], dtype=torch.float64)
        assert lxt_case["logit"] == pytest.approx(case["ours"].target_logit, rel=1e-5)
        relative_l2 = float((ours - theirs).norm() / theirs.norm())
        print(f"relative L2 vs LXT: {relative_l2:.2e} ({len(ours)} tokens)", file=sys.stderr)
        assert relative_l2 < 1e-3
