"""What an explanation costs, from the model's shape and the explanation's size: the work
(floating-point operations) and the peak memory of the backward. Plain arithmetic: no torch, no
vLLM, no HTTP; the API process reads the shape from the worker's setup info (``ModelShape.to_info``)
and checks both before it admits an explanation (``serving/budget.py``).

Work (``explanation_flops``), for B target rows over T tokens, L layers, one layer's linear
multiply-adds per token m = H·(Hq + 2·Hkv)·D + Hq·D·H + 3·H·I (attention projections, a gated MLP;
a mixture-of-experts layer's MLP instead costs its router and the k experts a token chose,
H·E + 3·k·H·Iₑ, and m is the mean over the layers) and its attention multiply-adds
a(T) = 2·Hq·D·T(T+1)/2 (causal; T² when bidirectional):

- the recompute: each layer's forward once, from its saved input (``engine/driver.py``:
  ``driver.relevance``), 2·L·(T·m + a(T)), and as much again when there is no
  recording (the forward from the token ids: ``/v1/explain``, prefix-cache rows, GPT-2, encoders;
  an additive model's recompute is skipped when its forward kept every layer's cache);
- the backward, per target row: a linear layer's input gradient is one product the size of its
  forward (no weight gradient is ever formed), 2·T·m per layer; the attention's fused backward
  recomputes the scores and forms ∂P, ∂V, ∂Q, ∂K: 2.5× its forward, 5·a(T) per layer.

Memory (``working_set``), in the model's dtype (s bytes) and fp32 (4 bytes) for gradients:

- resident (held from admission to the end): the residual stream, every layer's input, L·T·H·s
  (the recording, or the forward's), plus, from token ids, every layer's cache when they fit
  ``driver.DEFAULT_CACHE_BUDGET_BYTES`` (then no recompute); an additive model always starts
  from the ids;
- transient (one backward at a time per job): the gradient at the residual stream for all rows
  (B·T·H·4, twice while a layer's output replaces it), the positional relevance (B·L·T·2·4),
  one layer's recomputed cache (two with the recompute one layer ahead on spare cores), and one
  row chunk's (C rows) MLP or attention gradients (the MLP block's are freed before the
  attention's backward starts), C·T·4·(max(4·I, 8·Hq·D) + 4·H) (a mixture of experts: k·Iₑ + E
  in place of I, the chosen experts' widths and the router's); sliding-window
  layers longer than their window run in tiles of queries, each with its band mask and its
  keys' gradients (O(tile + W) keys, not T); an additive model runs the same driver and fused
  attention backward in the same row chunks, whose gradients are
  C·T·Hq·D·4 each for q, k and v, twice while they are cast and transposed. A recording is
  rebuilt once before its backward when a prefix-cache hit left rows to recompute (a second
  stream for a moment: ``worker._recorded_inputs``), so its transient part is at least a
  stream.

The terms were checked against measured peaks on CPU (``bench/perf/explain_memory.py``): on
SmolLM2-135M, fp32, 128-2,048 tokens and 1-32 rows, the estimate is 1.06-1.48× the measured peak
(2.4× at 128 tokens and one recorded row, 20 MiB for 8); on a tiny random LLaMA-like model
1.08-1.36×, on a tiny GPT-2 (additive) 1.13-1.37×. Not yet measured on a GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

ROTARY, ADDITIVE = "rotary", "additive"
FP32 = 4
GIGA = 1e9
# engine/driver.py's DEFAULT_CACHE_BUDGET_BYTES (not imported: this module needs no torch)
FORWARD_CACHE_BUDGET_BYTES = 512 * 2**20
# kernels/attention_lrp.py's WINDOW_TILE: queries per tile of a sliding-window layer
WINDOW_TILE = 128
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2,
               "float64": 8, "double": 8}


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a torch dtype or its name ('bfloat16', 'torch.float32')."""
    size = getattr(dtype, "itemsize", None)
    if isinstance(size, int):
        return size
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


@dataclass(frozen=True)
class ModelShape:
    """The shapes an explanation's cost depends on (per tensor-parallel rank for heads and the
    MLP, as the engine's specs are). ``kind``: ``rotary`` (``DecoderSpec``: recorded residual
    stream) or ``additive`` (``AdditiveSpec``: always from the token ids). ``sliding_layers`` of ``sliding_window`` keys."""

    kind: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype_bytes: int
    causal: bool = True
    sliding_window: int | None = None
    sliding_layers: int = 0
    row_chunk: int | None = None  # target rows per slice of a layer's backward (worker.ROW_CHUNK)
    layers_ahead: int = 0  # layer caches recomputed ahead (1: on spare cores)
    # mixture-of-experts MLPs in ``moe_layers`` of the layers (the others are dense): E experts
    # of intermediate size Iₑ (per rank), k of them per token
    moe_layers: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0

    @classmethod
    def of_spec(cls, spec: Any, dtype: Any, *, row_chunk: int | None = None,
                layers_ahead: int = 0) -> "ModelShape":
        """From a ``DecoderSpec`` or an ``AdditiveSpec`` (told apart by ``num_kv_heads``)."""
        if hasattr(spec, "num_kv_heads"):  # DecoderSpec
            sliding = sum(spec.layer_window(i) is not None for i in range(spec.num_layers))
            moe = getattr(spec, "moe", None)
            experts = {} if moe is None else dict(
                moe_layers=sum(spec.layer_has_moe(i) for i in range(spec.num_layers)),
                num_experts=moe.num_experts, experts_per_token=moe.top_k,
                expert_intermediate_size=moe.intermediate_size)
            return cls(ROTARY, spec.num_layers, spec.hidden_size, spec.intermediate_size,
                       spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size,
                       dtype_bytes(dtype), True, spec.sliding_window if sliding else None,
                       sliding, row_chunk, layers_ahead, **experts)
        return cls(ADDITIVE, spec.num_layers, spec.hidden_size, spec.intermediate_size,
                   spec.num_heads, spec.num_heads, spec.head_dim, spec.vocab_size,
                   dtype_bytes(dtype), bool(spec.causal), None, 0, row_chunk, 0)

    def to_info(self) -> dict[str, Any]:
        """Plain data for the setup info (through vLLM's msgpack)."""
        return asdict(self)

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> "ModelShape":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in info.items() if k in names})

    @property
    def dense_layers(self) -> int:
        return self.num_layers - self.moe_layers

    @property
    def linear_macs_per_token(self) -> int:
        """One layer's multiply-adds per token in its linear layers, m (the mean over the
        layers: a mixture of experts counts its router and the k experts a token chose)."""
        h, d = self.hidden_size, self.head_dim
        attention = h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
        dense = (3 if self.kind == ROTARY else 2) * h * self.intermediate_size  # gated or not
        moe = h * self.num_experts + 3 * self.experts_per_token * h * self.expert_intermediate_size
        mlp = (self.dense_layers * dense + self.moe_layers * moe) // max(self.num_layers, 1)
        return attention + mlp

    @property
    def mlp_width(self) -> int:
        """Per token, the widest layer's MLP intermediate values: I for a dense MLP, k·Iₑ + E
        (the chosen experts' and the router's) for a mixture of experts."""
        moe = self.experts_per_token * self.expert_intermediate_size + self.num_experts
        return max(self.intermediate_size if self.dense_layers else 0,
                   moe if self.moe_layers else 0)

    def attention_macs(self, tokens: int) -> int:
        """One layer's attention multiply-adds (QKᵀ and A·V), a(T): the fused kernels skip the
        masked half of a causal model's T×T."""
        pairs = tokens * (tokens + 1) // 2 if self.causal else tokens * tokens
        return 2 * self.num_heads * self.head_dim * pairs


def explanation_flops(shape: ModelShape, rows: int, tokens: int, *, from_ids: bool) -> float:
    """Floating-point operations of one explanation: the per-layer recompute (and, ``from_ids``,
    the forward from the token ids) plus the backward of ``rows`` target rows over ``tokens``."""
    layers = shape.num_layers
    forward = 2 * layers * (tokens * shape.linear_macs_per_token + shape.attention_macs(tokens))
    backward_row = layers * (2 * tokens * shape.linear_macs_per_token
                             + 5 * shape.attention_macs(tokens))
    if shape.kind == ROTARY:
        forwards = 1 + int(from_ids)
    else:  # from the ids: one forward, and the recompute unless every layer's cache was kept
        kept = shape.num_layers * layer_cache_bytes(shape, tokens) <= FORWARD_CACHE_BUDGET_BYTES
        forwards = 1 + int(not kept)
    return float(forwards * forward + rows * backward_row)


def explanation_gflop(shape: ModelShape, rows: int, tokens: int, *, from_ids: bool) -> float:
    """``explanation_flops`` in GFLOP (10⁹ floating-point operations)."""
    return explanation_flops(shape, rows, tokens, from_ids=from_ids) / GIGA


@dataclass(frozen=True)
class WorkingSet:
    """Peak memory of one explanation's backward: ``resident`` is held from admission to the
    end (the residual stream, kept caches), ``transient`` only while its backward computes."""

    resident: int
    transient: int

    @property
    def total(self) -> int:
        return self.resident + self.transient


def layer_cache_bytes(shape: ModelShape, tokens: int) -> int:
    """One layer's forward quantities that its backward reads (``layer.LayerCache``, as
    ``blocks.tensor_bytes`` counts it; additive: with the layer's temporaries)."""
    s, t = shape.dtype_bytes, tokens
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    if shape.kind == ADDITIVE:
        # q, k, v, the attention's output and log-sum-exp, up, and the layer's temporaries
        return (t * s * (4 * q + shape.intermediate_size + 2 * shape.hidden_size)
                + shape.num_heads * t * FP32)
    # q, q̃, output; k, k̃, v; gate, up, act(gate) (and a mixture of experts' router logits,
    # fp32 probabilities, chosen experts, weights and token lists); the log-sum-exp
    return (t * s * (3 * q + 3 * kv + 3 * shape.mlp_width) + shape.num_heads * t * FP32
            + (t * (shape.num_experts * FP32 + shape.experts_per_token * 28)
               if shape.moe_layers else 0))


def working_set(shape: ModelShape, rows: int, tokens: int, *, from_ids: bool) -> WorkingSet:
    """Peak bytes of one explanation's backward (see the module's docstring)."""
    t, h, layers = tokens, shape.hidden_size, shape.num_layers
    rows = max(rows, 1)
    stream = layers * t * h * shape.dtype_bytes
    cache = layer_cache_bytes(shape, t)
    chunk = min(rows, shape.row_chunk or rows)
    q = shape.num_heads * shape.head_dim
    if shape.kind == ADDITIVE:
        # always from the ids: every layer's cache kept when all fit the forward's budget, else
        # one recomputed at a time; the gradient at the residual stream for all rows (and its
        # next); one chunk's gradients through a layer and the fused attention backward's ∂q,
        # ∂k, ∂v (fp32, twice while cast and transposed): no T×T tensor
        kept = layers * cache <= FORWARD_CACHE_BUDGET_BYTES
        resident = stream + (layers * cache if kept else 0)
        transient = (2 * rows * t * h * FP32 + (0 if kept else cache)
                     + chunk * t * FP32 * (max(4 * shape.intermediate_size, 8 * q) + 4 * h))
        return WorkingSet(resident, transient)
    kept = from_ids and layers * cache <= FORWARD_CACHE_BUDGET_BYTES  # no recompute then
    resident = stream + (layers * cache if kept else 0)
    recomputed = 0 if kept else (1 + shape.layers_ahead) * cache
    transient = (2 * rows * t * h * FP32  # the gradient at the residual stream, and its next
                 + rows * layers * t * 2 * FP32  # positional relevance, cos and sin
                 + recomputed  # and a layer forward's temporaries:
                 + t * (3 * h + shape.mlp_width) * shape.dtype_bytes
                 + chunk * t * FP32 * (max(4 * shape.mlp_width, 8 * q) + 4 * h))
    if shape.sliding_window is not None and t > shape.sliding_window:
        span = WINDOW_TILE + shape.sliding_window  # keys one tile sees
        transient += WINDOW_TILE * span * FP32 + chunk * span * 2 * shape.num_kv_heads * (
            shape.head_dim * FP32)  # the tile's band mask, and its keys' gradients
    return WorkingSet(resident, transient if from_ids else max(transient, stream))


def request_working_set(shape: ModelShape, jobs: list[tuple[int, int]], *, from_ids: bool,
                        held: bool | None = None) -> int:
    """Peak bytes of a request's jobs, (rows, tokens) each, run one after another on the worker.
    ``held``: every job's resident part is alive throughout (recordings, alive from generation
    on; default: recorded rotary decoders), so they add up, with the largest transient part;
    otherwise each job's forward is made and freed in turn, and the largest job counts."""
    sets = [working_set(shape, r, t, from_ids=from_ids) for r, t in jobs]
    if not sets:
        return 0
    if held is None:
        held = not from_ids and shape.kind == ROTARY
    if held:
        return sum(w.resident for w in sets) + max(w.transient for w in sets)
    return max(w.total for w in sets)
