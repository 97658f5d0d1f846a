"""One real ``pelrp serve`` (default model, float32, loopback, a port in 18500-18599) shared by
``test_metrics.py`` and ``test_webview.py``: started on first use, stopped when the pytest session
ends (``config.add_cleanup``), so the two modules pay one server start between them.
``VLLM_PELRP_TEST_SERVER=http://127.0.0.1:PORT`` uses a server already running instead (started
with the arguments below, API keys included). ``wait_until_serving`` and ``stop_server`` serve
every test that starts a server of its own too."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from vllm_pelrp import settings

MODEL = "SmolLM2-135M-Instruct"
PORTS = range(18500, 18600)
STARTUP_SECONDS = 600
# --eager: no torch.compile (1-2 min less startup); recording under compilation is
# tests/test_serving.py's business, these tests look at what the API process does with results
# Two clients' API keys (vLLM's --api-key): every /v1 route needs one, and each client sees only
# its own explanations. The plugin's tests use API_KEY; OTHER_API_KEY is the other client.
API_KEY, OTHER_API_KEY = "pelrp-test-key-a", "pelrp-test-key-b"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OTHER_AUTH = {"Authorization": f"Bearer {OTHER_API_KEY}"}
SERVER_ARGS = ["--eager", "--record-cap-mb", "96", "--dtype", "float32", "--max-model-len",
               "2048", "--max-num-seqs", "8", "--kv-cache-memory-bytes", str(256 << 20),
               "--seed", "0", "--api-key", API_KEY, OTHER_API_KEY]
# an HTTP client that sends API_KEY (tests pass their own timeouts)
http = httpx.Client(headers=AUTH, timeout=600)
_KEY = pytest.StashKey[str]()
_LOG_KEY = pytest.StashKey[Path]()
# two Debian package descriptions and a question whose answer is in the first
DOCUMENTS = [
    "gcal: a program for calculating and printing calendars. Gcal displays hybrid and "
    "proleptic Julian and Gregorian calendar sheets, and can list holidays for many countries.",
    "htop: interactive processes viewer. Htop is an ncurses-based process viewer similar to "
    "top, but it lets you scroll the list vertically and horizontally.",
]
QUESTION = "Which package prints calendars?"


def _free_port() -> int:
    for port in PORTS:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS.start}-{PORTS.stop - 1}")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (API server, engine core, workers), then
    SIGKILL after 30 s; the server must run in its own session (``start_new_session=True``):
    killing only the API server would leave the engine processes running."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(30)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until_serving(process: subprocess.Popen, base: str, log: Path,
                       deadline: float | None = None, headers: dict | None = None) -> None:
    """Return once ``base/v1/models`` answers 200 (sent with ``headers``: a server started with
    ``--api-key`` wants one); RuntimeError with the log's tail when the server exits first or
    ``deadline`` (``time.time()`` value; default STARTUP_SECONDS from now) passes."""
    deadline = deadline or time.time() + STARTUP_SECONDS
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(base + "/v1/models", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server did not start by its deadline:\n{log.read_text()[-4000:]}")


def shared_server(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Base URL of the shared plugin server (started by the first test module that asks)."""
    if _KEY in config.stash:
        if config.stash[_KEY].startswith("failed: "):  # one start per session, not per module
            raise RuntimeError(config.stash[_KEY])
        return config.stash[_KEY]
    if running := settings.get("VLLM_PELRP_TEST_SERVER"):  # a server already running
        config.stash[_KEY] = running.rstrip("/")
        return config.stash[_KEY]
    from vllm_pelrp.default_model import ensure_default_checkpoint

    ensure_default_checkpoint()
    log = Path(tmp_path_factory.mktemp("live_server")) / "server.log"
    config.stash[_LOG_KEY] = log
    port = _free_port()
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    command = [sys.executable, "-m", "vllm_pelrp.cli", "serve", "--host", "127.0.0.1", "--port",
               str(port), *SERVER_ARGS]
    # cwd outside the checkout: `python -m` puts the cwd on sys.path, and the repo's top-level
    # kernels/ folder (shipped as vllm_pelrp.kernels) must not be importable as `kernels`
    # (transformers probes that name for the Hugging Face kernels package)
    process = subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               start_new_session=True, cwd=log.parent)
    config.add_cleanup(lambda: stop_server(process))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, base, log, headers=AUTH)
    except RuntimeError as error:
        stop_server(process)
        config.stash[_KEY] = f"failed: {str(error).splitlines()[0]} log {log}"
        raise
    config.stash[_KEY] = base
    return base


OUR_SOURCES = re.compile(r" WARNING .*\[(loopwatch|metrics|service|api|worker|recorder|plugin|"
                         r"spare_cores|webview)\.py:\d+\]")


def server_warnings(config: pytest.Config, limit: int = 60) -> str:
    """The shared server's last ``limit`` log lines that are errors, or warnings of this
    package (vLLM's format repeats the header on every line of a message, stacks included), for
    failure messages ("" when the server was not started by this session)."""
    log = config.stash.get(_LOG_KEY, None)
    if log is None or not log.exists():
        return ""
    lines = [line for line in log.read_text(errors="replace").splitlines()
             if " ERROR " in line or OUR_SOURCES.search(line)]
    return "\n".join(lines[-limit:]) or "(none)"
