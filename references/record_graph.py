"""A toy decoder whose layers call the recording op ``pelrp::record_layer_input`` (as the plugin
hooks a served model), run eagerly, compiled and captured, with three slot maps: the pool must be
the same (issue 22). Used by ``tests/test_record_pool.py`` (CPU, ``torch.compile``) and by
``bench/perf/gpu_record_graph.py`` (CUDA graphs, in ``bench/gpu_all.sh``).
"""

from __future__ import annotations

import torch

from vllm_pelrp.serving.record_pool import RecordingPool, install_layer_hooks, set_pool

LAYERS, HIDDEN, ROWS = 4, 64, 16
# three steps of one batch of ROWS rows: which rows record which positions of which recording
SLOT_MAPS = [
    [(0, 6, 0, 0), (9, 12, 1, 0)],    # prefill of recording 0, part of recording 1's
    [(3, 4, 0, 6), (12, 16, 1, 3)],   # a decode row of 0, the rest of 1's prefill
    [(15, 16, 1, 7)],                 # one decode row of 1; every other row to the scratch slot
]


class ToyLayer(torch.nn.Module):
    """A pre-norm residual block called as vLLM's decoder layers are:
    ``layer(positions, hidden_states, residual) -> (hidden_states, residual)``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden)
        self.mlp = torch.nn.Linear(hidden, hidden)

    def forward(self, positions, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        return torch.tanh(self.mlp(self.norm(residual))) + positions[:, None] * 1e-3, residual


class ToyDecoder(torch.nn.Module):
    def __init__(self, layers: int = LAYERS, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(ToyLayer(hidden) for _ in range(layers))

    def forward(self, positions, hidden):
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        return hidden + residual


def build(device: str, seed: int = 0) -> tuple[ToyDecoder, RecordingPool, list[list[int]]]:
    """The hooked decoder, its pool (the active one) and two recordings' pages."""
    torch.manual_seed(seed)
    model = ToyDecoder().to(device).eval()
    install_layer_hooks(model.layers)
    pool = RecordingPool(LAYERS, HIDDEN, torch.float32, device,
                         cap_bytes=LAYERS * HIDDEN * 4 * 64, max_batch_tokens=ROWS * 2,
                         page_tokens=4)
    set_pool(pool)
    return model, pool, [pool.allocate(8), pool.allocate(12)]


def steps(device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 100, (ROWS,), generator=generator).to(device),
             torch.randn(ROWS, HIDDEN, generator=generator).to(device)) for _ in SLOT_MAPS]


def run(model, pool, pages, forward, device: str) -> torch.Tensor:
    """The pool's slots after the three steps through ``forward(positions, hidden)`` (the
    scratch slot aside: which unrecorded row lands there last is unspecified)."""
    pool.buffer.zero_()
    for slot_map, (positions, hidden) in zip(SLOT_MAPS, steps(device)):
        pool.set_step([(r0, r1, pages[which], p0) for r0, r1, which, p0 in slot_map])
        forward(positions, hidden)
    return pool.buffer[:, : pool.scratch].clone()


def captured(model, device: str, body):
    """``body`` captured in a CUDA graph on static inputs; returns a forward that copies its
    arguments into them and replays."""
    static_positions = torch.zeros(ROWS, dtype=torch.long, device=device)
    static_hidden = torch.zeros(ROWS, HIDDEN, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up (and compile) outside the capture
            body(static_positions, static_hidden)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body(static_positions, static_hidden)

    def replay(positions, hidden):
        static_positions.copy_(positions)
        static_hidden.copy_(hidden)
        graph.replay()

    return replay


# the captured eager model runs the very same kernels; compiled code fuses the layers' math
# (LayerNorm, tanh) differently, so its rows differ in the last bits
TOLERANCE = {"CUDA graph": 0.0}
COMPILED_TOLERANCE = 1e-5


def check(device: str) -> dict[str, float]:
    """Max |pool - eager pool| for each captured or compiled form."""
    model, pool, pages = build(device)
    with torch.no_grad():
        eager = run(model, pool, pages, model, device)
        recorded = sum(r1 - r0 for slot_map in SLOT_MAPS for r0, r1, _, _ in slot_map)
        assert int((eager.abs().sum(-1) > 0).sum()) == LAYERS * recorded  # each row once
        forms = {"torch.compile(fullgraph=True)":
                 torch.compile(model, fullgraph=True, dynamic=False)}
        if device.startswith("cuda"):
            forms["CUDA graph"] = captured(model, device, model)
            forms["compiled, then CUDA graph"] = captured(
                model, device, torch.compile(model, fullgraph=True, dynamic=False))
        diffs = {}
        for name, forward in forms.items():
            diffs[name] = float((run(model, pool, pages, forward, device) - eager).abs().max())
    set_pool(None)
    return diffs


