"""The engine on rotary variants: partial rotary (Phi-3, 12 of 16 dims per head rotate), LongRoPE
(Phi-3, short and long factors, cos/sin scaled) and YaRN (Qwen3), on the tiny random models of
``tiny_models.py``: the forward equals transformers', relevance is conserved in every mode, and
the positional relevance comes from the rotated dims only.

The float64 explicit reference (``explicit_reference.py``) does not cover these families yet, so
they are not in ``tiny_models.FAMILIES``; the RoPE rule itself is checked against autograd in
``test_kernels.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tiny_models import tiny_model, tiny_tokenizer
from vllm_pelrp import Explainer
from vllm_pelrp.engine.backward import (
    LogitSeeds,
    final_logits,
    relevance_from_input_ids,
    run_forward,
)
from vllm_pelrp.models import decoder_architecture_for

MODES = ["pa-lrp", "attnlrp", "cp-lrp"]
VARIANTS = ["phi3", "phi3_longrope", "qwen3_yarn"]
_MODELS: dict = {}


def _model(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return _MODELS[family]


def _ids(length, seed=1):
    return torch.randint(3, 101, (length,), generator=torch.Generator().manual_seed(seed))


def _engine_logits(weights, ids):
    return final_logits(weights, run_forward(weights, ids).last_output)


# LongRoPE: 20 tokens use the short factors, 40 (> original_max_position_embeddings 32) the long
@pytest.mark.parametrize("family,length", [("phi3", 20), ("phi3_longrope", 20),
                                           ("phi3_longrope", 40), ("qwen3_yarn", 50)])
def test_forward_matches_transformers(family, length):
    model = _model(family)
    weights = decoder_architecture_for(model.config).weights_from_hf(model)
    spec = weights.spec
    assert spec.rotated_dims == (12 if family.startswith("phi3") else 16)
    ids = _ids(length)
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    assert expected.abs().max() > 1.0
    assert (_engine_logits(weights, ids) - expected).abs().max() <= 1e-4
    if family == "phi3_longrope":  # the other factor set gives another model
        other = 32 if length > 32 else 64
        swapped = dataclasses.replace(weights, spec=dataclasses.replace(
            spec, rope_table_length=other))
        assert (_engine_logits(swapped, ids) - expected).abs().max() > 1e-3
    if family == "phi3":  # rotating the whole head gives another model
        full = dataclasses.replace(weights, spec=dataclasses.replace(spec, rotary_dim=None))
        assert (_engine_logits(full, ids) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", VARIANTS)
def test_conservation(family, mode):
    """Σ token + Σ positional + what the softmax rule absorbs = the target logit (the argmax
    after 40 tokens; LongRoPE: past 32, the long factors)."""
    explainer = Explainer(_model(family), tiny_tokenizer(), name=family)
    explanation = explainer.explain(input_ids=_ids(40, seed=3).tolist(), target="next",
                                    mode=mode, sentences=False)
    assert abs(explanation.target_logit) > 1.0  # a relative error against a sizeable logit
    conservation = explanation.conservation
    assert conservation.relative_error_excluding_softmax < 1e-4
    if mode == "pa-lrp":
        assert abs(conservation.positional_sum) > 1e-3
    else:
        assert conservation.positional_sum == 0


def _with_query_dims_zeroed(model, dims: slice):
    """The tiny Phi-3's weights with the query rows of ``dims`` (in every head) set to zero."""
    weights = decoder_architecture_for(model.config).weights_from_hf(model)
    head_dim = weights.spec.head_dim
    layers = []
    for layer in weights.layers:
        q_proj = layer.q_proj.clone().view(-1, head_dim, layer.q_proj.shape[-1])
        q_proj[:, dims] = 0
        layers.append(dataclasses.replace(layer, q_proj=q_proj.view_as(layer.q_proj)))
    return dataclasses.replace(weights, layers=layers)


def test_positional_relevance_comes_from_the_rotated_dims():
    """Phi-3 rotates dims 0..11 of each 16-dim head. With the queries' rotated dims zeroed, the
    attention scores come from the pass-through dims only: pa-lrp must give exactly no
    positional relevance (and still conserve). With the pass-through dims zeroed instead, all of
    the scores' relevance is rotary, and the positional share is there."""
    model = _model("phi3")
    ids = _ids(24, seed=5)
    seeds = LogitSeeds.from_rows([[(23, 7), (15, 40)]])
    for dims, positional_expected in ((slice(0, 12), False), (slice(12, 16), True)):
        weights = _with_query_dims_zeroed(model, dims)
        result = relevance_from_input_ids(weights, ids, seeds, "pa-lrp")
        positional = float(result.positional.abs().sum())
        total = float(result.token.sum() + result.positional.sum()
                      + result.softmax_absorbed.sum())
        assert abs(total - float(result.target_logit[0])) < 1e-4 * abs(float(result.target_logit[0]))
        assert float(result.token.abs().sum()) > 1e-2
        if positional_expected:
            assert positional > 1e-3
        else:
            assert positional == 0.0


def test_vllm_tensor_parallel_shards_of_the_fused_phi3_tensors():
    """vLLM's Phi-3 keeps the hub's fused names; under tensor parallelism rank r holds its q, k
    and v heads (and gate, up rows) in one ``qkv_proj`` (``gate_up_proj``): the engine's views
    of rank 1's shard are the matching slices of the HF model's weights."""
    model = _model("phi3")
    arch = decoder_architecture_for(model.config)
    spec = arch.spec(model.config, 2)
    assert (spec.num_heads, spec.num_kv_heads, spec.rotary_dim) == (2, 1, 12)
    hf = model.state_dict()
    d, q_rows, kv_rows, inter = 16, 4 * 16, 2 * 16, 128
    state = {}
    for name, tensor in hf.items():
        if name.endswith("qkv_proj.weight"):
            q, k, v = tensor.split([q_rows, kv_rows, kv_rows])
            tensor = torch.cat([q[q_rows // 2:], k[kv_rows // 2:], v[kv_rows // 2:]])
        elif name.endswith("gate_up_proj.weight"):
            gate, up = tensor.chunk(2)
            tensor = torch.cat([gate[inter // 2:], up[inter // 2:]])
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor = tensor[:, tensor.shape[1] // 2:]
        state[name] = tensor
    weights = arch.weights_from_vllm(state, spec)
    layer = weights.layers[1]
    qkv = hf["model.layers.1.self_attn.qkv_proj.weight"]
    assert torch.equal(layer.q_proj, qkv[2 * d:4 * d])
    assert torch.equal(layer.k_proj, qkv[q_rows + d:q_rows + 2 * d])
    assert torch.equal(layer.v_proj, qkv[q_rows + kv_rows + d:])
    gate_up = hf["model.layers.1.mlp.gate_up_proj.weight"]
    assert torch.equal(layer.gate_proj, gate_up[inter // 2:inter])
    assert torch.equal(layer.up_proj, gate_up[inter + inter // 2:])
    assert layer.q_proj.data_ptr() == state["model.layers.1.self_attn.qkv_proj.weight"].data_ptr()
