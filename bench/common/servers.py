"""Start and stop servers for the benchmarks: ``pelrp serve`` or plain vLLM on the default model,
float32, loopback, a free port, output to a log file."""

from __future__ import annotations

import os
import signal
import socket
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


def start(plugin: bool, log: str, compiled: bool = True, code: str | None = None,
          args: list[str] | None = None):
    """``code``: a checkout of the project whose ``vllm_pelrp`` the plugin server runs (first on
    ``PYTHONPATH``; before/after comparisons); ``args``: more ``pelrp serve`` arguments."""
    from vllm_pelrp.default_model import ensure_default_checkpoint

    port = free_port()
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = os.pathsep.join([code, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if plugin:
        env.pop("VLLM_PLUGINS", None)
        command = [sys.executable, "-m", "vllm_pelrp.cli", "serve", "--port", str(port),
                   *([] if compiled else ["--eager"]), *COMMON, *(args or [])]
    else:
        env["VLLM_PLUGINS"] = ""
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                   str(ensure_default_checkpoint()), "--served-model-name", MODEL, "--host",
                   "127.0.0.1", "--port", str(port), *([] if compiled else ["--enforce-eager"]),
                   *COMMON]
    return launch(command, env, port, log)


START_SECONDS = 1500  # a first start compiles; on a loaded 2-core machine that took > 10 min


def launch(command: list[str], env: dict, port: int, log, timeout: float = START_SECONDS):
    """Start a server process (its output to ``log``) and wait until /v1/models answers."""
    process = subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited, see {log}")
        try:
            if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(process)
    raise RuntimeError(f"server did not start, see {log}")


def stop(process) -> None:
    """Stop the server's whole process group (API server, engine core, workers: it runs in a
    session of its own), not only the API server, whose engine processes would live on."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(60)
            return
        except subprocess.TimeoutExpired:
            continue
