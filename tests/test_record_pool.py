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
