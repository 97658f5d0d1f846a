"""vllm-pelrp: PA-LRP (positional-aware LRP) explanations for the decoders of ``vllm_pelrp.models``
(one file per architecture), offline and in vLLM.

The public names are imported lazily, so that the engine (``vllm_pelrp.engine``) and the kernels
import with torch alone (no transformers or pydantic), e.g. on a bare GPU machine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
_EXPORTS = {
    "Explainer": ".explainer",
    "load_explainer": ".explainer",
    "MAX_PER_TOKEN_ROWS": ".targets",
    "Explanation": ".explanation",
    "Mode": ".explanation",
    "RelevanceRow": ".explanation",
    "Token": ".explanation",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .targets import MAX_PER_TOKEN_ROWS
    from .explainer import Explainer, load_explainer
    from .explanation import Explanation, Mode, RelevanceRow, Token


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'vllm_pelrp' has no attribute {name!r}")
