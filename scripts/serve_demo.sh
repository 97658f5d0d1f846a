#!/usr/bin/env bash
# The main job: set up, start `pelrp serve` on the default model (CPU), send one explained
# request through the OpenAI SDK and show the explanation; the server then keeps running.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
PORT="${PORT:-8000}"
.venv/bin/pelrp serve --port "$PORT" --dtype float32 &
server=$!
trap 'kill $server 2>/dev/null' INT TERM EXIT
.venv/bin/python scripts/demo.py --port "$PORT"
wait $server
