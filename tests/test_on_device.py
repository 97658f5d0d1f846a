"""Explanations live on the model's device (issue 22): the recording pool, the op that writes it,
and the engine's forward and backward allocate nothing anywhere else and read nothing back.

The model's tensors are put on PyTorch's ``meta`` device, where ops run on shapes alone: any
tensor that an op creates on another device (a host tensor, a copy to the host) or any read of a
value back to the host (``.item()``, ``int(tensor)``: ``aten._local_scalar_dense``) is recorded by
a dispatch mode and fails the test. The only data that crosses from the host is what a job
brings (its token ids and target pairs, one copy each, created on the device).
"""

from __future__ import annotations

import dataclasses
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tiny_models import tiny_model, tiny_tokenizer
from vllm_pelrp.engine.backward import (LogitSeeds, forward_layer_inputs,
                                        relevance_from_layer_inputs, run_forward)
from vllm_pelrp.explainer import Explainer
from vllm_pelrp.serving.record_pool import RecordingPool, install_layer_hooks, set_pool

SYNC = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


class OffDevice(TorchDispatchMode):
    """Every op whose output is not on ``meta``, or that reads a value back to the host, with
    the line of vllm_pelrp that ran it."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        off = [t.device for t in tree_leaves(out)
               if isinstance(t, torch.Tensor) and t.device.type != "meta"]
        if off or func in SYNC:
            ours = [f for f in traceback.extract_stack() if "vllm_pelrp" in f.filename
                    or "/kernels/" in f.filename]
            where = f"{ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].lineno}" if ours else "?"
            self.found.append(f"{func} -> {off or 'host read'} at {where}")
        return out


def _on_meta(value):
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, list):
        return [_on_meta(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{
            f.name: _on_meta(getattr(value, f.name)) for f in dataclasses.fields(value)
            if f.init and f.name not in ("spec", "all_reduce")})
    return value


@pytest.fixture(scope="module")
def meta_weights():
    weights = Explainer(tiny_model("llama"), tiny_tokenizer(), name="tiny").weights
    moved = _on_meta(weights)
    assert moved.device.type == "meta" and all(
        t.device.type == "meta" for layer in moved.layers for t in vars(layer).values()
        if isinstance(t, torch.Tensor))
    return moved


@pytest.mark.parametrize("mode", ["pa-lrp", "attnlrp"])
def test_the_backward_from_recorded_inputs_stays_on_the_device(meta_weights, mode):
    length = 12
    inputs = [torch.empty(length, meta_weights.spec.hidden_size, device="meta")
              for _ in meta_weights.layers]
    with OffDevice() as watch:
        seeds = LogitSeeds.from_rows([[(length - 1, 5)], [(3, 7), (4, 9)]], device="meta")
        result = relevance_from_layer_inputs(meta_weights, inputs,
                                             torch.arange(length, device="meta"), seeds, mode,
                                             row_chunk=1)
    assert watch.found == []
    assert result.token.device.type == "meta"


def test_the_recomputed_forward_and_its_backward_stay_on_the_device(meta_weights):
    """``recompute``: the worker's own forward from the ids, then the backward on its caches."""
    ids = torch.zeros(10, dtype=torch.long, device="meta")
    with OffDevice() as watch:
        forward = run_forward(meta_weights, ids, cache_budget_bytes=2**30)
        inputs, _ = forward_layer_inputs(meta_weights, ids)
        relevance_from_layer_inputs(meta_weights, forward.layer_inputs,
                                    torch.arange(10, device="meta"),
                                    LogitSeeds.from_rows([[(9, 1)]], device="meta"),
                                    forward=forward)
    assert watch.found == [] and len(inputs) == len(meta_weights.layers)


class _Layer(torch.nn.Module):
    def forward(self, positions, hidden, residual):
        return hidden, residual


def test_the_recording_pool_and_its_op_stay_on_the_device():
    """The pool, the slot index, the op's writes and the gather are all on the model's device;
    naming a step's slots is one copy to the device, nothing read back."""
    layers = [_Layer() for _ in range(3)]
    with OffDevice() as watch:
        pool = RecordingPool(3, 8, torch.float32, "meta", cap_bytes=3 * 8 * 4 * 64,
                             max_batch_tokens=16, page_tokens=4)
    assert watch.found == [] and pool.buffer.device.type == "meta"
    install_layer_hooks(layers)
    set_pool(pool)
    try:
        pages = pool.allocate(10)
        hidden = torch.empty(6, 8, device="meta")
        with OffDevice() as watch:
            pool.set_step([(1, 5, pages, 0)])
            for index, layer in enumerate(layers):
                layer(torch.empty(6, dtype=torch.long, device="meta"), hidden,
                      hidden if index else None)
            gathered = pool.gather(pages, 4)
        # the only host tensors: the step's slot numbers and the gather's, each staged for one copy
        host = [f for f in watch.found if "meta" not in f]
        assert all("copy" in f or "lift_fresh" in f or "set_step" in f for f in host), host
        assert not [f for f in watch.found if "host read" in f]
        assert gathered.shape == (3, 4, 8) and gathered.device.type == "meta"
    finally:
        set_pool(None)
