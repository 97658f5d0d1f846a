"""The explanation's cost model (``engine/cost.py``) against measurement on a tiny random model,
the work cap's unit across model sizes, and the admission decisions of the memory budget
(``serving/budget.py``, ``ExplainService.reserve``): 400 when an explanation can never fit,
429 when the explanations in flight hold the budget, released when they end."""

from __future__ import annotations

import pytest
import torch

from memory_probe import decoder_spec, peak_bytes, random_decoder_weights
from vllm_pelrp import pipeline
from vllm_pelrp.engine.cost import (
    ModelShape,
    explanation_flops,
    explanation_gflop,
    request_working_set,
    working_set,
)

TINY = decoder_spec(64, 3, 4, 2, 128)
# the estimate is an upper bound of the measured peak, and not a loose one
ESTIMATE_OVER_MEASURED = (1.0, 1.5)


def _job(tokens: int, rows: int) -> pipeline.BackwardJob:
    ids = torch.randint(4, TINY.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
    ids = ids.tolist()
    return pipeline.BackwardJob(token_ids=ids, prompt_length=1, mode="pa-lrp",
                                seeds=[[[tokens - 1 - r, ids[tokens - 1 - r]]] for r in range(rows)])


@pytest.mark.parametrize("tokens, rows, from_ids, window", [
    (96, 1, True, None), (192, 8, True, None), (192, 8, False, None), (512, 8, True, 32)])
def test_working_set_estimate_bounds_the_measured_peak(tokens, rows, from_ids, window):
    """In the worker's row chunks, from token ids (``/v1/explain``) or from given layer inputs
    (a recording, resident: counted in): the peak of tensor bytes alive at once, from torch's
    profiler, against ``working_set``; ``window``: every layer slides (in tiles of queries)."""
    from dataclasses import replace

    from vllm_pelrp.engine.backward import forward_layer_inputs

    spec = replace(TINY, sliding_window=window)
    weights = random_decoder_weights(spec)
    shape = ModelShape.of_spec(spec, torch.float32, row_chunk=4)
    job = _job(tokens, rows)
    inputs, stream = None, 0
    if not from_ids:
        inputs, _ = forward_layer_inputs(weights, torch.tensor(job.token_ids))
        stream = sum(x.numel() * x.element_size() for x in inputs)
    measured = stream + peak_bytes(lambda: pipeline.compute(weights, job, inputs, row_chunk=4))
    estimate = working_set(shape, rows, tokens, from_ids=from_ids).total
    low, high = ESTIMATE_OVER_MEASURED
    assert low * measured <= estimate <= high * measured, (estimate, measured)


def test_flops_estimate_counts_the_matrix_products_of_a_run():
    """The estimate's linear layers against torch's FLOP counter on the same explanation (the
    counter does not see CPU flash attention, so the attention terms are taken out)."""
    from torch.utils.flop_counter import FlopCounterMode

    weights = random_decoder_weights(TINY)
    shape = ModelShape.of_spec(TINY, torch.float32, row_chunk=4)
    tokens, rows = 64, 4
    with FlopCounterMode(display=False) as counter:
        pipeline.compute(weights, _job(tokens, rows), cache_budget_bytes=0)
    layers = TINY.num_layers
    attention = layers * shape.attention_macs(tokens) * (2 * 2 + 5 * rows)  # 2 forwards, rows
    linear = explanation_flops(shape, rows, tokens, from_ids=True) - attention
    assert counter.get_total_flops() == pytest.approx(linear, rel=0.05)


def _most_tokens(shape: ModelShape, rows: int, cap_gflop: float) -> int:
    tokens = 1
    while explanation_gflop(shape, rows, tokens * 2, from_ids=False) <= cap_gflop:
        tokens *= 2
    return tokens


def test_one_gflop_cap_admits_fewer_tokens_on_a_bigger_model():
    """The cap counts work, not rows x tokens: one setting, the same work on any model."""
    small = ModelShape.of_spec(TINY, torch.float32)
    big = ModelShape.of_spec(decoder_spec(1024, 16, 16, 4, 4096, vocab=32000), torch.bfloat16)
    cap = 500.0
    assert _most_tokens(big, 8, cap) * 64 <= _most_tokens(small, 8, cap)
    # an 8B-shaped model (Llama-3) costs ~60x SmolLM2-135M per row and token
    smollm2 = ModelShape("rotary", 30, 576, 1536, 9, 3, 64, 49152, 4)
    llama8b = ModelShape("rotary", 32, 4096, 14336, 32, 8, 128, 128256, 2)
    ratio = explanation_gflop(llama8b, 8, 512, from_ids=False) / explanation_gflop(
        smollm2, 8, 512, from_ids=False)
    assert 40 < ratio < 80, ratio
    # the default is about 32 rows x 2,048 tokens on SmolLM2 (what the old cap allowed)
    from vllm_pelrp import settings

    default = settings.SETTINGS["VLLM_PELRP_MAX_EXPLAIN_GFLOP"].default
    assert explanation_gflop(smollm2, 32, 2048, from_ids=True) <= default
    assert explanation_gflop(smollm2, 64, 2048, from_ids=True) > default


def test_memory_admission_decisions():
    from vllm_pelrp.serving.budget import memory_refusal

    assert memory_refusal(100, 1000, 0) is None
    assert memory_refusal(100, 1000, 900) is None
    refused = memory_refusal(100, 1000, 901)
    assert refused.status == 429 and "retry later" in refused.message
    never = memory_refusal(1001, 1000, 0)
    assert never.status == 400 and "budget" in never.message and "VLLM_PELRP_EXPLAIN_MEMORY_MB" \
        in never.message


def test_service_holds_the_budget_until_the_explanation_ends():
    """``ExplainService.reserve``: the request's working set is held under its key; a second
    that does not fit now gets a 429, one that never fits a 400, and ``unreserve`` frees it."""
    from vllm_pelrp.serving.service import ExplainError, ExplainService

    shape = ModelShape.of_spec(TINY, torch.float32, row_chunk=4)
    need = request_working_set(shape, [(4, 512)], from_ids=False)
    service = ExplainService(None, None, "m")
    service.info = {"error": None, "bytes_per_token": 1, "cap_bytes": 10**12,
                    "explain_shape": shape.to_info(), "memory_budget_bytes": int(need * 1.5),
                    "memory_budget_source": "test"}
    service.reserve("a", 512, [(4, 512)])
    assert service.working_sets == {"a": need}
    with pytest.raises(ExplainError) as busy:
        service.reserve("b", 512, [(4, 512)])
    assert busy.value.status == 429 and "b" not in service.reserved
    with pytest.raises(ExplainError) as never:
        service.reserve("c", 2048, [(4, 2048)])
    assert never.value.status == 400 and "memory budget" in never.value.message
    service.unreserve("a")
    service.reserve("b", 512, [(4, 512)])
    assert set(service.working_sets) == {"b"}


def test_work_cap_message_names_the_cost_and_the_cap_in_gflop():
    from vllm_pelrp.serving.service import ExplainError, ExplainService

    service = ExplainService(None, None, "m")
    service.info = {"explain_shape": ModelShape.of_spec(TINY, torch.float32).to_info()}
    service.max_gflop = 0.5
    assert service.check_cost([1], [64]) < 0.5
    with pytest.raises(ExplainError) as over:
        service.check_cost([8, 8], [512, 512], planned=True)
    message = over.value.message
    assert over.value.status == 400 and "GFLOP" in message and "cap of 0 GFLOP" not in message
    assert "VLLM_PELRP_MAX_EXPLAIN_GFLOP" in message and "up to" in message


def test_worker_reports_the_shape_and_a_budget_and_serve_passes_the_flags(monkeypatch, tmp_path):
    """What ``pelrp_setup`` adds to the setup info (``memory_budget.budget_info``): the shape
    the API process estimates with, and the budget, configured or read from free memory."""
    from vllm_pelrp import cli
    from vllm_pelrp.serving.memory_budget import budget_info

    weights = random_decoder_weights(TINY)
    monkeypatch.delenv("VLLM_PELRP_EXPLAIN_MEMORY_MB", raising=False)
    info = budget_info(TINY, weights, 4, 1)
    assert ModelShape.from_info(info["explain_shape"]) == ModelShape.of_spec(
        TINY, torch.float32, row_chunk=4, layers_ahead=1)
    assert info["memory_budget_bytes"] > 0 and "host memory" in info["memory_budget_source"]
    monkeypatch.setenv("VLLM_PELRP_EXPLAIN_MEMORY_MB", "512")
    assert budget_info(TINY, weights, 4, 0)["memory_budget_bytes"] == 512 * 2**20

    (tmp_path / "config.json").write_text("{}")
    args, unknown = cli.build_parser().parse_known_args(
        ["serve", "--model", str(tmp_path), "--max-explain-gflop", "1500",
         "--explain-memory-mb", "4096"])
    args.vllm_args = unknown
    _, env = cli.serve_command(args)
    assert env["VLLM_PELRP_MAX_EXPLAIN_GFLOP"] == "1500.0"
    assert env["VLLM_PELRP_EXPLAIN_MEMORY_MB"] == "4096.0"
    args.max_explain_cost = "65536"  # the replaced flag: refused, naming the new one
    with pytest.raises(cli.CliError, match="--max-explain-gflop"):
        cli.serve_command(args)
