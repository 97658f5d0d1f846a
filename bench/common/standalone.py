"""Make ``vllm_pelrp`` (with ``kernels/`` as ``vllm_pelrp.kernels``) importable from the repo
root without installing it: for bare GPU machines, where only torch/triton/transformers exist."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def ensure_package() -> None:
    try:
        import vllm_pelrp.kernels  # noqa: F401  (installed, or mapped by an editable install)

        return
    except ImportError:
        pass
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import vllm_pelrp

    spec = importlib.util.spec_from_file_location(
        "vllm_pelrp.kernels", ROOT / "kernels" / "__init__.py",
        submodule_search_locations=[str(ROOT / "kernels")],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["vllm_pelrp.kernels"] = module
    spec.loader.exec_module(module)
    vllm_pelrp.kernels = module
