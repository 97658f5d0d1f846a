"""The compiled forward's frame: vLLM's ``torch.compile``d model called on a fresh CPython
frame-stack chunk (the recording op itself is ``record_pool.py``'s).
"""

from __future__ import annotations

import functools

import torch

from .. import settings


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
