"""Tests for vllm_pelrp.kernels: RoPE helpers, the RoPE-LRP reference and the Triton kernel.

The Triton kernel is checked under the Triton interpreter in a subprocess (TRITON_INTERPRET must
be set before triton is imported, which a shared pytest process cannot guarantee); see
tests/_kernel_interp_check.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _kernel_interp_check as interp  # noqa: E402

K = interp.load_kernels()

LLAMA3 = interp.LLAMA3


def _inputs(T=6, H=5, D=32, seed=0, max_pos=5000, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, D, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(T, H, D, generator=gen, dtype=torch.float64).to(dtype)
    pos = torch.randint(0, max_pos, (T,), generator=gen)
    return q, g, pos


# ---------------------------------------------------------------------------------------------
# RoPE helpers
# ---------------------------------------------------------------------------------------------


def test_rope_inv_freq_default_and_linear():
    inv = K.rope_inv_freq(64, 10000.0)
    assert inv.dtype == torch.float32 and inv.shape == (32,)
    expected = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))
    assert torch.equal(inv, expected)
    assert torch.equal(K.rope_inv_freq(64, 10000.0, {"rope_type": "default"}), expected)
    assert torch.equal(K.rope_inv_freq(64, 10000.0, {"type": "linear", "factor": 4.0}), expected / 4.0)


def test_rope_inv_freq_unsupported():
    with pytest.raises(ValueError, match="llama3"):
        K.rope_inv_freq(64, 10000.0, {"rope_type": "dynamic", "factor": 4.0})
    with pytest.raises(ValueError):
        K.rope_inv_freq(63, 10000.0)
    with pytest.raises(ValueError, match="rotary dim"):
        K.rope_inv_freq(16, 10000.0, rotary_dim=18)
    with pytest.raises(ValueError, match="factors"):  # LongRoPE: one factor per rotated pair
        K.rope_inv_freq(16, 10000.0, dict(interp.PHI3_LONGROPE, partial_rotary_factor=1.0))


def _hf_scaled_tables(family: str, length: int):
    """transformers' rotary embedding of a tiny scaled-RoPE family: (config, cos, sin) for the
    positions 0..length-1 (LongRoPE picks its factors by this length)."""
    from tiny_models import tiny_model

    model = tiny_model(family)
    x = torch.zeros(1, length, 4)
    cos, sin = model.model.rotary_emb(x, torch.arange(length)[None])
    return model, cos[0], sin[0]


@pytest.mark.parametrize("family,length", [("phi3", 20), ("phi3_longrope", 20),
                                           ("phi3_longrope", 40), ("qwen3_yarn", 50)])
def test_scaled_and_partial_rope_tables_match_transformers(family, length):
    """Partial rotary (Phi-3: 12 of 16 dims), LongRoPE's short (≤ 32 positions) and long factors
    and YaRN: inverse frequencies, attention factor and cos/sin equal transformers' bit for bit,
    and apply_rope equals Phi-3's apply_rotary_pos_emb (the last 4 dims pass through)."""
    pytest.importorskip("transformers")
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    model, cos, sin = _hf_scaled_tables(family, length)
    config = model.config
    scaling = dict(config.rope_parameters)
    if scaling.get("rope_type") == "longrope" and scaling.get("factor") is None:
        scaling["factor"] = config.max_position_embeddings / config.original_max_position_embeddings
    inv = K.rope_inv_freq(16, scaling["rope_theta"], scaling, seq_len=length)
    assert torch.equal(inv, model.model.rotary_emb.inv_freq)
    factor = K.rope_attention_factor(scaling)
    assert factor == model.model.rotary_emb.attention_scaling
    if family != "phi3":
        assert factor > 1.1  # the scale is exercised
    c, s = K.rope_cos_sin(torch.arange(length), inv, attention_factor=factor)
    assert torch.equal(c, cos) and torch.equal(s, sin)
    rotary = 12 if family.startswith("phi3") else 16
    assert c.shape == (length, rotary)
    if family == "phi3_longrope":  # short and long factors differ: the length matters
        other = K.rope_inv_freq(16, scaling["rope_theta"], scaling, seq_len=72 - length)
        assert not torch.equal(inv, other)
    q = torch.randn(1, 4, length, 16)
    k = torch.randn(1, 2, length, 16)
    qe, ke = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    torch.testing.assert_close(K.apply_rope(q[0].transpose(0, 1), c, s), qe[0].transpose(0, 1))
    torch.testing.assert_close(K.apply_rope(k[0].transpose(0, 1), c, s), ke[0].transpose(0, 1))
    assert torch.equal(K.apply_rope(q[0].transpose(0, 1), c, s)[..., rotary:],
                       q[0].transpose(0, 1)[..., rotary:])


def test_rope_matches_transformers():
    pytest.importorskip("transformers")
    from tiny_models import tiny_config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    # LLaMA 3's rope on a 128-wide head (only the rope settings matter here)
    cfg = tiny_config("llama", hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=128, max_position_embeddings=131072,
                      rope_parameters=dict(LLAMA3, rope_theta=500000.0))
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    mine = K.rope_inv_freq(128, 500000.0, LLAMA3)
    assert torch.equal(hf_inv, mine)

    emb = LlamaRotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 7, 8191, 100000]])
    x = torch.randn(1, 5, 10, 128)
    cos, sin = emb(x, pos)
    c, s = K.rope_cos_sin(pos[0], mine)
    assert torch.equal(cos[0], c) and torch.equal(sin[0], s)

    q = torch.randn(1, 2, 5, 128)
    k = torch.randn(1, 1, 5, 128)
    qe, ke = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(K.apply_rope(q[0].transpose(0, 1), c, s), qe[0].transpose(0, 1))
    torch.testing.assert_close(K.apply_rope(k[0].transpose(0, 1), c, s), ke[0].transpose(0, 1))


@pytest.mark.parametrize("neox", [True, False])
def test_rope_is_pairwise_rotation(neox):
    """x̃ is a rotation of each (x1, x2) pair by the angle; norms are preserved; rot∘rot = −id."""
    q, _, pos = _inputs(T=4, H=3, D=16)
    inv = K.rope_inv_freq(16, 10000.0)
    c, s = K.rope_cos_sin(pos, inv, neox_style=neox)
    out = K.apply_rope(q, c, s, neox_style=neox)
    torch.testing.assert_close(out.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(K.rotate(K.rotate(q, neox), neox), -q)
    ang = K.rope_angles(pos, inv)
    x1, x2 = (q[..., :8], q[..., 8:]) if neox else (q[..., 0::2], q[..., 1::2])
    o1, o2 = (out[..., :8], out[..., 8:]) if neox else (out[..., 0::2], out[..., 1::2])
    ca, sa = ang.cos()[:, None], ang.sin()[:, None]
    torch.testing.assert_close(o1, x1 * ca - x2 * sa)
    torch.testing.assert_close(o2, x2 * ca + x1 * sa)


# ---------------------------------------------------------------------------------------------
# Reference backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("share", [0.5, 1.0, 0.25])
@pytest.mark.parametrize("scaling", [None, LLAMA3])
def test_reference_matches_autograd(neox, share, scaling):
    T, H, D = 7, 5, 32
    q, g, pos = _inputs(T, H, D, max_pos=40000)
    inv = K.rope_inv_freq(D, 500000.0, scaling)
    cos, sin = K.rope_cos_sin(pos, inv, neox_style=neox)
    q_leaf = q.clone().requires_grad_(True)
    cos_leaf = cos.clone().requires_grad_(True)
    sin_leaf = sin.clone().requires_grad_(True)
    K.apply_rope(q_leaf, cos_leaf, sin_leaf, neox_style=neox).backward(g)

    grad, positional = K.rope_lrp_backward_reference(
        g, q, pos, inv, input_share=share, neox_style=neox
    )
    assert grad.shape == (T, H, D) and grad.dtype == torch.float32
    assert positional.shape == (T, 2) and positional.dtype == torch.float32
    torch.testing.assert_close(grad, share * q_leaf.grad, rtol=1e-5, atol=1e-5)
    cos_part = (1 - share) * (cos * cos_leaf.grad).sum(-1)
    sin_part = (1 - share) * (sin * sin_leaf.grad).sum(-1)
    torch.testing.assert_close(positional[:, 0], cos_part, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(positional[:, 1], sin_part, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("share", [0.5, 1.0])
def test_reference_conservation(neox, share):
    T, H, D = 9, 4, 64
    q, g, pos = _inputs(T, H, D, seed=3, max_pos=30000, dtype=torch.float64)
    q32, g32 = q.float(), g.float()
    inv = K.rope_inv_freq(D, 500000.0, LLAMA3)
    grad, positional = K.rope_lrp_backward_reference(
        g32, q32, pos, inv, input_share=share, neox_style=neox
    )
    cos, sin = K.rope_cos_sin(pos, inv, neox_style=neox, dtype=torch.float64)
    q_rot = K.apply_rope(q, cos, sin, neox_style=neox)
    total = (q_rot * g).sum(dim=(1, 2))  # per position Σ q̃⊙g
    # gradient×input: grad already carries the factor s (grad = s·Rᵀg, so Σ q⊙grad = s·Σ q̃⊙g)
    lhs = (q * grad.double()).sum(dim=(1, 2)) + positional.double().sum(-1)
    torch.testing.assert_close(lhs, total, rtol=1e-5, atol=1e-4)
    # positional parts sum to (1 − s)·Σ q̃⊙g
    torch.testing.assert_close(
        positional.double().sum(-1), (1 - share) * total, rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("share", [0.5, 1.0])
def test_reference_partial_rotary_and_attention_factor(neox, share):
    """Rotary dim 24 of 32, cos/sin scaled by 1.3: the rotated dims follow the RoPE rule against
    autograd (the scaled cos/sin are the positional inputs), the other 8 dims pass the gradient
    through unchanged, and Σ q⊙grad + positional = Σ q̃⊙g per position."""
    T, H, D, R, factor = 7, 5, 32, 24, 1.3
    q, g, pos = _inputs(T, H, D, seed=4, max_pos=3000)
    inv = K.rope_inv_freq(D, 10000.0, rotary_dim=R)
    assert inv.shape == (R // 2,)
    cos, sin = K.rope_cos_sin(pos, inv, neox_style=neox, attention_factor=factor)
    q_leaf = q.clone().requires_grad_(True)
    cos_leaf = cos.clone().requires_grad_(True)
    sin_leaf = sin.clone().requires_grad_(True)
    rotated = K.apply_rope(q_leaf, cos_leaf, sin_leaf, neox_style=neox)
    rotated.backward(g)
    grad, positional = K.rope_lrp_backward_reference(
        g, q, pos, inv, input_share=share, neox_style=neox, attention_factor=factor)
    torch.testing.assert_close(grad[..., :R], share * q_leaf.grad[..., :R], rtol=1e-5, atol=1e-5)
    assert torch.equal(grad[..., R:], g[..., R:])  # pass-through: all relevance to the input
    torch.testing.assert_close(positional[:, 0], (1 - share) * (cos * cos_leaf.grad).sum(-1),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(positional[:, 1], (1 - share) * (sin * sin_leaf.grad).sum(-1),
                               rtol=1e-5, atol=1e-4)
    total = (rotated.detach() * g).sum(dim=(1, 2))
    torch.testing.assert_close((q * grad).sum(dim=(1, 2)) + positional.sum(-1), total,
                               rtol=1e-5, atol=1e-4)
    # the positional relevance is what the rotated dims give: the same as a head of R dims alone
    _, alone = K.rope_lrp_backward_reference(
        g[..., :R], q[..., :R], pos, inv, input_share=share, neox_style=neox,
        attention_factor=factor)
    torch.testing.assert_close(positional, alone)


def test_reference_strided_accumulate_and_dtype():
    T, H, Hkv, D = 5, 6, 2, 32
    qkv = torch.randn(T, (H + 2 * Hkv) * D, dtype=torch.bfloat16)
    q = qkv[:, : H * D].view(T, H, D)
    k = qkv[:, H * D : (H + Hkv) * D].view(T, Hkv, D)
    g = torch.randn(H, T, D, dtype=torch.bfloat16).transpose(0, 1)
    gk = torch.randn(T, Hkv, D, dtype=torch.bfloat16)
    pos = torch.arange(T)
    inv = K.rope_inv_freq(D, 10000.0)
    base = torch.randn(T, 2)
    acc = base.clone()
    grad_q, out = K.rope_lrp_backward_reference(g, q, pos, inv, input_share=0.5, positional_out=acc)
    assert out is acc and grad_q.dtype == torch.bfloat16
    grad_k, out = K.rope_lrp_backward_reference(gk, k, pos, inv, input_share=0.5, positional_out=acc)
    assert out is acc and grad_k.shape == (T, Hkv, D)
    _, pq = K.rope_lrp_backward_reference(g.contiguous(), q.contiguous(), pos, inv, input_share=0.5)
    _, pk = K.rope_lrp_backward_reference(gk, k.contiguous(), pos, inv, input_share=0.5)
    torch.testing.assert_close(acc, base + pq + pk)


def test_argument_validation():
    q, g, pos = _inputs(T=4, H=2, D=8)
    inv = K.rope_inv_freq(8, 10000.0)
    for fn in (K.rope_lrp_backward_reference, K.rope_lrp_backward_triton, K.rope_lrp_backward):
        with pytest.raises(ValueError, match="pre_rope shape"):
            fn(g, q[:, :1], pos, inv, input_share=0.5)
        with pytest.raises(ValueError, match="positions"):
            fn(g, q, pos[:3], inv, input_share=0.5)
        with pytest.raises(ValueError, match="integer"):
            fn(g, q, pos.float(), inv, input_share=0.5)
        with pytest.raises(ValueError, match="inv_freq"):
            fn(g, q, pos, torch.cat((inv, inv[:1])), input_share=0.5)  # more than D/2
        with pytest.raises(ValueError, match="attention_factor"):
            fn(g, q, pos, inv, input_share=0.5, attention_factor=0.0)
        with pytest.raises(ValueError, match="float32"):
            fn(g, q, pos, inv.double(), input_share=0.5)
        with pytest.raises(ValueError, match="positional_out"):
            fn(g, q, pos, inv, input_share=0.5, positional_out=torch.zeros(4, 3))
        with pytest.raises(ValueError, match="input_share"):
            fn(g, q, pos, inv, input_share=1.5)
    with pytest.raises(ValueError, match="backend"):
        K.rope_lrp_backward(g, q, pos, inv, input_share=0.5, backend="cuda")


# ---------------------------------------------------------------------------------------------
# Attention-LRP backward: fused (flash) vs explicit T×T reference
# ---------------------------------------------------------------------------------------------


def _attention_explicit_autograd(q, k, v, grad, value_share):
    """Independent check of the reference: autograd on a hand-written attention with the rules'
    factors (½ on each product, the plain softmax gradient), via detach tricks."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("thd,shd->hts", q, kr) / D**0.5
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    probs = torch.softmax(scores, -1)
    # uniform rule on A·V: half of the gradient to each factor
    s = value_share
    mixed = s * torch.einsum("hts,shd->thd", probs.detach(), vr) + (1 - s) * torch.einsum(
        "hts,shd->thd", probs, vr.detach())
    grads = torch.autograd.grad(mixed, (q, k, v), grad.double(), allow_unused=True)
    # uniform rule on QKᵀ: half of the score gradient to q and to k
    return 0.5 * grads[0], 0.5 * grads[1], grads[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("value_share", [0.5, 1.0])
def test_fused_attention_lrp_matches_reference(dtype, value_share):
    from vllm_pelrp.kernels.attention_lrp import attention_forward_for_lrp, attention_lrp_backward
    from vllm_pelrp.kernels.attention_lrp_reference import attention_lrp_backward_reference

    gen = torch.Generator().manual_seed(3)
    T, Hq, Hkv, D, rows = 70, 6, 2, 16, 3
    q, k, v = (torch.randn(T, h, D, generator=gen).to(dtype) for h in (Hq, Hkv, Hkv))
    grad = torch.randn(rows, T, Hq, D, generator=gen)
    output, logsumexp = attention_forward_for_lrp(q, k, v)
    fused = attention_lrp_backward(q, k, v, grad, value_share, output=output, logsumexp=logsumexp)
    recomputed = attention_lrp_backward(q, k, v, grad, value_share)
    reference = attention_lrp_backward_reference(  # 20-query blocks
        q, k, v, grad, value_share, block_bytes=4 * 3 * T * 20
    )
    tolerance = 1e-5 if dtype != torch.bfloat16 else 2e-3
    for a, b, c in zip(fused, recomputed, reference):
        if c is None:
            assert a is None and b is None
            continue
        assert a.shape == c.shape
        assert a.dtype == torch.float32 and c.dtype == torch.float32
        torch.testing.assert_close(a.float(), c.float(), rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(b.float(), c.float(), rtol=tolerance, atol=tolerance)
    # the reference itself against autograd with the rules' factors (row 1)
    explicit = _attention_explicit_autograd(q, k, v, grad[1], value_share)
    torch.testing.assert_close(reference[2][1].double(), explicit[2], rtol=1e-4, atol=1e-5)
    if value_share != 1.0:
        torch.testing.assert_close(reference[0][1].double(), explicit[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reference[1][1].double(), explicit[1], rtol=1e-4, atol=1e-5)


def test_attention_lrp_autograd_path_matches_flash_path():
    """The device-generic path (autograd through SDPA, used on CUDA) equals the CPU flash one."""
    from vllm_pelrp.kernels import attention_lrp

    gen = torch.Generator().manual_seed(5)
    T, Hq, Hkv, D, rows = 40, 6, 3, 16, 2
    q, k, v = (torch.randn(1, h, T, D, generator=gen) for h in (Hq, Hkv, Hkv))
    grad = torch.randn(rows, Hq, T, D, generator=gen)
    generic = attention_lrp._sdpa_backward_autograd(q, k, v, grad)
    flash = attention_lrp._flash_backward_cpu(q, k, v, grad, None, None)
    for a, b in zip(generic, flash):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _attention_dense_rules(q, k, v, grad, value_share, causal, scale, window):
    """float64 autograd on a dense T×T attention with the given mask (causal or not, window W:
    i − W < j, bidirectional |i − j| < W) and scale, with the rules' factors, every row of grad."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("thd,shd->hts", q, kr) * (D**-0.5 if scale is None else scale)
    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    blocked = distance < 0 if causal else torch.zeros(T, T, dtype=torch.bool)
    if window is not None:
        blocked |= (distance >= window) | (distance <= -window)
    probs = torch.softmax(scores.masked_fill(blocked, float("-inf")), -1)
    output = torch.einsum("hts,shd->thd", probs, vr)
    s = value_share
    mixed = s * torch.einsum("hts,shd->thd", probs.detach(), vr) + (1 - s) * torch.einsum(
        "hts,shd->thd", probs, vr.detach())
    rows = [torch.autograd.grad(mixed, (q, k, v), g.double(), retain_graph=True) for g in grad]
    grads = [torch.stack([r[i] for r in rows]) for i in range(3)]
    return output.detach(), (0.5 * grads[0], 0.5 * grads[1], grads[2])


@pytest.mark.parametrize("dtype, causal, window", [
    (torch.float64, True, 16), (torch.float32, True, 16), (torch.float64, False, 16),
    (torch.float32, False, None)])
def test_windowed_attention_lrp_matches_dense_rules_and_reference(dtype, causal, window):
    """Sliding-window (and bidirectional, and scaled) attention, tile by tile: the forward, the
    fused backward (given the forward's log-sum-exp, or recomputing it) and the reference equal
    a dense masked computation, for several tile sizes, GQA 6/2 and two target rows."""
    from vllm_pelrp.kernels.attention_lrp import attention_forward_for_lrp, attention_lrp_backward
    from vllm_pelrp.kernels.attention_lrp_reference import attention_lrp_backward_reference

    gen = torch.Generator().manual_seed(7)
    T, Hq, Hkv, D, rows, scale = 70, 6, 2, 16, 2, 0.3
    q, k, v = (torch.randn(T, h, D, generator=gen).to(dtype) for h in (Hq, Hkv, Hkv))
    grad = torch.randn(rows, T, Hq, D, generator=gen)
    expected_output, expected = _attention_dense_rules(q, k, v, grad, 0.5, causal, scale, window)
    tolerance = 1e-6 if dtype == torch.float64 else 2e-5
    args = dict(causal=causal, scale=scale, sliding_window=window)
    for tile in (7, 16, 128):  # a remainder tile, the window's size, one tile
        output, logsumexp = attention_forward_for_lrp(q, k, v, tile=tile, **args)
        assert output.dtype == dtype
        torch.testing.assert_close(output.double(), expected_output, rtol=tolerance,
                                   atol=tolerance)
        given = attention_lrp_backward(q, k, v, grad, 0.5, output=output, logsumexp=logsumexp,
                                       tile=tile, **args)
        recomputed = attention_lrp_backward(q, k, v, grad, 0.5, tile=tile, **args)
        for a, b, c in zip(given, recomputed, expected):
            assert a.shape == c.shape and a.dtype == torch.float32
            torch.testing.assert_close(a.double(), c, rtol=tolerance, atol=tolerance)
            torch.testing.assert_close(b.double(), c, rtol=tolerance, atol=tolerance)
    for block_bytes in (4 * 3 * 16 * 40, None):  # 16-query blocks, and the default
        reference = attention_lrp_backward_reference(q, k, v, grad, 0.5, block_bytes=block_bytes,
                                                     **args)
        for a, c in zip(reference, expected):
            torch.testing.assert_close(a.double(), c, rtol=2e-5, atol=2e-5)
    # value share 1 (cp-lrp): only ∂V, the same
    only_values = attention_lrp_backward(q, k, v, grad, 1.0, tile=16, **args)
    assert only_values[:2] == (None, None)
    torch.testing.assert_close(only_values[2].double(), 2 * expected[2], rtol=tolerance,
                               atol=tolerance)


@pytest.mark.parametrize("window", [16, None])
def test_sdpa_path_equals_the_cpu_flash_path(monkeypatch, window):
    """The path for other devices (SDPA forward per tile, autograd through SDPA with the
    tile's mask; CUDA's) run on CPU equals the CPU flash path, windowed or not, bidirectional."""
    from vllm_pelrp.kernels import attention_lrp

    gen = torch.Generator().manual_seed(11)
    T, Hq, Hkv, D, rows = 50, 4, 2, 8, 2
    q, k, v = (torch.randn(T, h, D, generator=gen) for h in (Hq, Hkv, Hkv))
    grad = torch.randn(rows, T, Hq, D, generator=gen)
    args = dict(causal=False, scale=0.4, sliding_window=window, tile=16)

    def run():
        output, logsumexp = attention_lrp.attention_forward_for_lrp(q, k, v, **args)
        grads = attention_lrp.attention_lrp_backward(q, k, v, grad, 0.5, output=output,
                                                     logsumexp=logsumexp, **args)
        return (output, *grads), logsumexp

    flash, logsumexp = run()
    assert logsumexp is not None
    monkeypatch.setattr(attention_lrp, "_cpu_flash", lambda device: False)
    sdpa, no_logsumexp = run()
    assert no_logsumexp is None
    for a, b in zip(sdpa, flash):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_windowed_attention_creates_no_t_by_t_tensor(causal=True):
    """T = 1024, W = 32: no op of the windowed forward, fused backward or reference outputs a
    tensor with two dimensions ≥ T (the watch does see the dense reference's T×T blocks)."""
    from memory_probe import SquareShapes
    from vllm_pelrp.kernels.attention_lrp import attention_forward_for_lrp, attention_lrp_backward
    from vllm_pelrp.kernels.attention_lrp_reference import attention_lrp_backward_reference

    T, window = 1024, 32
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(T, h, 8, generator=gen) for h in (2, 1, 1))
    grad = torch.randn(2, T, 2, 8, generator=gen)
    args = dict(causal=causal, sliding_window=window)
    with SquareShapes(T) as watch:
        output, logsumexp = attention_forward_for_lrp(q, k, v, **args)
        attention_lrp_backward(q, k, v, grad, 0.5, output=output, logsumexp=logsumexp, **args)
        attention_lrp_backward(q, k, v, grad, 0.5, **args)
        attention_lrp_backward_reference(q, k, v, grad, 0.5, **args)
    assert watch.found == []
    with SquareShapes(T) as watch:  # the same watch on the unwindowed reference: (G, T, T)
        attention_lrp_backward_reference(q, k, v, grad[:1], 1.0, causal=causal)
    assert watch.found


def test_triton_launcher_rejects_cpu_without_interpreter():
    if not K.HAS_TRITON:
        pytest.skip("triton not installed")
    from vllm_pelrp.kernels import rope_lrp

    if rope_lrp._kernel_is_interpreted():
        pytest.skip("this process already runs the Triton interpreter")
    q, g, pos = _inputs(T=4, H=2, D=8)
    inv = K.rope_inv_freq(8, 10000.0)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        K.rope_lrp_backward_triton(g, q, pos, inv, input_share=0.5)
    q512 = torch.randn(2, 1, 512)
    with pytest.raises(ValueError, match="exceeds"):
        K.rope_lrp_backward_triton(q512, q512, pos[:2], K.rope_inv_freq(512, 1e4), input_share=0.5)
    # auto dispatch on CPU without the interpreter goes to the reference
    grad, positional = K.rope_lrp_backward(g, q, pos, inv, input_share=0.5)
    ref = K.rope_lrp_backward_reference(g, q, pos, inv, input_share=0.5)
    assert torch.equal(grad, ref[0]) and torch.equal(positional, ref[1])


# ---------------------------------------------------------------------------------------------
# Triton kernel vs reference (interpreter, subprocess)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interp_results():
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", VLLM_PELRP_FORCE_TRITON="1")
    proc = subprocess.run(
        [sys.executable, str(Path(interp.__file__))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(interp.REPO_ROOT),
    )
    assert proc.returncode == 0, f"interpreter check failed:\n{proc.stdout}\n{proc.stderr}"
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    assert lines, f"no JSON from interpreter check:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1])["results"]


@pytest.mark.parametrize("case", [c["name"] for c in interp.CASES])
def test_triton_interpreter_matches_reference(interp_results, case):
    res = interp_results[case]
    assert res["ok"], f"{case}: {res}"
