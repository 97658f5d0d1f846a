"""The model registry: one file per architecture, keyed by the Hugging Face ``architectures``
name (like vLLM's model registry or LXT's ``DEFAULT_MAP``). A file declares an ``Architecture``
(``base.py``: rotary decoders) or an ``AdditiveArchitecture`` (``additive_base.py``: positions
added to the input, BERT, RoBERTa, GPT-2): how its config becomes the engine's spec, its Hugging
Face and vLLM weight names, and the ``model_type`` of configs that name no architectures.
``kind`` tells them apart ("decoder" / "additive"); a file that declares several architectures
keeps them in ``ARCHITECTURES`` by name. ``MODEL_FILES`` is the one table; the registry by name,
the decoder list and the model types are derived from the files."""

from __future__ import annotations

import importlib
from typing import Any

from ..engine.spec import UnsupportedModelError
from .additive_base import AdditiveArchitecture
from .base import Architecture

# The one table: the model files of this package, the rotary decoders first (error messages list
# the registry in this order). Everything else is derived from what the files declare.
MODEL_FILES = ("llama", "qwen2", "qwen3", "gemma3", "phi3", "qwen3_moe", "mixtral", "bert",
               "roberta", "gpt2")


def _declared() -> dict[str, Architecture | AdditiveArchitecture]:
    """Each declared architecture by Hugging Face ``architectures`` name."""
    found: dict[str, Architecture | AdditiveArchitecture] = {}
    for file in MODEL_FILES:
        module = importlib.import_module(f"{__name__}.{file}")
        declared = getattr(module, "ARCHITECTURES", None) or {
            name: module.ARCHITECTURE for name in module.ARCHITECTURE.names}
        for name, arch in declared.items():
            if name in found:
                raise RuntimeError(f"architecture {name} is declared twice (models/{file}.py)")
            found[name] = arch
    return found


REGISTRY: dict[str, Architecture | AdditiveArchitecture] = _declared()
SUPPORTED_ARCHITECTURES = tuple(REGISTRY)
DECODER_ARCHITECTURES = tuple(name for name, arch in REGISTRY.items() if arch.kind == "decoder")
# configs that name no architectures: by model_type
MODEL_TYPES = {model_type: name for arch in REGISTRY.values()
               for model_type, name in arch.model_types.items()}


def architecture(name: str) -> Architecture | AdditiveArchitecture:
    if name not in REGISTRY:
        raise UnsupportedModelError(
            f"architecture {name} is not supported by the PA-LRP engine; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return REGISTRY[name]


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
