"""What a mixture-of-experts model file declares beyond a rotary decoder's: where each MoE layer's
router and experts sit, in the three layouts the engine reads them from, and the spec's
``MoESpec``.

- the Hugging Face module (transformers 5): fused 3-D parameters, ``experts.gate_up_proj``
  (E, 2I, H: gate rows, then up rows) and ``experts.down_proj`` (E, H, I);
- the hub's checkpoints (and transformers 4's modules): one 2-D weight per expert and
  projection, ``experts.{e}.gate_proj.weight`` (Qwen3-MoE) or ``experts.{e}.w1.weight``
  (Mixtral: w1 gate, w3 up, w2 down);
- vLLM's served state: fused ``w13_weight`` (E, 2I/tp, H) and ``w2_weight`` (E, H, I/tp),
  each tensor-parallel rank holding every expert's slice of the intermediate dimension (no
  expert parallelism).

Each expert becomes three views (``ExpertWeights``); nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor

from ..engine.spec import (
    DecoderSpec,
    ExpertWeights,
    ModelWeights,
    MoESpec,
    MoEWeights,
    UnsupportedModelError,
)
from .base import Architecture, weights_from_state


@dataclass(frozen=True)
class ExpertLayout:
    """Names (relative to a decoder layer) of one layout of a MoE layer's weights: the router,
    and either the fused ``gate_up`` / ``down`` tensors or ``per_expert`` (gate, up, down)
    name patterns with ``{e}`` for the expert's index."""

    router: str
    gate_up: str | None = None
    down: str | None = None
    per_expert: tuple[str, str, str] | None = None

    def present(self, state: Mapping[str, Tensor], at: str) -> bool:
        first = self.gate_up if self.per_expert is None else self.per_expert[0].format(e=0)
        return at + self.router in state and at + first in state

    def read(self, state: Mapping[str, Tensor], at: str, moe: MoESpec) -> MoEWeights:
        size = moe.intermediate_size
        if self.per_expert is not None:
            experts = [ExpertWeights(*(state[at + name.format(e=e)] for name in self.per_expert))
                       for e in range(moe.num_experts)]
        else:
            gate_up, down = state[at + self.gate_up], state[at + self.down]
            if gate_up.shape[:2] != (moe.num_experts, 2 * size) or \
                    down.shape[:3:2] != (moe.num_experts, size):
                raise ValueError(
                    f"{at + self.gate_up} {tuple(gate_up.shape)} / {at + self.down} "
                    f"{tuple(down.shape)}: expected {moe.num_experts} experts of intermediate "
                    f"size {size} (per rank)")
            experts = [ExpertWeights(gate_up[e, :size], gate_up[e, size:], down[e])
                       for e in range(moe.num_experts)]
        return MoEWeights(state[at + self.router], experts)


def experts_reader(layouts: tuple[ExpertLayout, ...], spec: DecoderSpec
                   ) -> Callable[[Mapping[str, Tensor], str], MoEWeights]:
    """``weights_from_state``'s ``experts``: the first of ``layouts`` the layer has."""

    def read(state: Mapping[str, Tensor], at: str) -> MoEWeights:
        for layout in layouts:
            if layout.present(state, at):
                return layout.read(state, at, spec.moe)
        looked = ", ".join(at + (layout.gate_up or layout.per_expert[0]) for layout in layouts)
        raise UnsupportedModelError(f"the checkpoint has no experts at {looked}")

    return read


@dataclass(frozen=True)
class MoEArchitecture(Architecture):
    """A rotary decoder whose MLPs are (some or all) mixtures of experts: ``hf_experts`` are
    the layouts a Hugging Face module or checkpoint may have, ``vllm_experts`` vLLM's."""

    hf_experts: tuple[ExpertLayout, ...] = field(default=())
    vllm_experts: tuple[ExpertLayout, ...] = field(default=())

    def weights_from_hf(self, model: Any) -> ModelWeights:
        state = {name: p.detach() for name, p in model.named_parameters()}
        return self.weights_from_hf_state(state, self.spec(model.config, 1))

    def weights_from_hf_state(self, state: Mapping[str, Tensor], spec: DecoderSpec
                              ) -> ModelWeights:
        """From Hugging Face names: a transformers module's, or a hub checkpoint's tensors."""
        return weights_from_state(state, spec, self.hf_layer, prefix="model.",
                                  experts=experts_reader(self.hf_experts, spec))

    def weights_from_vllm(self, state: Mapping[str, Tensor], spec: DecoderSpec,
                          all_reduce: Callable[[Tensor], Tensor] | None = None) -> ModelWeights:
        return weights_from_state(state, spec, self.vllm_layer, prefix=self.decoder + ".",
                                  all_reduce=all_reduce,
                                  experts=experts_reader(self.vllm_experts, spec))


def split_intermediate(size: int, tensor_parallel_size: int, what: str) -> int:
    if size % tensor_parallel_size:
        raise UnsupportedModelError(
            f"{what} {size} does not split over {tensor_parallel_size} ranks")
    return size // tensor_parallel_size
