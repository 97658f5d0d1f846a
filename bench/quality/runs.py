"""What the quality runners (faithfulness, grounding) share: the model under test, and what a
run cost (wall and CPU time, load average) for results.json and the report's last line."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the embedded model, when no --model is given


def load_model(model: str | None, threads: int, dtype: str = "float32") -> tuple[Any, Path]:
    """The explainer and checkpoint directory of ``model`` (a directory or a shipped model's
    name; None: the embedded default model) in ``dtype``, with ``threads`` torch threads (0:
    torch's own)."""
    if threads:
        torch.set_num_threads(threads)
    from vllm_pelrp import load_explainer
    from vllm_pelrp.explainer import resolve_model_path

    model_dir = resolve_model_path(model)
    ex = load_explainer(str(model_dir), dtype=dtype)
    if model is None:
        ex.name = DEFAULT_MODEL_NAME
    return ex, model_dir


class RunCost:
    """Started with the run; ``measured()`` gives its ``wall_s``, ``cpu_s`` (this process and
    its children) and 1-minute ``load_average`` at the start and now."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.load_start = os.getloadavg()[0]

    def wall_s(self) -> float:
        return time.perf_counter() - self.start

    def measured(self) -> dict[str, Any]:
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return {"wall_s": self.wall_s(), "cpu_s": sum(u.ru_utime + u.ru_stime for u in usage),
                "load_average": {"start": self.load_start, "end": os.getloadavg()[0],
                                 "cores": os.cpu_count()}}


def cost_sentence(result: dict[str, Any]) -> str:
    """The report's line on what the run cost (the keys of ``RunCost.measured``)."""
    load = result["load_average"]
    return (f"Wall time of the run: {result['wall_s']:.0f} s; CPU time {result['cpu_s']:.0f} s "
            f"(1-minute load average {load['start']:.1f} at the start, {load['end']:.1f} at the "
            f"end, on {load['cores']} cores shared with other jobs)")
