"""Peak tensor memory of a call on CPU, and random engine weights of a spec's shapes: what
``engine/cost.py``'s estimate is checked against (its unit test, ``bench/perf/explain_memory.py``).

``peak_bytes`` replays the CPU allocator's events that torch's profiler records
(``profile_memory=True``): the most bytes of tensors alive at once during the call, beyond those
alive before it. Only the calling thread's allocations are seen: run the engine without a
``recompute_executor``. ``SquareShapes`` records the T×T tensors a call creates.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vllm_pelrp.engine.spec import DecoderSpec, LayerWeights, ModelWeights


class SquareShapes(TorchDispatchMode):
    """Records every op's output shape with two dimensions of at least ``length``: a T×T
    tensor (scores, probabilities, a mask) of a T-token input, whatever its other dimensions."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length
        self.found: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and sum(n >= self.length for n in t.shape) >= 2:
                self.found.append((str(func), tuple(t.shape)))
        return out


def peak_bytes(fn: Callable[[], Any]) -> int:
    """The peak of tensor bytes allocated during ``fn()`` and not freed before that moment."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    alive = peak = 0
    for _, nbytes in events:
        alive += nbytes
        peak = max(peak, alive)
    return peak


def rss_peak_bytes(fn: Callable[[], Any]) -> int:
    """The peak resident memory during ``fn()`` beyond the resident memory before it (Linux:
    the kernel's high-water mark, reset first through ``/proc/self/clear_refs``). Close to the
    tensors' own peak only when freed memory goes back to the system at once: start the process
    with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then maps every larger block, and unmaps it on
    free). Unlike ``peak_bytes`` it keeps nothing per operation (the profiler's record of a
    SmolLM2 backward fills gigabytes) and sees every thread."""
    def status(field: str) -> int:
        with open("/proc/self/status", encoding="ascii") as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # reset VmHWM to the current RSS
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


def random_decoder_weights(spec: DecoderSpec, dtype: torch.dtype = torch.float32,
                           seed: int = 0, device: str = "cpu") -> ModelWeights:
    """``ModelWeights`` of ``spec``'s shapes with random values (norm scales near 1), made on
    ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, \
        spec.num_kv_heads * spec.head_dim

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator, device=device)
                * cols ** -0.5).to(dtype)

    def norm(size: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(size, generator=generator, device=device)).to(dtype)

    layers = [LayerWeights(
        attention_norm=norm(hidden), q_proj=matrix(q, hidden), k_proj=matrix(kv, hidden),
        v_proj=matrix(kv, hidden), o_proj=matrix(hidden, q), mlp_norm=norm(hidden),
        gate_proj=matrix(spec.intermediate_size, hidden),
        up_proj=matrix(spec.intermediate_size, hidden),
        down_proj=matrix(hidden, spec.intermediate_size)) for _ in range(spec.num_layers)]
    embed = matrix(spec.vocab_size, hidden)
    return ModelWeights(spec, embed, layers, norm(hidden), embed)


def cuda_peak_bytes(fn: Callable[[], Any]) -> int:
    """``peak_bytes`` on CUDA: the caching allocator's peak during ``fn()`` beyond what was
    allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def decoder_spec(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                 vocab: int = 1000) -> DecoderSpec:
    """A LLaMA-like spec (head_dim = hidden / heads)."""
    return DecoderSpec(hidden_size=hidden, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=hidden // heads,
                       intermediate_size=intermediate, vocab_size=vocab, rms_norm_eps=1e-5,
                       rope_theta=10000.0)
