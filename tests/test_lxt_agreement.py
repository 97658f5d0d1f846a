"""Our explanations against LXT 2.1's efficient AttnLRP (``lxt`` from PyPI), fp32.

All marked slow: LXT needs transformers 4.x, so it runs in its own environment (a subprocess)
through ``references/lxt_reference.py`` (``tests/lxt_driver.py``) on the same checkpoint. Within 1e-3 relative L2 per token:

* rotary decoders, ``attnlrp``: SmolLM2 (LLaMA), tiny random checkpoints of every family
  (``tests/tiny_models.py``: LLaMA, Qwen2, Qwen3, Gemma 3 with inputs longer than its sliding
  window) and the real Gemma 3 270M; target logits equal;
* additive position embeddings (tiny BERT, BERT classifier and GPT-2 of
  ``tests/tiny_additive.py``; the real all-MiniLM-L6-v2), through
  ``load_explainer(DIR).explain``: our ``attnlrp`` (and GPT-2's ``cp-lrp``) gives a token all of
  R(x_t) = Σ_d (E + P (+ T)) ⊙ g, LXT's relevance at the embedding sum; our ``pa-lrp`` splits it,
  its token part Σ_d E ⊙ g being LXT's own gradient×input at ``inputs_embeds`` (the word
  embeddings), its positional and token-type parts Σ_d P ⊙ g and Σ_d T ⊙ g. Targets: a pooled
  dimension, a cosine similarity (both texts), a classifier label of a text pair (token types 0
  and 1), a GPT-2 logit; their values equal.
"""

from __future__ import annotations

import sys

import pytest
import torch

from lxt_driver import as_arrays, lxt_relevance, relative_l2, run_lxt, run_lxt_jobs
from vllm_pelrp.default_model import default_checkpoint_dir

# every test here runs LXT in its own environment (a subprocess that loads transformers 4.x)
pytestmark = pytest.mark.slow

TOLERANCE = 1e-3
TEXTS = [
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
]


def compare_with_lxt(explainer, inputs, model_dir):
    """Explain each id list with ours (target = argmax next token) and with LXT in one call;
    returns [(relative L2, n tokens)]."""
    cases = []
    for ids in inputs:
        ours = explainer.explain(input_ids=ids, target="next", mode="attnlrp")
        cases.append({"input_ids": ids, "target_position": len(ids) - 1,
                      "target_token_id": ours.target.token_ids[0], "ours": ours})
    reference = run_lxt(model_dir, [{k: v for k, v in c.items() if k != "ours"} for c in cases])
    results = []
    for case, lxt_case in zip(cases, reference["cases"]):
        ours = case["ours"].token_relevance
        assert len(ours) == len(lxt_case["relevance"]) == len(case["input_ids"])
        assert lxt_case["logit"] == pytest.approx(case["ours"].target_logit, rel=1e-5)
        error = relative_l2(ours, lxt_case["relevance"])
        print(f"{reference['family']}: relative L2 vs LXT {error:.2e} "
              f"({len(ours)} tokens)", file=sys.stderr)
        results.append((error, len(ours)))
    return results


def test_attnlrp_matches_lxt(smollm2):
    inputs = [smollm2.encode_prompt(text, chat=False) for text in TEXTS]
    for error, _ in compare_with_lxt(smollm2, inputs, default_checkpoint_dir()):
        assert error < TOLERANCE


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
    for error, _ in compare_with_lxt(explainer, inputs, model_dir):
        assert error < TOLERANCE


GEMMA_TEXTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def square(x):\n    return",
]


def test_attnlrp_matches_lxt_gemma3_270m():
    """Real Gemma 3 270M (converted once into the user cache), two short texts, BOS first."""
    from vllm_pelrp import load_explainer

    from vllm_pelrp.shipped_models import ensure_checkpoint

    model_dir = ensure_checkpoint("gemma-3-270m")
    explainer = load_explainer(str(model_dir))
    tokenizer = explainer.tokenizer
    inputs = [[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
              for text in GEMMA_TEXTS]
    for error, _ in compare_with_lxt(explainer, inputs, model_dir):
        assert error < TOLERANCE


# ---- additive position embeddings: BERT and GPT-2 ------------------------------------------------
WORDS = " ".join(f"w{i}" for i in range(7, 19))  # the tiny word-level tokenizer's words
OTHER_WORDS = " ".join(f"w{i}" for i in (40, 9, 11, 52, 13, 60))
TINY_CASES = ["bert-dimension", "bert-similarity", "bert_cls-label-pair", "gpt2-logit-attnlrp",
              "gpt2-logit-cp-lrp"]


def check_against_lxt(name: str, ours: dict, lxt: dict, mode: str = "attnlrp") -> None:
    """``ours[mode]`` (attnlrp or cp-lrp) gives each token all of R(x_t): LXT's Σ_d (E+P(+T))⊙g;
    ``ours["pa-lrp"]`` (if given) splits it: its token, positional and token-type parts are
    LXT's Σ_d E⊙g, P⊙g, T⊙g. Both texts of a similarity target; the target values equal.
    The relative L2 errors are printed."""
    whole = ours[mode]
    value = whole.target.value if whole.target.value is not None else whole.target_logit
    assert lxt["target_value"] == pytest.approx(value, rel=1e-5, abs=1e-6)
    sides = [("", lambda e: e)] + ([("_other", lambda e: e.other)] if whole.other else [])
    for suffix, side in sides:
        # the driver's own checks: S = E + P (+ T), and the gradient at S is the one at E
        assert lxt["check_sum_equals_parts" + suffix] < 1e-5
        assert lxt["check_grad_sum_equals_grad_embeds" + suffix] == 0.0
        rows = [(f"{mode} token", side(whole).token_relevance,
                 lxt["relevance_embedding_sum" + suffix])]
        if "pa-lrp" in ours:
            pa = side(ours["pa-lrp"])
            rows += [("pa-lrp token", pa.token_relevance, lxt["relevance" + suffix]),
                     ("pa-lrp position", pa.positional_relevance,
                      lxt["relevance_position" + suffix])]
            if "relevance_token_type" + suffix in lxt:
                rows.append(("pa-lrp token type", pa.token_type_relevance,
                             lxt["relevance_token_type" + suffix]))
        for what, mine, theirs in rows:
            error = relative_l2(mine, theirs)
            print(f"{name}{' (other text)' if suffix else ''}: {what} vs LXT relative L2 "
                  f"{error:.2e} ({len(mine)} tokens)", file=sys.stderr)
            assert error < TOLERANCE, (name, suffix, what, error)


def _ids(explanation) -> list[int]:
    return [token.id for token in explanation.tokens]


def _in_modes(explainer, *args, modes=("attnlrp", "pa-lrp"), **kwargs) -> dict:
    """``explainer.explain(*args, **kwargs)`` in each of ``modes``: {mode: explanation}."""
    return {mode: explainer.explain(*args, mode=mode, **kwargs) for mode in modes}


def _lxt_pooled(explanation, dim: int, pooling: str) -> dict:
    """LXT's case for ``explanation`` of a pooled dimension (ids and target)."""
    return {"input_ids": _ids(explanation),
            "target": {"kind": "pooled", "dim": dim, "pooling": pooling}}


def _lxt_cosine(similarity) -> dict:
    """LXT's case for the explanation of a mean-pooled cosine similarity (both texts' ids)."""
    return {"input_ids": _ids(similarity),
            "target": {"kind": "cosine", "other_input_ids": _ids(similarity.other),
                       "pooling": "mean"}}


def _tiny_explainer(kind: str, directory):
    from tiny_additive import save_tiny_additive, tiny_config
    from tiny_models import tiny_tokenizer

    from vllm_pelrp import load_explainer

    save_tiny_additive(kind, directory)
    tiny_tokenizer(tiny_config(kind).vocab_size).save_pretrained(directory)
    return load_explainer(str(directory))


@pytest.fixture(scope="module")
def tiny_additive_vs_lxt(tmp_path_factory) -> dict:
    """Per case of TINY_CASES: (ours per mode, LXT's result, LXT's mode). The tiny BERT is a
    plain checkpoint, so its explainer pools [CLS] (the dimension target); the similarity pools
    the mean, as a sentence-transformers model does; the classifier explains a text pair. LXT in
    two processes at once: attnlrp (BERT and GPT-2 together) and GPT-2's cp-lrp."""
    from vllm_pelrp.engine.heads import Pooling
    from vllm_pelrp.explainer import EncoderExplainer

    root = tmp_path_factory.mktemp("lxt-additive")
    bert = _tiny_explainer("bert", root / "bert")
    assert bert.pooling.mode == "cls"
    mean = EncoderExplainer(bert.hf_model, bert.tokenizer, pooling=Pooling("mean", normalize=True))
    classifier = _tiny_explainer("bert_cls", root / "bert_cls")
    # the word-level tokenizer returns a pair's token types (0, then 1) when asked for them
    classifier.tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    gpt2 = _tiny_explainer("gpt2", root / "gpt2")
    pair_types = classifier.tokenizer(WORDS, OTHER_WORDS)["token_type_ids"]
    assert set(pair_types) == {0, 1}
    gpt2_ids = gpt2.encode_prompt(WORDS, chat=False)
    ours = {
        "bert-dimension": _in_modes(bert, WORDS, target={"dimension": 5}),
        "bert-similarity": _in_modes(mean, WORDS, target={"similarity": OTHER_WORDS}),
        "bert_cls-label-pair": _in_modes(classifier, WORDS, text_pair=OTHER_WORDS,
                                         target={"label": 1}),
        "gpt2-logit": _in_modes(gpt2, input_ids=gpt2_ids, target="next",
                                modes=("attnlrp", "pa-lrp", "cp-lrp")),
    }
    similarity = ours["bert-similarity"]["attnlrp"]
    gpt2_next = ours["gpt2-logit"]["attnlrp"]
    gpt2_case = {"model": str(root / "gpt2"), "input_ids": gpt2_ids,
                 "target_position": len(gpt2_ids) - 1,
                 "target_token_id": gpt2_next.target.token_ids[0]}
    attnlrp_cases = [
        {"model": str(root / "bert"), **_lxt_pooled(ours["bert-dimension"]["attnlrp"], 5, "cls")},
        {"model": str(root / "bert"), **_lxt_cosine(similarity)},
        {"model": str(root / "bert_cls"),
         "input_ids": _ids(ours["bert_cls-label-pair"]["attnlrp"]),
         "token_type_ids": pair_types, "target": {"kind": "class", "label": 1}},
        gpt2_case,
    ]
    attnlrp, cp_lrp = run_lxt_jobs([(root / "bert", attnlrp_cases, "attnlrp"),
                                    (root / "gpt2", [gpt2_case], "cp-lrp")])
    attnlrp, cp_lrp = as_arrays(attnlrp), as_arrays(cp_lrp)
    return {
        "bert-dimension": (ours["bert-dimension"], attnlrp[0], "attnlrp"),
        "bert-similarity": (ours["bert-similarity"], attnlrp[1], "attnlrp"),
        "bert_cls-label-pair": (ours["bert_cls-label-pair"], attnlrp[2], "attnlrp"),
        "gpt2-logit-attnlrp": (ours["gpt2-logit"], attnlrp[3], "attnlrp"),
        "gpt2-logit-cp-lrp": ({"cp-lrp": ours["gpt2-logit"]["cp-lrp"]}, cp_lrp[0], "cp-lrp"),
    }


@pytest.mark.parametrize("case", TINY_CASES)
def test_additive_matches_lxt_tiny(tiny_additive_vs_lxt, case):
    ours, lxt, mode = tiny_additive_vs_lxt[case]
    if case == "bert-similarity":  # both texts are compared
        assert "relevance_other" in lxt and ours[mode].other is not None
    check_against_lxt(case, ours, lxt, mode)


def test_additive_matches_lxt_minilm():
    """The real all-MiniLM-L6-v2 (mean pooling, normalised) through the public API: a pooled
    dimension and the cosine of two texts, both sides; LXT in one process."""
    from vllm_pelrp import load_explainer
    from vllm_pelrp.shipped_models import ensure_checkpoint

    explainer = load_explainer("all-MiniLM-L6-v2")
    assert explainer.pooling.mode == "mean"
    text, other = "The cat sits on the mat.", "A feline rests on a rug."
    ours = {
        "minilm-dimension": _in_modes(explainer, text, target={"dimension": 7}),
        "minilm-similarity": _in_modes(explainer, text, target={"similarity": other}),
    }
    similarity = ours["minilm-similarity"]["attnlrp"]
    model_dir = str(ensure_checkpoint("all-MiniLM-L6-v2", progress=False))
    lxt = as_arrays(run_lxt(model_dir, [_lxt_pooled(ours["minilm-dimension"]["attnlrp"], 7, "mean"),
                                        _lxt_cosine(similarity)]))
    assert similarity.target.value == pytest.approx(0.558404, abs=1e-5)
    for (name, explanations), result in zip(ours.items(), lxt):
        check_against_lxt(name, explanations, result)


def test_no_lxt_cp_lrp_for_bert(tmp_path):
    """LXT 2.1 has no CP-LRP rule set for BERT (hence no BERT cp-lrp case above): the driver
    says so instead of failing on a missing attribute (it exits before loading transformers)."""
    from tiny_additive import save_tiny_additive

    bert = save_tiny_additive("bert", tmp_path / "bert")
    with pytest.raises(RuntimeError, match="no cp-lrp rule set for bert"):
        lxt_relevance(bert, [4, 5, 6], {"kind": "pooled", "dim": 0}, mode="cp-lrp")
