"""CPU time of the API process per explanation (``pelrp serve``, the default SmolLM2, float32),
for one or more source trees of the project, in the same run.

    .venv/bin/python bench/perf/api_cpu.py --tree after=. --tree before=/tmp/pelrp-before \
        [--requests 8] [--rounds 2] [--eager] [--json out.json]

Each ``--tree NAME=PATH`` gets a server of its own, started with ``PYTHONPATH=PATH`` (the same
venv; vLLM's plugin entry point then imports that tree's ``vllm_pelrp``). ``pelrp serve``
execs vLLM's API server, so the server's pid is the API process; the engine core and the
workers are its children and are not counted. All servers run at once and the rounds
alternate between them, so outside load hits each alike. Per round and server: ``--requests``
explained completions one after another (a 160-token prompt, 32 generated tokens, target
``per_token``: 32 rows, the heaviest result a request can ask for at this length), then as many
plain completions of the same length. The API process's user + system CPU time (psutil) is
read around each batch, less its idle rate (measured over 10 s with nothing in flight: vLLM's
stats logger, the loop watch) times the batch's wall time; reported per request: the explained
and the plain, their difference (what explaining costs the API process), and the median wall
time of an explanation.

``--eager``: the servers skip torch.compile (``pelrp serve --eager``), which saves the first
start's 5-10 minutes of compiling; the API process's work does not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repo root

from bench.common.servers import COMMON, MODEL, free_port, launch, stop  # noqa: E402

PROMPT = ("The history of the lighthouse begins with fires lit on hills to guide ships home. "
          "Later, towers of stone carried lamps of oil, and lenses made their light reach far "
          "out to sea. ") * 4


def start_tree(name: str, tree: str, eager: bool):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
    env.pop("VLLM_PLUGINS", None)
    command = [sys.executable, "-m", "vllm_pelrp.cli", "serve", "--port", str(port),
               *(["--eager"] if eager else []), *COMMON]
    return launch(command, env, port, f"/tmp/pelrp_api_cpu_{name}.log", timeout=1800)


def completion(base: str, explain: bool, max_tokens: int) -> float:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    if explain:
        body["explain"] = {"target": "per_token"}
    started = time.perf_counter()
    reply = httpx.post(base + "/v1/completions", json=body, timeout=3600)
    reply.raise_for_status()
    if explain:
        assert "error" not in reply.json()["choices"][0]["explanation"], reply.text[:300]
    return time.perf_counter() - started


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def batch(base: str, api: psutil.Process, explain: bool, requests: int, max_tokens: int,
          idle_rate: float) -> tuple[float, list[float]]:
    """CPU seconds of the API process per request, less what it spends idle over the same wall
    time (vLLM's stats logger, the plugin's loop watch: ``idle_rate`` CPU s per s)."""
    before, started = cpu_seconds(api), time.perf_counter()
    walls = [completion(base, explain, max_tokens) for _ in range(requests)]
    spent = cpu_seconds(api) - before - idle_rate * (time.perf_counter() - started)
    return spent / requests, walls


def idle_rate(api: psutil.Process, seconds: float = 10.0) -> float:
    """CPU seconds per second of the API process with no request in flight."""
    before = cpu_seconds(api)
    time.sleep(seconds)
    return (cpu_seconds(api) - before) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True,
                        help="NAME=PATH: a source tree to serve (repeat for each)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    trees = dict(item.split("=", 1) for item in args.tree)
    servers = {}
    try:
        for name, tree in trees.items():
            process, base = start_tree(name, tree, args.eager)
            servers[name] = (process, base, psutil.Process(process.pid))
            print(f"{name}: serving from {tree} (API pid {process.pid})", flush=True)
        for _, base, _ in servers.values():  # warm-up: first requests build caches
            completion(base, True, args.max_tokens)
            completion(base, False, args.max_tokens)
        idle = {name: idle_rate(api) for name, (_, _, api) in servers.items()}
        print("idle CPU s per s:", idle, flush=True)
        rounds: dict[str, dict[str, list]] = {
            name: {"explained_cpu_s": [], "plain_cpu_s": [], "explained_wall_s": []}
            for name in servers}
        for index in range(args.rounds):
            order = list(servers) if index % 2 == 0 else list(reversed(servers))
            for name in order:
                _, base, api = servers[name]
                explained, walls = batch(base, api, True, args.requests, args.max_tokens,
                                         idle[name])
                plain, _ = batch(base, api, False, args.requests, args.max_tokens, idle[name])
                rounds[name]["explained_cpu_s"].append(explained)
                rounds[name]["plain_cpu_s"].append(plain)
                rounds[name]["explained_wall_s"] += walls
                print(f"round {index} {name}: API CPU {explained * 1e3:.1f} ms per explained "
                      f"request, {plain * 1e3:.1f} ms per plain one", flush=True)
    finally:
        for process, _, _ in servers.values():
            stop(process)
    results = {"model": MODEL, "eager": args.eager, "requests": args.requests,
               "rounds": args.rounds, "max_tokens": args.max_tokens, "target": "per_token",
               "trees": trees, "servers": {}}
    for name, values in rounds.items():
        explained = statistics.median(values["explained_cpu_s"])
        plain = statistics.median(values["plain_cpu_s"])
        results["servers"][name] = {
            "api_cpu_ms_per_explained_request": explained * 1e3,
            "api_cpu_ms_per_plain_request": plain * 1e3,
            "api_cpu_ms_per_explanation": (explained - plain) * 1e3,
            "explained_wall_s_median": statistics.median(values["explained_wall_s"]),
            "idle_cpu_s_per_s": idle[name],
            "rounds": values}
    print(json.dumps({k: v for k, v in results.items()}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
