"""Adapter: weights in vLLM's LLaMA layout → engine ``ModelWeights``.

vLLM fuses q/k/v into ``self_attn.qkv_proj.weight`` (rows: q, then k, then v) and gate/up
into ``mlp.gate_up_proj.weight`` (rows: gate, then up). Under tensor parallelism each rank holds
its shard: q/k/v/gate/up split by rows (column-parallel), o/down by columns (row-parallel), so
the same row layout holds per rank with per-rank head counts. The engine gets views into the
fused tensors; nothing is copied.
"""

from __future__ import annotations

from typing import Callable, Mapping

from torch import Tensor

from ..engine.spec import LayerWeights, LlamaSpec, ModelWeights


def split_qkv(qkv: Tensor, spec: LlamaSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Row views (q, k, v) of a fused qkv_proj weight, for this rank's head counts."""
    q_rows = spec.num_heads * spec.head_dim
    kv_rows = spec.num_kv_heads * spec.head_dim
    if qkv.shape[0] != q_rows + 2 * kv_rows:
        raise ValueError(
            f"qkv_proj has {qkv.shape[0]} rows; expected {q_rows} + 2×{kv_rows} for "
            f"{spec.num_heads} heads / {spec.num_kv_heads} kv heads of dim {spec.head_dim}"
        )
    return qkv[:q_rows], qkv[q_rows : q_rows + kv_rows], qkv[q_rows + kv_rows :]


def split_gate_up(gate_up: Tensor, spec: LlamaSpec) -> tuple[Tensor, Tensor]:
    """Row views (gate, up) of a fused gate_up_proj weight."""
    if gate_up.shape[0] != 2 * spec.intermediate_size:
        raise ValueError(
            f"gate_up_proj has {gate_up.shape[0]} rows; expected 2×{spec.intermediate_size}"
        )
    return gate_up[: spec.intermediate_size], gate_up[spec.intermediate_size :]


def weights_from_vllm_state(
    state: Mapping[str, Tensor],
    spec: LlamaSpec,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    prefix: str = "model.",
) -> ModelWeights:
    """Build ``ModelWeights`` from vLLM parameter names (``model.layers.{i}.self_attn.qkv_proj.weight``…).

    ``lm_head.weight`` may be absent (tied embeddings). The vocabulary must be whole on this
    rank (vLLM's vocab-parallel embedding shards are gathered by the caller).
    """
    layers = []
    for index in range(spec.num_layers):
        p = f"{prefix}layers.{index}."
        q, k, v = split_qkv(state[p + "self_attn.qkv_proj.weight"], spec)
        gate, up = split_gate_up(state[p + "mlp.gate_up_proj.weight"], spec)
        layers.append(
            LayerWeights(
                input_norm=state[p + "input_layernorm.weight"],
                q_proj=q, k_proj=k, v_proj=v,
                o_proj=state[p + "self_attn.o_proj.weight"],
                post_attention_norm=state[p + "post_attention_layernorm.weight"],
                gate_proj=gate, up_proj=up,
                down_proj=state[p + "mlp.down_proj.weight"],
            )
        )
    embed = state[prefix + "embed_tokens.weight"]
    return ModelWeights(
        spec=spec,
        embed_tokens=embed,
        layers=layers,
        final_norm=state[prefix + "norm.weight"],
        lm_head=state.get("lm_head.weight", embed),
        all_reduce=all_reduce,
    )
