"""Shared fixtures: the real default model (converted once, loaded once per session), a small
random LLaMA with GQA and llama3 rope scaling (``tiny_models.py``'s LLaMA settings, its weights
drawn here) and one torch thread for a test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def smollm2():
    """Explainer on the embedded SmolLM2-135M-Instruct, fp32, CPU."""
    from vllm_pelrp import load_explainer

    return load_explainer()


@pytest.fixture(scope="session")
def tiny_llama():
    """Random LlamaForCausalLM: 3 layers, GQA 4/2, llama3 scaling, non-trivial norm weights."""
    from transformers import LlamaForCausalLM

    from tiny_models import tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama", max_position_embeddings=256)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    model.requires_grad_(False)
    return model


@pytest.fixture()
def one_thread():
    """One torch thread for the test (measured numbers that depend on the reduction order),
    the previous count restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
