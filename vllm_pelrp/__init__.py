"""vllm-pelrp: PA-LRP (positional-aware LRP) explanations for LLaMA-family models, offline and in vLLM."""

from .explainer import MAX_PER_TOKEN_ROWS, Explainer, load_explainer
from .explanation import Explanation, Mode, RelevanceRow, Token

__all__ = [
    "Explainer",
    "Explanation",
    "MAX_PER_TOKEN_ROWS",
    "Mode",
    "RelevanceRow",
    "Token",
    "load_explainer",
]
__version__ = "0.1.0"
