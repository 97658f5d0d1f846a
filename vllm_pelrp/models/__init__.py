"""The model registry: one file per architecture, keyed by the Hugging Face ``architectures``
name (like vLLM's model registry or LXT's ``DEFAULT_MAP``). A file declares an ``Architecture``
(``base.py``): how its config becomes the engine's ``DecoderSpec``, its Hugging Face and vLLM
weight names, and where vLLM keeps its decoder layers."""

from __future__ import annotations

import importlib
from typing import Any

from ..engine.spec import UnsupportedModelError
from .base import Architecture

# architectures name → module of this package
REGISTRY: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
SUPPORTED_ARCHITECTURES = tuple(REGISTRY)
# configs that name no architectures: by model_type
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "gemma3_text": "Gemma3ForCausalLM"}


def architecture(name: str) -> Architecture:
    if name not in REGISTRY:
        raise UnsupportedModelError(
            f"architecture {name} is not supported by the PA-LRP engine; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return importlib.import_module(f"{__name__}.{REGISTRY[name]}").ARCHITECTURE


def architecture_for(config: Any) -> Architecture:
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
