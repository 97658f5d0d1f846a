"""The model registry: one file per architecture, keyed by the Hugging Face ``architectures``
name (like vLLM's model registry or LXT's ``DEFAULT_MAP``). A file declares an ``Architecture``
(``base.py``: rotary decoders) or an ``AdditiveArchitecture`` (``additive_base.py``: positions
added to the input, BERT, RoBERTa, GPT-2): how its config becomes the engine's spec, its Hugging
Face and vLLM weight names. ``kind`` tells them apart ("decoder" / "additive"); a file that
declares several architectures keeps them in ``ARCHITECTURES`` by name."""

from __future__ import annotations

import importlib
from typing import Any

from ..engine.spec import UnsupportedModelError
from .additive_base import AdditiveArchitecture
from .base import Architecture

# architectures name → module of this package (the rotary decoders first: error messages list
# the registry in this order)
REGISTRY: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "BertModel": "bert",
    "BertForSequenceClassification": "bert",
    "RobertaModel": "roberta",
    "XLMRobertaModel": "roberta",
    "GPT2LMHeadModel": "gpt2",
}
SUPPORTED_ARCHITECTURES = tuple(REGISTRY)
DECODER_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                         "Qwen3ForCausalLM", "Gemma3ForCausalLM")
# configs that name no architectures: by model_type
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "gemma3_text": "Gemma3ForCausalLM", "bert": "BertModel",
               "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel",
               "gpt2": "GPT2LMHeadModel"}


def architecture(name: str) -> Architecture | AdditiveArchitecture:
    if name not in REGISTRY:
        raise UnsupportedModelError(
            f"architecture {name} is not supported by the PA-LRP engine; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    module = importlib.import_module(f"{__name__}.{REGISTRY[name]}")
    return getattr(module, "ARCHITECTURES", {}).get(name) or module.ARCHITECTURE


def architecture_for(config: Any) -> Architecture | AdditiveArchitecture:
    """The registered architecture of a Hugging Face config; ``UnsupportedModelError`` naming
    the supported ones for anything else."""
    names = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    if not names and MODEL_TYPES.get(model_type) in REGISTRY:
        names = [MODEL_TYPES[model_type]]
    if not names:
        raise UnsupportedModelError(
            f"the config names no architectures (model_type {getattr(config, 'model_type', None)!r});"
            f" supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    for name in names:
        if name not in REGISTRY:
            architecture(name)  # raises, naming the supported ones
    return architecture(names[0])


def decoder_architecture_for(config: Any) -> Architecture:
    """``architecture_for``, for the rotary-decoder engine only: an additive-position model
    (BERT, GPT-2, …) raises ``UnsupportedModelError`` naming the decoder architectures."""
    arch = architecture_for(config)
    if arch.kind != "decoder":
        name = (list(getattr(config, "architectures", None) or []) or list(arch.names))[0]
        raise UnsupportedModelError(
            f"architecture {name} is not supported by the PA-LRP engine for rotary "
            f"decoders (its positions are an additive table: vllm_pelrp.engine.additive "
            f"explains it); supported: {', '.join(DECODER_ARCHITECTURES)}")
    return arch
