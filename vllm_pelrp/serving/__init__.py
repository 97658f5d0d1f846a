"""vLLM plugin: serve PA-LRP explanations through the OpenAI-compatible API.

Entry points (``pyproject.toml``):
- ``vllm.general_plugins``: ``pelrp = vllm_pelrp.serving.plugin:register`` (worker side);
- ``vllm.endpoint_plugins``: ``pelrp = vllm_pelrp.serving.api:PelrpEndpointPlugin`` (HTTP).

Both load only when ``VLLM_PLUGINS`` names ``pelrp``. See docs/serving.md.
"""

from .plugin import PLUGIN_NAME, register

__all__ = ["PLUGIN_NAME", "register"]
