"""Serving benchmark for the vLLM plugin, ratios from one run (CPU, default model, float32).

1. Throughput: the same batch of non-explain requests against the plugin server and against a
   plain vLLM server (no plugin), both as deployed by default (torch.compile; --eager: both
   eager), so the ratio is the plugin's cost: the recording op in the graph and the
   recorder's per-step check. Target >= 0.97x.
2. Latency: one 128-token completion of a 512-token prompt, explained vs unexplained, on the
   plugin server (sequential, temperature 0, ignore_eos). Target <= 1.5x on CPU. "cold": each
   request has a prompt of its own; "warm": the explained request repeats the unexplained
   one's prompt, so its prompt comes from vLLM's prefix cache and the worker recomputes those
   rows (docs/serving.md, "Prefix caching").
3. Memory: recorded bytes per token (num_layers x hidden x dtype bytes) and the worker's peak.

    .venv/bin/python bench/perf/serving_bench.py [--requests 32] [--concurrency 8] [--json out.json]
    .venv/bin/python bench/perf/serving_bench.py --rounds 7 --requests 32   # the 2026-11-29 runs
    .venv/bin/python bench/perf/serving_bench.py --aa --rounds 7 --requests 64   # A/A noise check
    .venv/bin/python bench/perf/serving_bench.py --before /path/to/old/checkout   # before/after

Both servers run at once and the measurements alternate (median of --rounds), so load from
other processes on a shared machine affects both sides alike. Throughput is measured twice, with
each server started first (the first-started one ran faster in an A/A check), and
``throughput_ratio_balanced`` is the geometric mean of the two orders' ratios (``--one-order``:
plugin first only). ``--aa`` runs the throughput rounds on two identical plain servers
instead, to show what a ratio can resolve here.
``bench/perf/record_op_cost.py`` times the plugin's only per-step work directly.

``--before DIR`` compares two plugin servers instead, in the same run: this checkout's and the
one in ``DIR`` (an older commit's worktree, first on the server's ``PYTHONPATH``): plain
throughput (alternating rounds, after/before) and the explained latency ratio on each.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repo root

from bench.common.servers import MODEL, free_port, launch, start, stop  # noqa: E402, F401  (re-exported)


def completion(base: str, prompt, max_tokens: int, explain: dict | None = None) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    if explain is not None:
        body["explain"] = explain
    reply = httpx.post(base + "/v1/completions", json=body, timeout=3600)
    reply.raise_for_status()
    return reply.json()


def worker_stats(base: str) -> dict:
    return httpx.get(base + "/v1/explain/stats", timeout=60).json()["workers"][0]


def throughput(base: str, requests: int, concurrency: int, max_tokens: int) -> float:
    prompts = [f"Request {i}: write a short note about the number {i}." for i in range(requests)]
    completion(base, "warm up", 4)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        outputs = list(pool.map(lambda p: completion(base, p, max_tokens), prompts))
    elapsed = time.perf_counter() - started
    tokens = sum(o["usage"]["completion_tokens"] for o in outputs)
    return tokens / elapsed


@contextlib.contextmanager
def two_servers(first: tuple[bool, str], second: tuple[bool, str], compiled: bool):
    """Start two servers ((plugin?, log) each, in this order); yield their URLs; stop both."""
    process_one, url_one = start(*first, compiled)
    try:
        process_two, url_two = start(*second, compiled)
    except BaseException:
        stop(process_one)
        raise
    try:
        yield url_one, url_two
    finally:
        stop(process_one)
        stop(process_two)


def throughput_rounds(args, url_a: str, url_b: str) -> tuple[list[float], list[float]]:
    """--rounds throughput measurements of each server; the one measured first alternates, so a
    drift within a round hits both alike."""
    a, b = [], []
    for index in range(args.rounds):
        measure = lambda url: throughput(url, args.requests, args.concurrency,  # noqa: E731
                                         args.max_tokens)
        if index % 2 == 0:
            a.append(measure(url_a))
            b.append(measure(url_b))
        else:
            b.append(measure(url_b))
            a.append(measure(url_a))
        print(f"throughput round {index}: {a[-1]:.1f} vs {b[-1]:.1f} tok/s", flush=True)
    return a, b


def median_round_ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios a/b: each round measures both sides back to back, so this
    pairs them under the same outside load."""
    return statistics.median(x / y for x, y in zip(a, b))


PLUGIN_SERVER = (True, "/tmp/pelrp_bench_plugin.log")
PLAIN_SERVER = (False, "/tmp/pelrp_bench_plain.log")


def aa_check(args, compiled: bool) -> None:
    """Two identical plain servers through the throughput rounds: how far apart the same server
    lands on this machine, i.e. what a ratio of the real comparison can resolve."""
    with two_servers((False, "/tmp/pelrp_bench_aa_first.log"),
                     (False, "/tmp/pelrp_bench_aa_second.log"), compiled) as (first_url, second_url):
        ones, twos = throughput_rounds(args, first_url, second_url)
    results = {"aa_rounds": {"first_started": ones, "second_started": twos},
               "aa_ratio": statistics.median(ones) / statistics.median(twos),
               "aa_ratio_median_of_rounds": median_round_ratio(ones, twos)}
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


def before_after(args, compiled: bool) -> None:
    """This checkout's plugin server against ``args.before``'s: plain throughput (after/before,
    alternating rounds) and, on each, a cold explained request's latency over an unexplained
    one's (``--prompt-tokens`` + ``--completion-tokens``), alternating servers."""
    extra = ["--explain-activations", args.activations] if args.activations else []
    after = start(True, "/tmp/pelrp_bench_after.log", compiled, args=extra)
    try:
        before = start(True, "/tmp/pelrp_bench_before.log", compiled, code=args.before)
    except BaseException:
        stop(after[0])
        raise
    try:
        (_, after_url), (_, before_url) = after, before
        ours, theirs = throughput_rounds(args, after_url, before_url)
        results: dict = {"servers": "compiled" if compiled else "eager", "before": args.before,
                         "activations_after": args.activations or "auto",
                         "throughput_rounds": {"after": ours, "before": theirs},
                         "throughput_ratio_after_vs_before": median_round_ratio(ours, theirs)}
        latency = {f"{side}_{kind}": [] for side in ("after", "before")
                   for kind in ("unexplained", "explained")}
        for round_index in range(max(1, args.rounds - 1)):
            for side, url in (("after", after_url), ("before", before_url))[::1 - 2 * (round_index % 2)]:
                for kind, explain in (("unexplained", None), ("explained", {"mode": args.mode})):
                    rng = random.Random(hash((side, kind, round_index)) % 2**32)
                    prompt = [rng.randrange(100, 40000) for _ in range(args.prompt_tokens)]
                    started = time.perf_counter()
                    out = completion(url, prompt, args.completion_tokens, explain)
                    latency[f"{side}_{kind}"].append(time.perf_counter() - started)
                    if explain:
                        assert "error" not in out["choices"][0]["explanation"]
        results["latency_rounds"] = latency
        for side in ("after", "before"):
            results[f"latency_{side}_explained_vs_unexplained"] = median_round_ratio(
                latency[f"{side}_explained"], latency[f"{side}_unexplained"])
            results[f"latency_{side}_explained_s"] = statistics.median(latency[f"{side}_explained"])
        results["latency_explained_after_vs_before"] = median_round_ratio(
            latency["after_explained"], latency["before_explained"])
    finally:
        stop(after[0])
        stop(before[0])
    for key, value in results.items():
        print(f"{key:42s} {value:.4g}" if isinstance(value, float) else f"{key:42s} {value}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
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
    parser.add_argument("--no-spare-cores", action="store_true",
                        help="plugin server with VLLM_PELRP_SPARE_CORES=0: the backward's "
                             "recomputes stay on the worker's cores")
    parser.add_argument("--aa", action="store_true",
                        help="A/A noise check instead: two identical plain vLLM servers, the "
                             "same alternating throughput rounds, their ratio (ideally 1.0)")
    parser.add_argument("--one-order", action="store_true",
                        help="throughput with the plugin server started first only; default: "
                             "also with the plain server started first, and the geometric mean "
                             "of the two orders' ratios (throughput_ratio_balanced)")
    parser.add_argument("--before", default=None, metavar="DIR",
                        help="compare this checkout's plugin server with the one of DIR (an "
                             "older commit's worktree) instead of with plain vLLM")
    parser.add_argument("--activations", choices=("record", "recompute", "auto"), default=None,
                        help="--explain-activations of this checkout's server (with --before)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    compiled = not args.eager
    results: dict = {"servers": "compiled" if compiled else "eager"}

    # Both servers run at once (one idles while the other is measured) and the measurements
    # alternate, so load from other processes on a shared machine hits both sides alike.
    if args.aa:
        aa_check(args, compiled)
        return
    if args.before:
        before_after(args, compiled)
        return
    if args.no_spare_cores:
        os.environ["VLLM_PELRP_SPARE_CORES"] = "0"
    results["spare_cores_enabled"] = not args.no_spare_cores
    # Throughput twice, once with each server started first: an A/A check here read the
    # first-started of two identical servers 1.051x (bench/perf/results/serving_aa.json). Two runs of
    # both orders later showed no steady bias (the favoured order flipped), but the geometric
    # mean of the two orders' ratios cancels one that scales the first-started server's rate.
    if not args.one_order:
        with two_servers(PLAIN_SERVER, PLUGIN_SERVER, compiled) as (plain_url, plugin_url):
            print("plain server started first", flush=True)
            ours, theirs = throughput_rounds(args, plugin_url, plain_url)
            results["throughput_rounds_plain_first"] = {"plugin": ours, "plain": theirs}
            results["throughput_ratio_plain_first"] = median_round_ratio(ours, theirs)
    with two_servers(PLUGIN_SERVER, PLAIN_SERVER, compiled) as (plugin_url, plain_url):
        print("plugin server started first", flush=True)
        ours, theirs = throughput_rounds(args, plugin_url, plain_url)
        results["throughput_plugin_tok_s"] = statistics.median(ours)
        results["throughput_plain_tok_s"] = statistics.median(theirs)
        results["throughput_rounds"] = {"plugin": ours, "plain": theirs}
        results["throughput_ratio_plugin_vs_plain"] = (
            results["throughput_plugin_tok_s"] / results["throughput_plain_tok_s"])
        results["throughput_ratio_median_of_rounds"] = median_round_ratio(ours, theirs)
        if not args.one_order:
            results["throughput_ratio_plugin_first"] = results["throughput_ratio_median_of_rounds"]
            results["throughput_ratio_balanced"] = math.sqrt(
                results["throughput_ratio_plugin_first"] * results["throughput_ratio_plain_first"])

        # Latency, exactly --prompt-tokens prompt tokens (ids) and --completion-tokens generated.
        # cold: every request has a prompt of its own (no prefix-cache hit for either side), so
        #   the ratio is what explaining costs a new request.
        # warm: the explained request repeats the unexplained one's prompt, so vLLM serves the
        #   prompt's full blocks from its prefix cache (the unexplained request of the next
        #   round does too) and the worker recomputes the skipped rows before the backward.
        def prompt_ids(seed: int) -> list[int]:
            rng = random.Random(seed)
            return [rng.randrange(100, 40000) for _ in range(args.prompt_tokens)]

        def timed(prompt, explain):
            started = time.perf_counter()
            out = completion(plugin_url, prompt, args.completion_tokens, explain)
            return time.perf_counter() - started, out

        latency = {name: [] for name in ("cold_unexplained", "cold_explained",
                                         "warm_unexplained", "warm_explained")}
        recomputed = {"cold": [], "warm": []}
        explain = {"mode": args.mode}
        for round_index in range(max(1, args.rounds - 1)):
            seconds, _ = timed(prompt_ids(3 * round_index), None)
            latency["cold_unexplained"].append(seconds)
            before = worker_stats(plugin_url)["recomputed_rows"]
            seconds, out = timed(prompt_ids(3 * round_index + 1), explain)
            latency["cold_explained"].append(seconds)
            assert "error" not in out["choices"][0]["explanation"], out["choices"][0]["explanation"]
            recomputed["cold"].append(worker_stats(plugin_url)["recomputed_rows"] - before)
            warm_prompt = [(1000 + 7 * i) % 40000 + 100 for i in range(args.prompt_tokens)]
            seconds, plain_out = timed(warm_prompt, None)
            latency["warm_unexplained"].append(seconds)
            before = worker_stats(plugin_url)["recomputed_rows"]
            seconds, explained_out = timed(warm_prompt, explain)
            latency["warm_explained"].append(seconds)
            recomputed["warm"].append(worker_stats(plugin_url)["recomputed_rows"] - before)
            assert explained_out["choices"][0]["text"] == plain_out["choices"][0]["text"]
        results["latency_rounds"] = latency
        results["latency_recomputed_rows"] = recomputed
        for case in ("cold", "warm"):
            unexplained = statistics.median(latency[f"{case}_unexplained"])
            explained = statistics.median(latency[f"{case}_explained"])
            results[f"latency_{case}_unexplained_s"] = unexplained
            results[f"latency_{case}_explained_s"] = explained
            results[f"latency_{case}_ratio_explained_vs_unexplained"] = explained / unexplained
            results[f"latency_{case}_ratio_median_of_rounds"] = median_round_ratio(
                latency[f"{case}_explained"], latency[f"{case}_unexplained"])
        stats = httpx.get(plugin_url + "/v1/explain/stats", timeout=60).json()
        worker = stats["workers"][0]
        # the backward's layer recomputes run on vLLM's spare core while the engine is idle
        # (vllm_pelrp/serving/spare_cores.py); these say how many did, over the whole run
        results["spare_cores"] = stats["info"].get("spare_cores")
        results["recomputes_on_spare_cores"] = worker.get("recomputes_on_spare_cores")
        results["recomputes_inline"] = worker.get("recomputes_inline")
        results["recorded_bytes_per_token"] = worker["bytes_per_token"]
        results["recorded_peak_bytes"] = worker["peak_bytes"]
        results["recorded_tokens_per_request"] = args.prompt_tokens + args.completion_tokens
    for key, value in results.items():
        print(f"{key:42s} {value:.4g}" if isinstance(value, float) else f"{key:42s} {value}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
