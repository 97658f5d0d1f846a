"""The recording op is safe in a compiled graph and under graph replay (issue 22): a decoder
whose layers call ``pelrp::record_layer_input`` compiles with ``torch.compile(fullgraph=True)``
(no graph break), its graph holds the op once per layer and nothing that reads a value back to
the host, and replaying it with three slot maps leaves the pool as the eager model does. The
same toy decoder (``references/record_graph.py``) is captured in CUDA graphs by
``bench/perf/gpu_record_graph.py`` on a GPU.
"""

from __future__ import annotations

import re

import torch

from references.record_graph import COMPILED_TOLERANCE, LAYERS, ROWS, build, check
from vllm_pelrp.serving.record_pool import set_pool

SYNCS = re.compile(r"(?<!get)item\b|_local_scalar_dense|nonzero|tolist")  # reads to the host


def test_the_op_compiles_into_one_graph_without_host_reads():
    model, _, _ = build("cpu")
    graphs = []

    def keep_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    try:
        compiled = torch.compile(model, fullgraph=True, backend=keep_graph)  # a break raises
        with torch.no_grad():
            compiled(torch.arange(ROWS), torch.randn(ROWS, 64))
    finally:
        set_pool(None)
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes
               if node.op in ("call_function", "call_method")]
    assert targets.count("pelrp.record_layer_input") == LAYERS, targets
    assert not [t for t in targets if SYNCS.search(t)], targets


def test_compiled_replays_with_three_slot_maps_equal_eager():
    diffs = check("cpu")
    assert list(diffs) == ["torch.compile(fullgraph=True)"]
    assert diffs["torch.compile(fullgraph=True)"] <= COMPILED_TOLERANCE


def test_the_plugin_allocates_one_pool_for_the_served_decoder(monkeypatch):
    """At load time (before compilation): a pool on the model's device with one row per layer
    and a slot index as long as the largest step; once per process (a drafter loaded later
    gets none); none where explanations recompute."""
    import types

    from tiny_models import tiny_config
    from vllm_pelrp.serving import plugin
    from vllm_pelrp.serving.record_pool import active_pool

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, positions, hidden, residual):
            return hidden, residual

    def loaded():
        model = torch.nn.Module()
        model.model = torch.nn.Module()
        model.model.layers = torch.nn.ModuleList(Layer() for _ in range(config.num_hidden_layers))
        return model

    config = tiny_config("llama")
    model_config = types.SimpleNamespace(hf_config=config, dtype=torch.float32,
                                         get_hidden_size=lambda: config.hidden_size)
    vllm_config = types.SimpleNamespace(
        model_config=model_config,
        scheduler_config=types.SimpleNamespace(max_num_batched_tokens=64),
        compilation_config=types.SimpleNamespace(cudagraph_capture_sizes=[1, 2, 128]))
    monkeypatch.setenv("VLLM_PELRP_MAX_RECORD_MB", "1")
    set_pool(None)
    try:
        monkeypatch.setenv("VLLM_PELRP_ACTIVATIONS", "recompute")
        assert not plugin.prepare_recording(loaded(), vllm_config) and active_pool() is None
        monkeypatch.setenv("VLLM_PELRP_ACTIVATIONS", "auto")  # CPU: record
        model = loaded()
        assert plugin.prepare_recording(model, vllm_config)
        pool = active_pool()
        assert model._pelrp_pool is pool and pool.num_layers == config.num_hidden_layers
        assert pool.slots.shape == (128,) and pool.buffer.shape[2] == config.hidden_size
        assert not plugin.prepare_recording(loaded(), vllm_config)  # a second model: none
        assert active_pool() is pool
    finally:
        set_pool(None)
