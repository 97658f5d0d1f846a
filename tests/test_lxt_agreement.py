"""Our ``attnlrp`` mode against LXT's efficient AttnLRP (``lxt`` from PyPI), fp32.

LXT 2.1 needs transformers 4.x, so it runs in its own environment (``bench/lxt_env.sh``, which
``scripts/test.sh`` creates) on the same checkpoint: SmolLM2 (LLaMA), tiny random checkpoints
of every family (``tests/tiny_models.py``: LLaMA, Qwen2, Qwen3, Gemma 3 with inputs longer
than its sliding window) and, marked slow, the real Gemma 3 270M. Target: token relevance
within 1e-3 relative L2, target logits equal.
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


def run_lxt(cases, mode="attnlrp", model_dir=None):
    """LXT's explanation of ``cases`` on ``model_dir`` (default: SmolLM2), one subprocess."""
    if model_dir is None:
        model_dir = default_checkpoint_dir()
    if not LXT_PYTHON.exists():
        pytest.fail(f"{LXT_PYTHON} is missing: run `bash bench/lxt_env.sh` (scripts/test.sh does)")
    work = Path(__import__("tempfile").mkdtemp())
    (work / "in.json").write_text(json.dumps({"cases": cases, "mode": mode, "time": False}))
    subprocess.run(
        [str(LXT_PYTHON), str(ROOT / "bench" / "lxt_reference.py"), "--model",
         str(model_dir), "--input-json", str(work / "in.json"),
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


def compare_with_lxt(explainer, inputs, model_dir):
    """Explain each id list with ours (target = argmax next token) and with LXT in one call;
    returns [(relative L2, n tokens)]."""
    cases = []
    for ids in inputs:
        ours = explainer.explain(input_ids=ids, target="next", mode="attnlrp")
        cases.append({"input_ids": ids, "target_position": len(ids) - 1,
                      "target_token_id": ours.target.token_ids[0], "ours": ours})
    reference = run_lxt([{k: v for k, v in c.items() if k != "ours"} for c in cases],
                        model_dir=model_dir)
    assert reference["versions"]["transformers"].startswith("4.")
    results = []
    for case, lxt_case in zip(cases, reference["cases"]):
        ours = torch.tensor(case["ours"].token_relevance, dtype=torch.float64)
        theirs = torch.tensor(lxt_case["relevance"], dtype=torch.float64)
        assert len(ours) == len(theirs) == len(case["input_ids"])
        assert lxt_case["logit"] == pytest.approx(case["ours"].target_logit, rel=1e-5)
        relative_l2 = float((ours - theirs).norm() / theirs.norm())
        print(f"{reference['family']}: relative L2 vs LXT {relative_l2:.2e} "
              f"({len(ours)} tokens)", file=sys.stderr)
        results.append((relative_l2, len(ours)))
    return results


def _tiny_inputs(vocab_size, lengths=(9, 30), seed=0):
    """BOS (id 2) followed by random word ids; 30 > Gemma's tiny sliding window of 8."""
    generator = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(4, vocab_size, (n - 1,), generator=generator).tolist()
            for n in lengths]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_attnlrp_matches_lxt_tiny(family, tmp_path):
    from tiny_models import save_tiny

    from vllm_pelrp import load_explainer

    model_dir = save_tiny(family, tmp_path / family)
    explainer = load_explainer(str(model_dir))
    inputs = _tiny_inputs(explainer.hf_model.config.vocab_size)
    assert max(map(len, inputs)) >= 24
    for ids in inputs:  # the target really is the argmax next token of the HF model
        with torch.no_grad():
            logits = explainer.hf_model(torch.tensor([ids])).logits[0, -1]
        ours = explainer.explain(input_ids=ids, target="next", mode="attnlrp")
        assert ours.target.token_ids[0] == int(logits.argmax())
    for relative_l2, _ in compare_with_lxt(explainer, inputs, model_dir):
        assert relative_l2 < 1e-3


GEMMA_TEXTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def square(x):\n    return",
]


@pytest.mark.slow
def test_attnlrp_matches_lxt_gemma3_270m():
    """Real Gemma 3 270M (converted once into the user cache), two short texts, BOS first."""
    from vllm_pelrp import load_explainer

    from vllm_pelrp.shipped_models import ensure_checkpoint

    model_dir = ensure_checkpoint("gemma-3-270m")
    explainer = load_explainer(str(model_dir))
    tokenizer = explainer.tokenizer
    inputs = [[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
              for text in GEMMA_TEXTS]
    for relative_l2, _ in compare_with_lxt(explainer, inputs, model_dir):
        assert relative_l2 < 1e-3
