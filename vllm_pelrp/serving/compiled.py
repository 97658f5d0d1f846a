"""Recording inside a ``torch.compile``d model (vLLM's default on CPU and GPU).

Python forward hooks registered after compilation never run in the compiled graph. Instead, the
general plugin registers, right after the model is loaded and before vLLM compiles it, a
pre-hook on every decoder layer that calls the opaque custom op ``pelrp::record_layer_input``.
Dynamo traces the hook, the op lands in the graph (marked side-effecting so nothing removes it),
and at run time the op hands its arguments to the active ``Recorder``, which does exactly what the
eager hooks do. Without an active recorder the op returns at once.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .. import settings

_ACTIVE: list[Any] = [None]


# Defined with torch.library.Library rather than torch.library.custom_op: the op runs 30 times
# per model step for every request, and custom_op's Python wrappers (autograd, dispatch) made
# each call cost ~22 us and 9 Python frames, against ~4 us and 2 here (bench/perf/record_op_cost.py).
# (The frame-stack chunk mappings that bench/perf/worker_syscalls.py counts come from the size of the
# generated graph's frame, not from this op's depth: this change left their count unchanged.)
_LIBRARY = torch.library.Library("pelrp", "DEF")
_LIBRARY.define(
    "record_layer_input(Tensor positions, Tensor hidden, Tensor? residual, int layer) -> ()")


def record_layer_input(positions: Tensor, hidden: Tensor, residual: Tensor | None,
                       layer: int) -> None:
    """Hand one decoder layer's inputs to the active recorder (none: return at once)."""
    recorder = _ACTIVE[0]
    if recorder is not None:
        recorder.on_layer(layer, positions, hidden, residual)


_LIBRARY.impl("record_layer_input", record_layer_input, "CompositeExplicitAutograd")


@torch.library.register_fake("pelrp::record_layer_input")
def _record_layer_input_fake(positions, hidden, residual, layer) -> None:
    return None


torch.fx.node.has_side_effect(torch.ops.pelrp.record_layer_input.default)


def set_active(recorder: Any) -> None:
    _ACTIVE[0] = recorder


def install_traced_hooks(model: torch.nn.Module, decoder: str = "model") -> bool:
    """Pre-hooks calling the op on each decoder layer of ``model`` (``model.<decoder>.layers``,
    ``decoder`` as the architecture's file of ``vllm_pelrp.models`` names it). Every registered
    architecture calls its layers as ``layer(positions, hidden_states, residual)``."""
    layers = getattr(getattr(model, decoder, None), "layers", None)
    if layers is None or getattr(model, "_pelrp_traced_hooks", False):
        return False
    for index, layer in enumerate(layers):
        def hook(module, args, index=index):
            residual = args[2] if index > 0 and len(args) > 2 else None
            torch.ops.pelrp.record_layer_input(args[0], args[1], residual, index)
        layer.register_forward_pre_hook(hook)
    model._pelrp_traced_hooks = True
    return True


# CPython (3.11+) keeps the frames of a thread on a stack of 16 KiB chunks; a call that does not
# fit in the current chunk maps a new one, which is unmapped again when that call returns.
# Inductor's generated ``call()`` for the 30 layers has a frame of about 8 KiB, and in vLLM's
# worker it starts about 8 KiB into a chunk, so it ends a few bytes short of the chunk's end:
# every Python-level op it calls (matrix products, KV-cache update, attention, the recording op)
# then maps and unmaps a chunk, 8 times per layer per step (bench/perf/worker_syscalls.py). Calling
# the model's forward through a frame larger than a chunk always opens a fresh 64 KiB chunk with
# about 40 KiB free, so the compiled graph and its callees run without new mappings. A larger
# ``co_stacksize`` only reserves stack slots; they are never written, so their pages are never
# touched.
FRESH_CHUNK_STACK_WORDS = 3072  # 24 KiB: more than one 16 KiB chunk


def _call(function, args, kwargs):
    return function(*args, **kwargs)


_call_on_fresh_chunk = type(_call)(
    _call.__code__.replace(co_stacksize=FRESH_CHUNK_STACK_WORDS, co_name="_call_on_fresh_chunk",
                           co_qualname="_call_on_fresh_chunk"),
    globals(), "_call_on_fresh_chunk")


def fresh_chunk_forward() -> bool:
    """Default on; ``VLLM_PELRP_FRESH_CHUNK=0`` calls the model's forward directly."""
    return settings.get("VLLM_PELRP_FRESH_CHUNK")


def run_forward_on_fresh_chunk(model: torch.nn.Module) -> bool:
    """Make ``model``'s forward start on a fresh frame-stack chunk (see above)."""
    if not fresh_chunk_forward() or getattr(model, "_pelrp_fresh_chunk", False):
        return False
    forward = model.forward

    @functools.wraps(forward)
    def forward_on_fresh_chunk(*args, **kwargs):
        return _call_on_fresh_chunk(forward, args, kwargs)

    model.forward = forward_on_fresh_chunk
    model._pelrp_fresh_chunk = True
    return True
