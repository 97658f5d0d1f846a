"""The offline explain pipeline on models whose positions are an additive table: BERT-family
encoders (``EncoderExplainer``: dimension, similarity and label targets) and GPT-2 (the causal
``Explainer``), from ``load_explainer(DIR)`` to the wire format."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_additive import save_tiny_additive, tiny_config
from tiny_models import tiny_tokenizer
from vllm_pelrp import load_explainer
from vllm_pelrp.errors import ExplainInputError, TargetError
from vllm_pelrp.explainer import EncoderExplainer, Explainer
from vllm_pelrp.explanation import Explanation

TEXT = " ".join(f"w{i}" for i in range(7, 19))
OTHER = " ".join(f"w{i}" for i in (40, 9, 11, 52, 13, 60))


def _sentence_dir(directory, pooling: str, normalize: bool) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 64, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> EncoderExplainer:
    """A tiny random BertModel as a sentence-transformers directory (mean pooling, normalised)."""
    directory = tmp_path_factory.mktemp("tiny-st-bert")
    save_tiny_additive("bert", directory)
    tiny_tokenizer(tiny_config("bert").vocab_size).save_pretrained(directory)
    _sentence_dir(directory, "mean", True)
    explainer = load_explainer(str(directory))
    assert isinstance(explainer, EncoderExplainer)
    return explainer


def _pair_tokenizer(vocab_size: int):
    """The tiny word-level tokenizer with BERT's pair template: <bos> A <eos> B <eos>, token
    types 0 then 1."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = tiny_tokenizer(vocab_size).backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B:1 <eos>:1",
        special_tokens=[("<bos>", 2), ("<eos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", model_input_names=["input_ids", "token_type_ids", "attention_mask"])


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> EncoderExplainer:
    """A tiny random BertForSequenceClassification (a cross-encoder: text pairs)."""
    directory = tmp_path_factory.mktemp("tiny-bert-cls")
    save_tiny_additive("bert_cls", directory)
    _pair_tokenizer(tiny_config("bert_cls").vocab_size).save_pretrained(directory)
    return load_explainer(str(directory))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Explainer:
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    save_tiny_additive("gpt2", directory)
    tiny_tokenizer(tiny_config("gpt2").vocab_size).save_pretrained(directory)
    explainer = load_explainer(str(directory))
    assert isinstance(explainer, Explainer)
    return explainer


def _hf_embedding(explainer: EncoderExplainer, text: str) -> torch.Tensor:
    ids = torch.tensor([explainer.tokenizer(text)["input_ids"]])
    hidden = explainer.hf_model(input_ids=ids).last_hidden_state[0]
    return hidden.mean(0)


def _closes(explanation: Explanation, tol: float = 1e-4) -> None:
    assert explanation.conservation.relative_error_excluding_softmax < tol


def test_similarity_explains_both_texts_and_conserves_the_cosine(encoder):
    a, b = _hf_embedding(encoder, TEXT), _hf_embedding(encoder, OTHER)
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    explanation = encoder.explain(TEXT, target={"similarity": OTHER})
    other = explanation.other
    assert explanation.target.kind == other.target.kind == "similarity"
    assert explanation.target.value == pytest.approx(cosine, abs=1e-5)
    assert explanation.target_logit + other.target_logit == pytest.approx(cosine, abs=1e-5)
    assert [t.text.strip() for t in explanation.tokens] == TEXT.split()
    assert [t.text.strip() for t in other.tokens] == OTHER.split()
    for side in (explanation, other):
        _closes(side)
        assert [p.name for p in side.positional_parts] == ["position_embedding"]
        assert side.positional_parts[0].kind == "learned"
        assert side.token_type_relevance is not None
    assert other.other is None
    # the embedding the explainer reports is the served one: pooled, then normalised
    assert encoder.embed(TEXT) == pytest.approx(
        torch.nn.functional.normalize(a, dim=0).tolist(), abs=1e-5)
    # the wire format round-trips, other and all
    again = Explanation.model_validate_json(explanation.model_dump_json())
    assert again.other.token_relevance == other.token_relevance


def test_attnlrp_gives_the_token_what_pa_lrp_splits(encoder):
    pa = encoder.explain(TEXT, target={"similarity": OTHER})
    attn = encoder.explain(TEXT, target={"similarity": OTHER}, mode="attnlrp")
    assert attn.positional_parts == [] and attn.token_type_relevance is None
    assert attn.positional_relevance == [0.0] * len(attn.tokens)
    split = [t + p + k for t, p, k in zip(pa.token_relevance, pa.positional_relevance,
                                          pa.token_type_relevance)]
    assert attn.token_relevance == pytest.approx(split, abs=1e-6)
    assert attn.conservation.softmax_absorbed == pytest.approx(pa.conservation.softmax_absorbed,
                                                               abs=1e-6)
    # the positions carry real relevance in pa-lrp
    assert max(abs(v) for v in pa.positional_relevance) > 1e-3


def test_dimension_target_is_the_pooled_value_before_normalisation(encoder):
    pooled = _hf_embedding(encoder, TEXT)
    for mode in ("pa-lrp", "attnlrp", "cp-lrp"):
        explanation = encoder.explain(TEXT, target={"dimension": 5}, mode=mode)
        assert explanation.target.dimension == 5
        assert explanation.target_logit == pytest.approx(float(pooled[5]), abs=1e-5)
        _closes(explanation)
    with pytest.raises(TargetError, match="allowed 0 to 63"):
        encoder.explain(TEXT, target={"dimension": 64})
    with pytest.raises(TargetError, match="sequence-classification head"):
        encoder.explain(TEXT, target={"label": 0})
    with pytest.raises(TargetError, match="allowed: .*dimension"):
        encoder.explain(TEXT, target="next")
    with pytest.raises(TargetError, match="index of another input"):
        encoder.explain(TEXT, target={"similarity": 3})
    with pytest.raises(ExplainInputError, match="exceed the model's"):
        encoder.explain(" ".join(["w9"] * 1000), target={"dimension": 0})


def test_label_target_of_a_classifier_with_a_text_pair(classifier):
    hf = classifier.hf_model
    encoded = classifier.tokenizer(TEXT, OTHER)
    logits = hf(input_ids=torch.tensor([encoded["input_ids"]]),
                token_type_ids=torch.tensor([encoded["token_type_ids"]])).logits[0]
    assert set(encoded["token_type_ids"]) == {0, 1}
    for label in range(hf.config.num_labels):
        explanation = classifier.explain(TEXT, text_pair=OTHER, target={"label": label})
        assert explanation.target.label == label
        assert explanation.target_logit == pytest.approx(float(logits[label]), abs=1e-5)
        _closes(explanation)
        # the second segment's token-type embedding takes its own share
        second = [r for r, t in zip(explanation.token_type_relevance, encoded["token_type_ids"])
                  if t == 1]
        assert max(abs(r) for r in second) > 0
    name = hf.config.id2label[1]
    assert classifier.explain(TEXT, target={"label": name}).target.label == 1
    with pytest.raises(TargetError, match="allowed"):
        classifier.explain(TEXT, target={"label": hf.config.num_labels})


def test_gpt2_is_explained_by_the_causal_explainer(gpt2):
    hf = gpt2.hf_model
    ids = gpt2.encode_prompt(TEXT, chat=False)
    argmax = int(hf(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    explanation = gpt2.explain(TEXT, target="next")
    assert explanation.target.token_ids == [argmax]
    assert [p.name for p in explanation.positional_parts] == ["position_embedding"]
    assert explanation.token_type_relevance is None
    _closes(explanation)
    per_token = gpt2.explain(TEXT, completion=" w3 w4 w5", target="per_token")
    assert len(per_token.rows) == 3
    summed = [sum(row.token_relevance[i] for row in per_token.rows)
              for i in range(len(per_token.tokens))]
    assert per_token.token_relevance == pytest.approx(summed, abs=1e-5)
    for mode in ("attnlrp", "cp-lrp"):
        other = gpt2.explain(TEXT, target="next", mode=mode)
        assert other.positional_parts == []
        _closes(other)


@pytest.mark.slow
def test_real_minilm_similarity(tmp_path):
    """all-MiniLM-L6-v2 as shipped: its cosine (sentence-transformers 6.3 gives 0.558404 for
    this pair) is explained, half on each side, and conserved."""
    explainer = load_explainer("all-MiniLM-L6-v2")
    assert explainer.pooling.mode == "mean" and explainer.pooling.normalize
    explanation = explainer.explain("The cat sits on the mat.",
                                    target={"similarity": "A feline rests on a rug."})
    assert explanation.target.value == pytest.approx(0.558404, abs=1e-5)
    for side in (explanation, explanation.other):
        _closes(side)
    words = {t.text.strip(): r for t, r in zip(explanation.tokens, explanation.token_relevance)}
    assert max(words, key=words.get) == "cat"
