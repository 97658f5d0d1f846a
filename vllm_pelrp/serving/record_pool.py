"""Recorded activations on the model's device, safe under ``torch.compile`` and CUDA graph replay.

At start-up (right after vLLM loads the model, before it compiles the model or captures CUDA
graphs) the plugin allocates one :class:`RecordingPool` on the model's device: a buffer of
``(layers, slots + 1, hidden)`` rows, sized by ``VLLM_PELRP_MAX_RECORD_MB`` (so vLLM's memory
profiling counts it), and a persistent index tensor ``slots`` with one entry per batch row. A
pre-hook on every decoder layer calls the custom op ``pelrp::record_layer_input``, which writes
the layer's input rows at the slots that ``slots`` names:

    pool.buffer[layer, slots[i]] = hidden[i] (+ residual[i])        for every row i

Rows that are not recorded name the scratch slot (the buffer's last row), so the op runs the
same kernels on every step: no host sync, no Python branch on tensor values, nothing that a
captured graph would freeze. Before each step, the recorder fills ``slots`` on the host side
(as vLLM fills its KV cache's slot mapping, ``recorder.py``). Slots come in pages of
``PAGE_TOKENS`` positions; a recording owns the pages its request may need (prompt +
``max_tokens``), reserved when the request first runs and freed when it is explained or
released.

Outside graph capture the op returns at once while no row of the step is recorded (a host
flag), so plain traffic on CPU pays one op call per layer and nothing else.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

PAGE_TOKENS = 16  # positions per page of slots

_POOL: list["RecordingPool | None"] = [None]

# torch.library.Library rather than torch.library.custom_op: the op runs once per layer of every
# step, and custom_op's Python wrappers made each call cost ~22 us against ~4 us here
# (bench/perf/record_op_cost.py).
_LIBRARY = torch.library.Library("pelrp", "DEF")
_LIBRARY.define("record_layer_input(Tensor hidden, Tensor? residual, int layer) -> ()")


def record_layer_input(hidden: Tensor, residual: Tensor | None, layer: int) -> None:
    """Write one decoder layer's input rows into the active pool at the step's slots."""
    pool = _POOL[0]
    if pool is not None and (pool.active or _capturing(hidden)):
        pool.write(layer, hidden, residual)


def _capturing(tensor: Tensor) -> bool:
    """Whether a CUDA graph is being captured: the op must then run its kernels whatever this
    step records, since replays run them for every later step."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


_LIBRARY.impl("record_layer_input", record_layer_input, "CompositeExplicitAutograd")


@torch.library.register_fake("pelrp::record_layer_input")
def _record_layer_input_fake(hidden, residual, layer) -> None:
    return None


# it returns nothing and writes a buffer the graph never reads: without this, the compiler
# would drop it
torch.fx.node.has_side_effect(torch.ops.pelrp.record_layer_input.default)


def pool_cap_bytes() -> int:
    """The pool's size from ``VLLM_PELRP_MAX_RECORD_MB`` (``pelrp serve --record-cap-mb``)."""
    from .. import settings

    return int(settings.get("VLLM_PELRP_MAX_RECORD_MB") * 2**20)


def set_pool(pool: "RecordingPool | None") -> None:
    _POOL[0] = pool


def active_pool() -> "RecordingPool | None":
    return _POOL[0]


def install_layer_hooks(layers: Sequence[torch.nn.Module]) -> None:
    """A pre-hook calling the op on each decoder layer. Every registered architecture calls its
    layers as ``layer(positions, hidden_states, residual)``; layer 0's residual is None (its
    input is the embedding output), later layers' input is ``hidden_states + residual`` (vLLM
    adds them in the next fused add-RMSNorm, after the hook)."""
    for index, layer in enumerate(layers):
        def hook(module, args, index=index):
            residual = args[2] if index > 0 and len(args) > 2 else None
            torch.ops.pelrp.record_layer_input(args[1], residual, index)
        layer.register_forward_pre_hook(hook)


class PoolFull(RuntimeError):
    """Not enough free pages for a recording."""


class RecordingPool:
    """The recording buffer, its slot index tensor and the page allocator (see the module)."""

    def __init__(self, num_layers: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device | str, cap_bytes: int, max_batch_tokens: int,
                 page_tokens: int = PAGE_TOKENS) -> None:
        self.num_layers = int(num_layers)
        self.hidden_size = int(hidden_size)
        self.dtype = dtype
        self.device = torch.device(device)
        self.page_tokens = int(page_tokens)
        element = dtype.itemsize
        self.bytes_per_token = self.num_layers * self.hidden_size * element
        self.num_pages = max(0, int(cap_bytes) // (self.page_tokens * self.bytes_per_token))
        self.scratch = self.num_pages * self.page_tokens  # the slot of rows not recorded
        self.buffer = torch.empty(self.num_layers, self.scratch + 1, self.hidden_size,
                                  dtype=dtype, device=self.device)
        self.slots = torch.full((int(max_batch_tokens),), self.scratch, dtype=torch.long,
                                device=self.device)
        self.active = False  # whether this step records any row (host flag)
        self._dirty = 0  # rows of ``slots`` that may name a slot other than the scratch one
        self._free = list(range(self.num_pages - 1, -1, -1))  # a stack: low pages first
        self._lock = threading.Lock()

    @property
    def cap_bytes(self) -> int:
        return self.num_pages * self.page_tokens * self.bytes_per_token

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return -(-int(tokens) // self.page_tokens)

    # ---- pages ------------------------------------------------------------------------------
    def allocate(self, tokens: int) -> list[int]:
        """Pages for ``tokens`` positions; raises :class:`PoolFull`."""
        need = self.pages_for(tokens)
        with self._lock:
            if need > len(self._free):
                raise PoolFull(f"needs {need} pages of {self.page_tokens} positions, "
                               f"{len(self._free)} of {self.num_pages} are free")
            return [self._free.pop() for _ in range(need)]

    def free(self, pages: Sequence[int]) -> None:
        with self._lock:
            self._free.extend(pages)

    def slot_indices(self, pages: Sequence[int], start: int, stop: int) -> np.ndarray:
        """The slots of positions ``start .. stop-1`` of a recording that owns ``pages``."""
        positions = np.arange(start, stop)
        table = np.asarray(pages, dtype=np.int64)
        return table[positions // self.page_tokens] * self.page_tokens + positions % self.page_tokens

    # ---- each step (engine thread) ----------------------------------------------------------
    def set_step(self, rows: Sequence[tuple[int, int, Sequence[int], int]]) -> None:
        """Name this step's slots: for each ``(r0, r1, pages, p0)``, batch rows ``r0 .. r1-1``
        hold positions ``p0 ..`` of the recording that owns ``pages``; every other row writes
        to the scratch slot. Costs nothing while no step records."""
        if not rows and not self._dirty:
            self.active = False
            return
        end = max([self._dirty, *(r1 for _, r1, _, _ in rows)])
        host = np.full(end, self.scratch, dtype=np.int64)
        for r0, r1, pages, p0 in rows:
            host[r0:r1] = self.slot_indices(pages, p0, p0 + r1 - r0)
        staged = torch.from_numpy(host)
        if self.device.type == "cuda":  # the caching host allocator keeps it until copied
            staged = staged.pin_memory()
        self.slots[:end].copy_(staged, non_blocking=True)
        self._dirty = max((r1 for _, r1, _, _ in rows), default=0)
        self.active = bool(rows)

    def write(self, layer: int, hidden: Tensor, residual: Tensor | None) -> None:
        """The op's body: ``buffer[layer, slots[i]] = hidden[i] (+ residual[i])``."""
        rows = hidden if residual is None else hidden + residual
        self.buffer[layer].index_copy_(0, self.slots[: rows.shape[0]], rows.to(self.dtype))

    # ---- reading (backward thread) ----------------------------------------------------------
    def gather(self, pages: Sequence[int], stop: int) -> Tensor:
        """Positions ``0 .. stop-1`` of a recording, ``(layers, stop, hidden)``, on the pool's
        device (one gather, no host copy)."""
        index = torch.from_numpy(self.slot_indices(pages, 0, stop)).to(self.device)
        return self.buffer.index_select(1, index)
