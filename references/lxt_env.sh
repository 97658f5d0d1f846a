#!/usr/bin/env bash
# Create (idempotently) the isolated virtual environment used by
# references/lxt_reference.py: the `lxt` package (LXT / AttnLRP, efficient mode)
# with a transformers 4.x release it supports.
#
# Usage:  bash references/lxt_env.sh            # creates <repo>/.venv-lxt
#         LXT_VENV=/some/dir bash references/lxt_env.sh
# Then:   .venv-lxt/bin/python references/lxt_reference.py --model DIR \
#             --input-json IN.json --output-json OUT.json
#
# Notes:
# * lxt 2.1 does not import with transformers 5.x (its BERT module imports
#   helpers removed in 5.0), so transformers is pinned to the last 4.x.
# * lxt is installed with --no-deps: its declared requirements (bitsandbytes,
#   open_clip_torch -> torchvision, zennit, matplotlib, accelerate, tabulate)
#   are not needed for LLaMA in efficient mode. The only hard import among
#   them, torchvision (lxt.efficient.models.vit_torch), is stubbed by
#   lxt_reference.py.
# * torch is always pinned to the local CPU wheel in the same pip command
#   (references/venv_lib.sh, shared with contextcite_env.sh).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=references/venv_lib.sh
source "$REPO_ROOT/references/venv_lib.sh"

TORCH_SPEC="torch==2.13.0"
TRANSFORMERS_SPEC="transformers==4.57.6"
LXT_SPEC="lxt==2.1"
EXTRA_SPECS=("safetensors" "numpy")

# lxt goes in last, without its heavy optional deps (see notes above).
venv_install lxt_env "${LXT_VENV:-$REPO_ROOT/.venv-lxt}" \
    "$TORCH_SPEC" "$TRANSFORMERS_SPEC" "$LXT_SPEC" "${EXTRA_SPECS[@]}"

# Verify: CPU torch of the pinned version, transformers 4.x, lxt importable.
venv_verify <<'EOF'
import sys, types, importlib.util
import torch, transformers
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert not torch.version.cuda, f"CUDA torch installed: {torch.version.cuda}"
assert transformers.__version__.startswith("4."), transformers.__version__
if importlib.util.find_spec("torchvision") is None:
    tv = types.ModuleType("torchvision"); tvm = types.ModuleType("torchvision.models")
    vt = types.ModuleType("torchvision.models.vision_transformer"); vt.nn = torch.nn
    tv.models = tvm; tvm.vision_transformer = vt
    sys.modules.update({"torchvision": tv, "torchvision.models": tvm,
                        "torchvision.models.vision_transformer": vt})
import warnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from lxt.efficient import monkey_patch  # noqa: F401
    import lxt.efficient.models.llama  # noqa: F401
EOF
