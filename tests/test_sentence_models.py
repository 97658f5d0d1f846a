"""Sentence-embedding models: the sentence-transformers directory reader
(``vllm_pelrp.sentence_models``) on small directories written here, and the shipped
all-MiniLM-L6-v2 (unpacked once into the user cache by ``ensure_checkpoint``, as
scripts/setup.sh does) loaded with plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_pelrp.sentence_models import (
    SentenceEmbeddingConfig,
    UnsupportedSentenceModelError,
    read_sentence_config,
)
from vllm_pelrp.shipped_models import MINILM_NAME, ensure_checkpoint

OLD_TYPES = {  # what sentence-transformers < 6 writes into modules.json
    "Transformer": "sentence_transformers.models.Transformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Normalize": "sentence_transformers.models.Normalize",
    "Dense": "sentence_transformers.models.Dense",
}
NEW_TYPES = {  # sentence-transformers 6.3
    "Transformer": "sentence_transformers.base.modules.transformer.Transformer",
    "Pooling": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
    "Normalize": "sentence_transformers.base.modules.normalize.Normalize",
}


def write_sentence_dir(root: Path, modules, pooling: dict, sbert: dict | None = None,
                       tokenizer_config: dict | None = None, types=OLD_TYPES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize",
             "Dense": "2_Dense"}
    (root / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": paths[kind], "type": types[kind]}
        for i, kind in enumerate(modules)
    ]))
    (root / "1_Pooling").mkdir(exist_ok=True)
    (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if sbert is not None:
        (root / "sentence_bert_config.json").write_text(json.dumps(sbert))
    if tokenizer_config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return root


def legacy_pooling(key: str | None, dimension: int = 8) -> dict:
    """The Pooling config sentence-transformers < 6 writes, with only ``pooling_mode_<key>``
    set (None: none set)."""
    keys = ["cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens"]
    return {"word_embedding_dimension": dimension,
            **{f"pooling_mode_{name}": name == key for name in keys}}


def test_mean_and_normalize(tmp_path):
    path = write_sentence_dir(tmp_path / "st", ["Transformer", "Pooling", "Normalize"],
                              legacy_pooling("mean_tokens", 384), sbert={"max_seq_length": 256},
                              tokenizer_config={"model_max_length": 512})
    config = read_sentence_config(path)
    assert config == SentenceEmbeddingConfig(pooling="mean", normalize=True, max_seq_length=256,
                                             dimension=384)


def test_cls_without_normalize_in_sentence_transformers_6_layout(tmp_path):
    """Version 6 spells the mode out, names its modules' new homes and keeps the maximum
    length as the tokenizer's model_max_length."""
    path = write_sentence_dir(
        tmp_path / "st", ["Transformer", "Pooling"],
        {"embedding_dimension": 16, "pooling_mode": "cls", "include_prompt": True},
        sbert={"transformer_task": "feature-extraction"},
        tokenizer_config={"model_max_length": 128}, types=NEW_TYPES,
    )
    config = read_sentence_config(path)
    assert (config.pooling, config.normalize, config.max_seq_length, config.dimension) == (
        "cls", False, 128, 16)


def test_plain_hugging_face_directory_is_none(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert read_sentence_config(tmp_path) is None
    assert read_sentence_config(tmp_path / "missing") is None


@pytest.mark.parametrize("pooling, named", [
    (legacy_pooling("max_tokens"), "max pooling"),
    (legacy_pooling("mean_sqrt_len_tokens"), "mean_sqrt_len pooling"),
    ({"embedding_dimension": 8, "pooling_mode": "lasttoken"}, "lasttoken pooling"),
    ({**legacy_pooling("mean_tokens"), "pooling_mode_cls_token": True}, "exactly one of"),
    ({**legacy_pooling(None), "pooling_mode_fancy_tokens": True}, "pooling_mode_fancy_tokens"),
    (legacy_pooling(None), "exactly one of"),
])
def test_unsupported_pooling_names_what_is_supported(tmp_path, pooling, named):
    path = write_sentence_dir(tmp_path / "st", ["Transformer", "Pooling", "Normalize"], pooling)
    with pytest.raises(UnsupportedSentenceModelError, match=named) as error:
        read_sentence_config(path)
    assert "mean, cls" in str(error.value)


def test_prompt_excluding_pooling_is_refused(tmp_path):
    path = write_sentence_dir(tmp_path / "st", ["Transformer", "Pooling"],
                              {"embedding_dimension": 8, "pooling_mode": "mean",
                               "include_prompt": False})
    with pytest.raises(UnsupportedSentenceModelError, match="include_prompt"):
        read_sentence_config(path)


@pytest.mark.parametrize("modules", [
    ["Transformer", "Pooling", "Dense", "Normalize"],
    ["Transformer", "Pooling", "Normalize", "Normalize"],
    ["Pooling", "Transformer"],
    ["Transformer"],
])
def test_unsupported_modules_name_the_supported_pipeline(tmp_path, modules):
    path = write_sentence_dir(tmp_path / "st", modules, legacy_pooling("mean_tokens"))
    with pytest.raises(UnsupportedSentenceModelError,
                       match="supported: Transformer → Pooling \\(mean or cls\\) → optional "
                             "Normalize"):
        read_sentence_config(path)


def test_transformer_in_a_subdirectory_is_refused(tmp_path):
    path = write_sentence_dir(tmp_path / "st", ["Transformer", "Pooling"],
                              legacy_pooling("cls_token"))
    modules = json.loads((path / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedSentenceModelError, match="0_Transformer"):
        read_sentence_config(path)


def test_unsupported_is_an_unsupported_model_error():
    from vllm_pelrp.engine.spec import UnsupportedModelError

    assert issubclass(UnsupportedSentenceModelError, UnsupportedModelError)


# ---------------------------------------------------------------------------------------------
# The shipped all-MiniLM-L6-v2

TEXTS = ["The cat sits on the mat.", "A feline rests on a rug.",
         "Quantum chromodynamics describes quarks."]
# Cosine similarities of TEXTS' embeddings from sentence-transformers 6.3.0's own
# SentenceTransformer(dir).encode on the unpacked directory (measured once outside this
# project's environment; the embeddings equal the ones below exactly).
ST_COSINES = {(0, 1): 0.5584037899971008, (0, 2): -0.026560382917523384,
              (1, 2): 0.05456192418932915}


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return ensure_checkpoint(MINILM_NAME, progress=False)


def test_minilm_config_and_sentence_pipeline(minilm_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(minilm_dir)
    assert config.architectures == ["BertModel"] and config.model_type == "bert"
    assert (config.num_hidden_layers, config.hidden_size) == (6, 384)
    assert config.num_attention_heads == 12
    assert config.max_position_embeddings == 512
    assert config.position_embedding_type == "absolute"
    assert read_sentence_config(minilm_dir) == SentenceEmbeddingConfig(
        pooling="mean", normalize=True, max_seq_length=256, dimension=384)


def test_minilm_mean_pooled_normalised_embeddings(minilm_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == "BertModel"
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist()[:9] == [101, 1996, 4937, 7719, 2006, 1996, 13523, 1012,
                                                 102]  # [CLS] the cat sits on the mat . [SEP]
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert embeddings.shape == (3, 384)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-6)
    cosines = embeddings @ embeddings.T
    for (i, j), expected in ST_COSINES.items():
        assert float(cosines[i, j]) == pytest.approx(expected, abs=1e-5)
