"""Adapter: a Hugging Face model (and its config) → engine ``ModelWeights``, through the model
registry (``vllm_pelrp.models``): the architecture's file names the weights."""

from __future__ import annotations

from typing import Any

from ..engine.spec import DecoderSpec, ModelWeights
from ..models import decoder_architecture_for as architecture_for


def check_architecture(config: Any) -> None:
    """Raise ``UnsupportedModelError`` naming the supported architectures for anything else."""
    architecture_for(config)


def spec_from_config(config: Any, tensor_parallel_size: int = 1) -> DecoderSpec:
    """Engine spec from a HF config; head counts are per tensor-parallel rank."""
    return architecture_for(config).spec(config, tensor_parallel_size)


def weights_from_hf(model: Any) -> ModelWeights:
    """Views of a HF causal LM's parameters (no copies)."""
    return architecture_for(model.config).weights_from_hf(model)
