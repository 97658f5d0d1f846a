"""Serving benchmark for the vLLM plugin, ratios from one run (CPU, default model, float32).

1. Throughput: the same batch of non-explain requests against the plugin server and against a
   plain vLLM server (no plugin), both as deployed by default (torch.compile; --eager: both
   eager), so the ratio is the plugin's cost: the recording op in the graph and the
   recorder's per-step check. Target >= 0.97x.
2. Latency: one 128-token completion of a 512-token prompt, explained vs unexplained, on the
   plugin server (sequential, temperature 0, ignore_eos). Target <= 1.5x on CPU.
3. Memory: recorded bytes per token (num_layers x hidden x dtype bytes) and the worker's peak.

    .venv/bin/python bench/serving_bench.py [--requests 16] [--concurrency 8] [--json out.json]

Both servers run at once and the measurements alternate (median of --rounds), so load from
other processes on a shared machine affects both sides alike.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

MODEL = "SmolLM2-135M-Instruct"
COMMON = ["--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory-bytes",
          str(512 << 20), "--seed", "0"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(plugin: bool, log: str, compiled: bool = True):
    from vllm_pelrp.default_model import ensure_default_checkpoint

    port = free_port()
    env = dict(os.environ)
    if plugin:
        env.pop("VLLM_PLUGINS", None)
        command = [sys.executable, "-m", "vllm_pelrp.cli", "serve", "--port", str(port),
                   *([] if compiled else ["--eager"]), *COMMON]
    else:
        env["VLLM_PLUGINS"] = ""
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                   str(ensure_default_checkpoint()), "--served-model-name", MODEL, "--host",
                   "127.0.0.1", "--port", str(port), *([] if compiled else ["--enforce-eager"]),
                   *COMMON]
    process = subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited, see {log}")
        try:
            if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"server did not start, see {log}")


def stop(process) -> None:
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def completion(base: str, prompt, max_tokens: int, explain: dict | None = None) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    if explain is not None:
        body["explain"] = explain
    reply = httpx.post(base + "/v1/completions", json=body, timeout=3600)
    reply.raise_for_status()
    return reply.json()


def throughput(base: str, requests: int, concurrency: int, max_tokens: int) -> float:
    prompts = [f"Request {i}: write a short note about the number {i}." for i in range(requests)]
    completion(base, "warm up", 4)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        outputs = list(pool.map(lambda p: completion(base, p, max_tokens), prompts))
    elapsed = time.perf_counter() - started
    tokens = sum(o["usage"]["completion_tokens"] for o in outputs)
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds per measurement (the median is reported)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--completion-tokens", type=int, default=128)
    parser.add_argument("--mode", default="pa-lrp")
    parser.add_argument("--eager", action="store_true",
                        help="both servers eager (pelrp serve --eager / --enforce-eager); "
                             "default: both keep vLLM's torch.compile, as deployed")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    compiled = not args.eager
    results: dict = {"servers": "compiled" if compiled else "eager"}

    # Both servers run at once (one idles while the other is measured) and the measurements
    # alternate, so load from other processes on a shared machine hits both sides alike.
    plugin, plugin_url = start(True, "/tmp/pelrp_bench_plugin.log", compiled)
    try:
        plain, plain_url = start(False, "/tmp/pelrp_bench_plain.log", compiled)
    except BaseException:
        stop(plugin)
        raise
    try:
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(throughput(plugin_url, args.requests, args.concurrency, args.max_tokens))
            theirs.append(throughput(plain_url, args.requests, args.concurrency, args.max_tokens))
        results["throughput_plugin_tok_s"] = statistics.median(ours)
        results["throughput_plain_tok_s"] = statistics.median(theirs)
        results["throughput_rounds"] = {"plugin": ours, "plain": theirs}
        results["throughput_ratio_plugin_vs_plain"] = (
            results["throughput_plugin_tok_s"] / results["throughput_plain_tok_s"])

        # exactly --prompt-tokens prompt tokens (ids), --completion-tokens generated
        prompt = [(1000 + 7 * i) % 40000 + 100 for i in range(args.prompt_tokens)]
        unexplained, explained = [], []
        for _ in range(max(1, args.rounds - 1)):
            started = time.perf_counter()
            plain_out = completion(plugin_url, prompt, args.completion_tokens)
            unexplained.append(time.perf_counter() - started)
            started = time.perf_counter()
            explained_out = completion(plugin_url, prompt, args.completion_tokens,
                                       {"mode": args.mode})
            explained.append(time.perf_counter() - started)
            assert explained_out["choices"][0]["text"] == plain_out["choices"][0]["text"]
        results["latency_unexplained_s"] = statistics.median(unexplained)
        results["latency_explained_s"] = statistics.median(explained)
        results["latency_rounds"] = {"unexplained": unexplained, "explained": explained}
        results["latency_ratio_explained_vs_unexplained"] = (
            results["latency_explained_s"] / results["latency_unexplained_s"])
        stats = httpx.get(plugin_url + "/v1/explain/stats", timeout=60).json()
        worker = stats["workers"][0]
        results["recorded_bytes_per_token"] = worker["bytes_per_token"]
        results["recorded_peak_bytes"] = worker["peak_bytes"]
        results["recorded_tokens_per_request"] = args.prompt_tokens + args.completion_tokens
    finally:
        stop(plugin)
        stop(plain)
    for key, value in results.items():
        print(f"{key:42s} {value:.4g}" if isinstance(value, float) else f"{key:42s} {value}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
