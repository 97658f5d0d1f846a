#!/usr/bin/env bash
# The test command: set everything up from scratch (idempotent), then run the test suite.
#   bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# LXT (the external AttnLRP reference) needs transformers 4.x: its own environment.
bash references/lxt_env.sh
# --durations: the slowest tests, so a test that grows slow shows in every CI log.
exec .venv/bin/python -m pytest -q --durations=30 "$@"
