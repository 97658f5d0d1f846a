"""Memory-mapping syscalls of the vLLM worker per generated token, plugin vs plain vLLM.

    .venv/bin/python bench/perf/worker_syscalls.py [--requests 32] [--json out.json]

Starts each server in turn (compiled, as deployed): the plugin, the plugin with
``VLLM_PELRP_FRESH_CHUNK=0`` (the model's forward called directly, not on a fresh frame-stack
chunk: ``vllm_pelrp/serving/compiled.py``), and plain vLLM. It warms each up, then counts the
worker's ``mmap``/``munmap`` calls with ``strace -c`` (Debian's ``strace``) while it serves
``--requests`` non-explain completions of 32 tokens, 8 at a time. Unlike a throughput ratio, the
counts do not depend on how loaded the machine is. On CPython 3.11 the 16 KiB anonymous mappings
are frame-stack chunks: a Python call that crosses a chunk boundary maps one, and it is unmapped
on return (docs/serving.md, "Where the throughput goes" and "Frame-stack chunks").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving_bench  # noqa: E402  (bench/perf/serving_bench.py: start, stop, throughput)


def descendants(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            for child in map(int, handle.read().split()):
                found += [child, *descendants(child)]
    return found


def worker_pid(server_pid: int) -> int:
    for pid in descendants(server_pid):
        with open(f"/proc/{pid}/comm") as handle:
            if handle.read().startswith("VLLM::Worker"):
                return pid
    raise RuntimeError("no VLLM::Worker process under the server")


def count(plugin: bool, requests: int, fresh_chunk: bool = True) -> dict:
    name = ("plugin" if fresh_chunk else "plugin_no_fresh_chunk") if plugin else "plain"
    os.environ["VLLM_PELRP_FRESH_CHUNK"] = "1" if fresh_chunk else "0"
    try:
        process, url = serving_bench.start(plugin, f"/tmp/pelrp_syscalls_{name}.log", True)
    finally:
        os.environ.pop("VLLM_PELRP_FRESH_CHUNK")
    try:
        worker = worker_pid(process.pid)
        serving_bench.throughput(url, 8, 8, 32)  # warm-up: every batch shape seen once
        with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
            tracer = subprocess.Popen(["strace", "-c", "-f", "-e", "trace=mmap,munmap",
                                       "-p", str(worker), "-o", out.name],
                                      stderr=subprocess.DEVNULL)
            time.sleep(2)  # attached to every thread
            serving_bench.throughput(url, requests, 8, 32)
            tracer.send_signal(signal.SIGINT)
            tracer.wait(60)
            table = out.read()
    finally:
        serving_bench.stop(process)
    calls = {m.group(2): int(m.group(1))
             for m in re.finditer(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(mmap|munmap)$",
                                  table, re.MULTILINE)}
    tokens = requests * 32 + 4  # ignore_eos: exactly 32 each, + throughput()'s 4-token warm-up
    return {"tokens": tokens, "calls": calls,
            "per_token": sum(calls.values()) / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if shutil.which("strace") is None:
        sys.exit("strace not found: apt-get install strace")
    results = {"plugin": count(True, args.requests),
               "plugin_no_fresh_chunk": count(True, args.requests, fresh_chunk=False),
               "plain": count(False, args.requests)}
    for name in ("plugin", "plugin_no_fresh_chunk"):
        results[f"ratio_{name}_vs_plain"] = (results[name]["per_token"]
                                             / results["plain"]["per_token"])
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
