"""LXT 2.1's efficient AttnLRP on BERT and GPT-2 (additive position embeddings), through
``bench/lxt_reference.py`` in ``.venv-lxt`` (transformers 4.57), on tiny random checkpoints
written here with this environment's transformers.

What the reference returns per case (``lxt_relevance``; arrays are per token):
- ``relevance``: LXT's own gradient×input at ``inputs_embeds``, the word embeddings E:
  Σ_hidden E ⊙ g. HF's BERT/GPT-2 add the position (and token-type) embeddings inside the
  model, so this is not all the relevance that reaches the embedding layer;
- ``relevance_embedding_sum``: Σ_hidden S ⊙ g at the embedding sum S = E + P (+ T), the input
  of BERT's embedding LayerNorm / GPT-2's dropout (g is the same there: a sum passes the
  gradient on unchanged) = ``relevance + relevance_position (+ relevance_token_type)``. An
  engine that gives all of R(x_t) to token t compares to this one;
- ``target_value`` (also ``logit``), ``relevance_sum`` / ``relevance_embedding_sum_total`` and
  their ratios to the target (``conservation``, ``conservation_embedding_sum``); for a cosine
  target the second text's arrays carry the suffix ``_other`` and the totals cover both texts.

Checked here: shapes, determinism, the target equals this environment's plain transformers
forward (LXT's patches leave the forward alone), the split of S ⊙ g, and exact conservation
on bias-free models without layers (embeddings → LayerNorm → head), where every LXT rule on the
path is conservative, and for GPT-2's CP-LRP on a bias-free model with layers; otherwise
AttnLRP's softmax rule and the biases absorb relevance (measured, printed, not bounded).
Marked slow: the cosine of two texts on the real all-MiniLM-L6-v2.

Comparing an engine with LXT is then one call per case, e.g.
``lxt_relevance(dir, ids, {"kind": "pooled", "dim": 3})["relevance_embedding_sum"]``.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LXT_PYTHON = ROOT / ".venv-lxt" / "bin" / "python"
REFERENCE = ROOT / "bench" / "lxt_reference.py"
VOCAB = 100


# ---------------------------------------------------------------------------------------------
# The reference, one subprocess per call


def lxt_relevances(cases: list[dict], mode: str = "attnlrp") -> list[dict]:
    """LXT's explanations of ``cases`` in one ``.venv-lxt`` process. A case is
    ``{"model": DIR, "input_ids": [...], "target": {...}, "token_type_ids": [...]?}`` (every
    model of one family: BERT or GPT-2); targets:
    ``{"kind": "logit", "position": p, "token_id": t}`` (GPT2LMHeadModel),
    ``{"kind": "pooled", "dim": k, "pooling": "mean" | "cls"}``,
    ``{"kind": "cosine", "other_input_ids": [...], "pooling": "mean" | "cls"}`` (BertModel or
    a classifier's encoder) and ``{"kind": "class", "label": i}``
    (BertForSequenceClassification). Lists come back as float64 numpy arrays."""
    if not LXT_PYTHON.exists():
        pytest.fail(f"{LXT_PYTHON} is missing: run `bash bench/lxt_env.sh` (scripts/test.sh does)")
    with tempfile.TemporaryDirectory(prefix="lxt-additive-") as work:
        work = Path(work)
        (work / "in.json").write_text(json.dumps({"cases": cases, "mode": mode, "time": False}))
        process = subprocess.run(
            [str(LXT_PYTHON), str(REFERENCE), "--model", str(cases[0]["model"]),
             "--input-json", str(work / "in.json"), "--output-json", str(work / "out.json")],
            capture_output=True, text=True, timeout=600,
        )
        if process.returncode != 0:
            raise RuntimeError(f"lxt_reference.py failed:\n{process.stderr[-4000:]}")
        result = json.loads((work / "out.json").read_text())
    assert result["versions"]["transformers"].startswith("4.")
    return [{key: np.asarray(value, dtype=np.float64)
             if isinstance(value, list) and key != "input_ids" else value
             for key, value in case.items()} for case in result["cases"]]


def lxt_relevance(checkpoint_dir, input_ids, target: dict, mode: str = "attnlrp",
                  token_type_ids=None) -> dict:
    """LXT's explanation of one target (see ``lxt_relevances``) on one checkpoint."""
    case = {"model": str(checkpoint_dir), "input_ids": [int(t) for t in input_ids],
            "target": target}
    if token_type_ids is not None:
        case["token_type_ids"] = [int(t) for t in token_type_ids]
    return lxt_relevances([case], mode)[0]


# ---------------------------------------------------------------------------------------------
# Tiny random checkpoints (this environment's transformers, safetensors)


def _perturb(model, seed: int, biases: bool) -> None:
    """Non-trivial LayerNorm weights; random biases, or none at all (LayerNorm's included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("bias") or name.endswith(".b"):
                param.copy_(0.1 * noise if biases else torch.zeros_like(param))
            elif ("LayerNorm" in name or ".ln_" in name or name.startswith("ln_")
                  or "transformer.ln_f" in name) and param.dim() == 1:
                param.copy_(1 + 0.2 * noise)


def save_tiny_bert(path: Path, layers: int = 2, classifier: bool = False, biases: bool = True,
                   seed: int = 0) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    arch = "BertForSequenceClassification" if classifier else "BertModel"
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                        initializer_range=0.1, architectures=[arch],
                        **({"num_labels": 3} if classifier else {}))
    model = (BertForSequenceClassification(config) if classifier
             else BertModel(config, add_pooling_layer=False)).eval()
    _perturb(model, seed, biases)
    model.save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_gpt2(path: Path, layers: int = 2, biases: bool = True, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=64,
                        initializer_range=0.1, bos_token_id=0, eos_token_id=0,
                        architectures=["GPT2LMHeadModel"])
    model = GPT2LMHeadModel(config).eval()
    _perturb(model, seed, biases)
    model.save_pretrained(path, safe_serialization=True)
    return path


def _ids(n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n,), generator=generator).tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-additive")
    return {
        "bert": save_tiny_bert(root / "bert"),
        "bert-cls": save_tiny_bert(root / "bert-cls", classifier=True, seed=1),
        "bert0": save_tiny_bert(root / "bert0", layers=0, biases=False, seed=2),
        "bert0-cls": save_tiny_bert(root / "bert0-cls", layers=0, classifier=True, biases=False,
                                    seed=3),
        "gpt2": save_tiny_gpt2(root / "gpt2"),
        "gpt2-0": save_tiny_gpt2(root / "gpt2-0", layers=0, biases=False, seed=4),
        "gpt2-nobias": save_tiny_gpt2(root / "gpt2-nobias", biases=False, seed=5),
    }


# ---------------------------------------------------------------------------------------------
# This environment's transformers: the targets' values, independently of LXT


@functools.cache
def _plain_model(model_dir: Path):
    import transformers

    arch = transformers.AutoConfig.from_pretrained(model_dir).architectures[0]
    kwargs = {"add_pooling_layer": False} if arch == "BertModel" else {}
    return getattr(transformers, arch).from_pretrained(model_dir, dtype=torch.float32,
                                                        **kwargs).eval()


def _plain_value(model_dir: Path, case: dict) -> float:
    model = _plain_model(Path(model_dir))
    target = case["target"]
    types = case.get("token_type_ids")
    kwargs = {} if types is None else {"token_type_ids": torch.tensor([types])}
    with torch.no_grad():
        if target["kind"] == "logit":
            return float(model(torch.tensor([case["input_ids"]])).logits[
                0, target["position"], target["token_id"]])
        if target["kind"] == "class":
            return float(model(torch.tensor([case["input_ids"]]), **kwargs).logits[
                0, target["label"]])
        encoder = model.base_model

        def pooled(ids, kw):
            hidden = encoder(torch.tensor([ids]), **kw).last_hidden_state[0]
            return hidden.mean(0) if target.get("pooling", "mean") == "mean" else hidden[0]

        a = pooled(case["input_ids"], kwargs)
        if target["kind"] == "pooled":
            return float(a[target["dim"]])
        b = pooled(target["other_input_ids"], {})
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _check_case(case: dict, result: dict) -> None:
    n = len(case["input_ids"])
    parts = result["relevance"] + result["relevance_position"]
    if "relevance_token_type" in result:
        parts = parts + result["relevance_token_type"]
    for key in ("relevance", "relevance_embedding_sum", "relevance_position"):
        assert result[key].shape == (n,), key
        assert np.isfinite(result[key]).all(), key
    np.testing.assert_allclose(result["relevance_embedding_sum"], parts, rtol=1e-5, atol=1e-7)
    assert result["check_sum_equals_parts"] < 1e-6
    assert result["check_grad_sum_equals_grad_embeds"] == 0.0
    assert result["relevance_sum"] == pytest.approx(
        result["relevance"].sum() + result.get("relevance_other", np.zeros(1)).sum(), rel=1e-9)


def _print_conservation(label: str, result: dict) -> None:
    print(f"{label}: target {result['target_value']:+.5f}, "
          f"Σ E⊙g {result['relevance_sum']:+.5f} (×{result['conservation']:.4f}), "
          f"Σ S⊙g {result['relevance_embedding_sum_total']:+.5f} "
          f"(×{result['conservation_embedding_sum']:.4f})", file=sys.stderr)


# ---------------------------------------------------------------------------------------------


def test_bert_targets(tiny):
    """BertModel: a mean-pooled dimension, CLS pooling, a cosine of two texts (token types
    given on one); BertForSequenceClassification: a label's logit and its encoder's pooled
    dimension; one case twice (determinism); bias-free models without layers conserve exactly."""
    a, b = _ids(9, 0), _ids(6, 1)
    cases = [
        {"model": str(tiny["bert"]), "input_ids": a, "target": {"kind": "pooled", "dim": 5}},
        {"model": str(tiny["bert"]), "input_ids": a, "target": {"kind": "pooled", "dim": 5}},
        {"model": str(tiny["bert"]), "input_ids": a,
         "target": {"kind": "pooled", "dim": 17, "pooling": "cls"}},
        {"model": str(tiny["bert"]), "input_ids": a, "token_type_ids": [0] * 5 + [1] * 4,
         "target": {"kind": "cosine", "other_input_ids": b}},
        {"model": str(tiny["bert-cls"]), "input_ids": b, "target": {"kind": "class", "label": 2}},
        {"model": str(tiny["bert-cls"]), "input_ids": b, "target": {"kind": "pooled", "dim": 0}},
        {"model": str(tiny["bert0"]), "input_ids": a, "target": {"kind": "pooled", "dim": 3}},
        {"model": str(tiny["bert0"]), "input_ids": a,
         "target": {"kind": "cosine", "other_input_ids": b}},
        {"model": str(tiny["bert0-cls"]), "input_ids": b, "target": {"kind": "class", "label": 1}},
    ]
    results = lxt_relevances(cases)
    assert len(results) == len(cases)
    for index, (case, result) in enumerate(zip(cases, results)):
        _check_case(case, result)
        assert result["relevance_token_type"].shape == (len(case["input_ids"]),)
        assert result["target_value"] == pytest.approx(_plain_value(Path(case["model"]), case),
                                                       rel=1e-4, abs=1e-6)
        _print_conservation(f"bert case {index} {case['target']['kind']}", result)
    for key in ("relevance", "relevance_embedding_sum", "relevance_position"):
        np.testing.assert_array_equal(results[0][key], results[1][key])  # deterministic
    cosine = results[3]
    assert cosine["relevance_other"].shape == (len(b),)
    assert cosine["relevance_embedding_sum_other"].shape == (len(b),)
    assert cosine["target_value"] == pytest.approx(cosine["cosine_plain"], abs=1e-6)
    # no layers, no biases: every rule on the path is conservative, so S ⊙ g sums to the target
    for result in results[6:]:
        assert result["conservation_embedding_sum"] == pytest.approx(1.0, abs=1e-5)
    # the cosine rule gives each text half of the dot product: cos/2 per side
    exact = results[7]
    half = exact["target_value"] / 2
    assert exact["relevance_embedding_sum"].sum() == pytest.approx(half, rel=1e-4)
    assert exact["relevance_embedding_sum_other"].sum() == pytest.approx(half, rel=1e-4)


@pytest.mark.parametrize("mode", ["attnlrp", "cp-lrp"])
def test_gpt2_logit(tiny, mode):
    """GPT2LMHeadModel logits (the decoders' flat target form too); deterministic; causal;
    exact conservation without biases and layers, and for CP-LRP (the softmax kept out of the
    relevance path) without biases at all."""
    ids = _ids(12, 2)
    logit_11 = {"kind": "logit", "position": 11, "token_id": 7}
    cases = [
        {"model": str(tiny["gpt2"]), "input_ids": ids, "target": logit_11},
        {"model": str(tiny["gpt2"]), "input_ids": ids, "target_position": -1,
         "target_token_id": 7},
        {"model": str(tiny["gpt2"]), "input_ids": ids,
         "target": {"kind": "logit", "position": 4, "token_id": 50}},
        {"model": str(tiny["gpt2-0"]), "input_ids": ids, "target": logit_11},
        {"model": str(tiny["gpt2-nobias"]), "input_ids": ids, "target": logit_11},
    ]
    results = lxt_relevances(cases, mode=mode)
    for index, (case, result) in enumerate(zip(cases, results)):
        assert result["target"] == (logit_11 if index != 2 else cases[2]["target"])
        _check_case(case, result)
        assert "relevance_token_type" not in result
        plain = _plain_value(Path(case["model"]), {**case, "target": result["target"]})
        assert result["target_value"] == pytest.approx(plain, rel=1e-4, abs=1e-6)
        _print_conservation(f"gpt2 {mode} case {index}", result)
    for key in ("relevance", "relevance_embedding_sum"):
        np.testing.assert_array_equal(results[0][key], results[1][key])
    assert np.all(results[2]["relevance_embedding_sum"][5:] == 0)  # causal
    assert results[3]["conservation_embedding_sum"] == pytest.approx(1.0, abs=1e-5)
    if mode == "cp-lrp":
        assert results[4]["conservation_embedding_sum"] == pytest.approx(1.0, abs=1e-5)


def test_refusals(tiny):
    """No CP-LRP rule set for BERT in LXT 2.1; targets must fit the architecture."""
    with pytest.raises(RuntimeError, match="no cp-lrp rule set for bert"):
        lxt_relevance(tiny["bert"], _ids(5, 0), {"kind": "pooled", "dim": 0}, mode="cp-lrp")
    with pytest.raises(RuntimeError, match="needs BertForSequenceClassification"):
        lxt_relevance(tiny["bert"], _ids(5, 0), {"kind": "class", "label": 0})


def test_tiny_checkpoints_load_in_transformers_4(tiny):
    """The checkpoints written by transformers 5 load in .venv-lxt's 4.57 with every weight."""
    script = (
        "import sys, transformers, json\n"
        "from transformers import AutoConfig\n"
        "out = {}\n"
        "for d in sys.argv[1:]:\n"
        "    c = AutoConfig.from_pretrained(d)\n"
        "    cls = getattr(transformers, c.architectures[0])\n"
        "    m, info = cls.from_pretrained(d, output_loading_info=True)\n"
        "    out[d] = [c.model_type, sorted(info['missing_keys']), "
        "sorted(info['unexpected_keys'])]\n"
        "print(json.dumps(out))\n"
    )
    dirs = [str(tiny[name]) for name in ("bert", "bert-cls", "gpt2", "bert0")]
    process = subprocess.run([str(LXT_PYTHON), "-c", script, *dirs], capture_output=True,
                             text=True, timeout=300, check=True)
    loaded = json.loads(process.stdout.strip().splitlines()[-1])
    for directory in dirs:
        model_type, missing, unexpected = loaded[directory]
        assert model_type in ("bert", "gpt2")
        assert unexpected == []
        # BertModel without a pooler: transformers 4 adds one (never used by the targets)
        assert [k for k in missing if not k.startswith("pooler.")] == [], missing


@pytest.mark.slow
def test_real_minilm_cosine():
    """The shipped all-MiniLM-L6-v2 (unpacked once into the user cache): LXT's cosine target
    equals sentence-transformers' cosine of the two texts (tests/test_sentence_models.py), the
    content words carry the most relevance, and the gradient at the embedding sum is the
    gradient at the word embeddings."""
    from transformers import AutoTokenizer

    from vllm_pelrp.shipped_models import MINILM_NAME, ensure_checkpoint

    model_dir = ensure_checkpoint(MINILM_NAME, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    a = tokenizer("The cat sits on the mat.")["input_ids"]
    b = tokenizer("A feline rests on a rug.")["input_ids"]
    result = lxt_relevance(model_dir, a, {"kind": "cosine", "other_input_ids": b})
    assert result["target_value"] == pytest.approx(0.5584037899971008, abs=1e-5)
    assert result["check_grad_sum_equals_grad_embeds"] == 0.0
    tokens = tokenizer.convert_ids_to_tokens(a)
    assert tokens[int(np.argmax(result["relevance_embedding_sum"]))] == "cat"
    _print_conservation("all-MiniLM-L6-v2 cosine", result)
    assert 0 < result["conservation_embedding_sum"] < 1.5
