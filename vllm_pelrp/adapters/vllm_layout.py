"""Adapter: weights in vLLM's layout → engine ``ModelWeights``, through the model registry.

vLLM packs q/k/v into ``self_attn.qkv_proj`` (rows: q, then k, then v; its bias likewise) and
gate/up into ``mlp.gate_up_proj`` (rows: gate, then up). Under tensor parallelism each rank holds
its shard: q/k/v/gate/up split by rows (column-parallel), o/down by columns (row-parallel), so
the same row layout holds per rank with per-rank head counts. The engine gets views into the
packed tensors; nothing is copied.
"""

from __future__ import annotations

from typing import Callable, Mapping

from torch import Tensor

from ..engine.spec import DecoderSpec, ModelWeights
from ..models import architecture
from ..models.base import Architecture


def weights_from_vllm_state(
    state: Mapping[str, Tensor],
    spec: DecoderSpec,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    arch: Architecture | None = None,
) -> ModelWeights:
    """Build ``ModelWeights`` from vLLM parameter names (``model.layers.{i}.self_attn.qkv_proj.weight``…)
    of ``arch`` (default: LLaMA). ``lm_head.weight`` may be absent (tied embeddings). The
    vocabulary must be whole on this rank (vLLM's vocab-parallel shards are gathered by the
    caller)."""
    arch = arch or architecture("LlamaForCausalLM")
    return arch.weights_from_vllm(state, spec, all_reduce=all_reduce)
