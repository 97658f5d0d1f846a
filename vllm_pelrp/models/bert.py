"""BERT (``BertModel``, ``BertForSequenceClassification``): a post-LN bidirectional encoder with
additive word + learned position + token-type embeddings and a LayerNorm on their sum; linear
layers and LayerNorms with biases, erf GELU MLP; the classifier's head is pooler (dense + tanh
on the CLS state) and a linear classifier.

vLLM serves ``BertModel`` as ``BertEmbeddingModel`` (backbone under ``model.``, q/k/v packed into
``attention.self.qkv_proj``, no HF pooler) and ``BertForSequenceClassification`` with the
backbone under ``bert.`` (pooler at ``bert.pooler.dense``) and ``classifier`` beside it.
"""

from __future__ import annotations

from typing import Any

from ..engine.additive import AdditiveSpec
from ..engine.spec import UnsupportedModelError
from .additive_base import AdditiveArchitecture, AdditiveNames, activation_of, split_heads

# the Hugging Face BertModel's names (no prefix; BertForSequenceClassification: under "bert.")
BERT_HF_TOP = {
    "word_embeddings": "embeddings.word_embeddings.weight",
    "position_embeddings": "embeddings.position_embeddings.weight",
    "token_type_embeddings": "embeddings.token_type_embeddings.weight",
    "embedding_norm": "embeddings.LayerNorm.weight",
    "embedding_norm_bias": "embeddings.LayerNorm.bias",
    "pooler": "pooler.dense.weight",
    "pooler_bias": "pooler.dense.bias",
}
BERT_LAYER = {  # shared by HF and vLLM but for q/k/v
    "o_proj": "attention.output.dense.weight",
    "o_bias": "attention.output.dense.bias",
    "attention_norm": "attention.output.LayerNorm.weight",
    "attention_norm_bias": "attention.output.LayerNorm.bias",
    "up_proj": "intermediate.dense.weight",
    "up_bias": "intermediate.dense.bias",
    "down_proj": "output.dense.weight",
    "down_bias": "output.dense.bias",
    "mlp_norm": "output.LayerNorm.weight",
    "mlp_norm_bias": "output.LayerNorm.bias",
}
BERT_HF_LAYER = {
    "q_proj": "attention.self.query.weight", "q_bias": "attention.self.query.bias",
    "k_proj": "attention.self.key.weight", "k_bias": "attention.self.key.bias",
    "v_proj": "attention.self.value.weight", "v_bias": "attention.self.value.bias",
    **BERT_LAYER,
}
BERT_VLLM_LAYER = {
    ("q_proj", "k_proj", "v_proj"): "attention.self.qkv_proj.weight",
    ("q_bias", "k_bias", "v_bias"): "attention.self.qkv_proj.bias",
    **BERT_LAYER,
}
BERT_HF = AdditiveNames(top=BERT_HF_TOP, layer=BERT_HF_LAYER, layers="encoder.layer.{i}.",
                        optional=frozenset({"pooler", "pooler_bias"}))
# vLLM's BertEmbeddingModel: everything under "model.", no pooler parameters
BERT_VLLM = AdditiveNames(
    top={k: v for k, v in BERT_HF_TOP.items() if not k.startswith("pooler")},
    layer=BERT_VLLM_LAYER, layers="encoder.layer.{i}.",
).prefixed("model.")
CLASSIFIER = {"classifier": "classifier.weight", "classifier_bias": "classifier.bias"}
BERT_CLS_HF = BERT_HF.prefixed("bert.", **CLASSIFIER)
BERT_CLS_VLLM = AdditiveNames(top=BERT_HF_TOP, layer=BERT_VLLM_LAYER,
                              layers="encoder.layer.{i}.").prefixed("bert.", **CLASSIFIER)


def encoder_spec(config: Any, tensor_parallel_size: int = 1, **overrides: Any) -> AdditiveSpec:
    """The fields of a BERT-style config (RoBERTa's too), per tensor-parallel rank."""
    kind = getattr(config, "position_embedding_type", None) or "absolute"
    if kind != "absolute":
        raise UnsupportedModelError(f"position_embedding_type={kind!r} is not supported; "
                                    "supported: absolute")
    for flag in ("is_decoder", "add_cross_attention"):
        if getattr(config, flag, False):
            raise UnsupportedModelError(f"{flag}=True is not supported (encoders only)")
    heads, intermediate = split_heads(tensor_parallel_size, config.num_attention_heads,
                                      config.intermediate_size)
    fields: dict[str, Any] = dict(
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        intermediate_size=intermediate,
        vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings,
        layer_norm_eps=float(config.layer_norm_eps),
        causal=False,
        norm_placement="post",
        activation=activation_of(config, "hidden_act"),
        type_vocab_size=config.type_vocab_size,
    )
    fields.update(overrides)
    return AdditiveSpec(**fields)


def spec(config: Any, tensor_parallel_size: int = 1) -> AdditiveSpec:
    return encoder_spec(config, tensor_parallel_size)


def classifier_spec(config: Any, tensor_parallel_size: int = 1) -> AdditiveSpec:
    return encoder_spec(config, tensor_parallel_size, num_labels=config.num_labels)


BLOCKS = ("additive_embedding[word+learned position+token type]", "layer_norm+bias",
          "linear+bias", "attention[bidirectional]", "mlp[gelu]")
ARCHITECTURE = AdditiveArchitecture(
    names=("BertModel",), spec=spec, hf=BERT_HF, vllm=BERT_VLLM, blocks=BLOCKS,
    model_types={"bert": "BertModel"})
SEQUENCE_CLASSIFICATION = AdditiveArchitecture(
    names=("BertForSequenceClassification",), spec=classifier_spec, hf=BERT_CLS_HF,
    vllm=BERT_CLS_VLLM, blocks=BLOCKS + ("pooler[tanh]", "classifier"))
ARCHITECTURES = {"BertModel": ARCHITECTURE,
                 "BertForSequenceClassification": SEQUENCE_CLASSIFICATION}
