"""Sentence-embedding models: what a sentence-transformers directory says, read as it is.

A sentence-transformers checkpoint is a Hugging Face directory plus a module list
(``modules.json``) that turns the encoder's last hidden states into one vector per text:
``Transformer`` (the Hugging Face model in the directory itself) → ``Pooling`` (its
``<path>/config.json`` picks the mode) → optionally ``Normalize`` (L2).
``sentence_bert_config.json`` holds the maximum sequence length the library truncates to
(all-MiniLM-L6-v2: 256, below its 512 position embeddings; sentence-transformers 6 keeps it as
the tokenizer's ``model_max_length``).

``read_sentence_config(directory)`` returns a ``SentenceEmbeddingConfig`` for such a directory,
None for a plain Hugging Face directory (no ``modules.json``), and raises
``UnsupportedSentenceModelError`` naming what is supported for anything else: other modules
(``Dense``, ``LayerNorm``, ``StaticEmbedding``, routers, …), other pooling modes (max, lasttoken,
mean_sqrt_len, weightedmean) or several at once, prompt-excluding pooling. The
sentence-transformers package is not needed (nor imported).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .engine.spec import UnsupportedModelError

MODULES_FILE = "modules.json"
SENTENCE_BERT_CONFIG = "sentence_bert_config.json"

# Pooling modes this project explains, and every mode sentence-transformers' Pooling knows
# (the boolean key of each in the config that versions before 6 save), so an unsupported one is
# named, not misread.
SUPPORTED_POOLING = ("mean", "cls")
POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
# sentence-transformers' other spellings of a mode in ``pooling_mode`` (the key its version 6
# saves, a name or a list of names, instead of the booleans above).
_POOLING_ALIASES = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max",
                    "mean_sqrt_len_tokens": "mean_sqrt_len", "weightedmean_tokens": "weightedmean"}
SUPPORTED_PIPELINE = "Transformer → Pooling (mean or cls) → optional Normalize"


class UnsupportedSentenceModelError(UnsupportedModelError):
    """A sentence-transformers directory whose modules or pooling are not supported."""


class SentenceEmbeddingConfig(BaseModel):
    """How a sentence-transformers model turns last hidden states into one text embedding."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pooling: Literal["mean", "cls"] = Field(
        description="mean: average over the text's tokens (attention mask); cls: the first token")
    normalize: bool = Field(description="L2-normalise the pooled vector (a Normalize module)")
    max_seq_length: int | None = Field(
        default=None, ge=1, description="sentence-transformers truncates longer inputs "
        "(sentence_bert_config.json); None when the directory does not say")
    dimension: int | None = Field(
        default=None, ge=1, description="the pooled vector's size (word_embedding_dimension)")


def read_sentence_config(directory: str | Path) -> SentenceEmbeddingConfig | None:
    """The sentence-embedding pipeline of ``directory``; None without ``modules.json``."""
    root = Path(directory)
    modules_path = root / MODULES_FILE
    if not modules_path.is_file():
        return None
    modules = _read_json(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise UnsupportedSentenceModelError(f"{modules_path}: expected a list of modules")
    modules = sorted(modules, key=lambda m: int(m.get("idx", 0)))
    kinds = [_module_kind(modules_path, m) for m in modules]

    if kinds[:2] != ["Transformer", "Pooling"] or kinds[2:] not in ([], ["Normalize"]):
        raise UnsupportedSentenceModelError(
            f"{modules_path}: modules {' → '.join(kinds) or '(none)'} are not supported; "
            f"supported: {SUPPORTED_PIPELINE}")
    transformer, pooling_module = modules[0], modules[1]
    if str(transformer.get("path", "")).strip("./") != "":
        raise UnsupportedSentenceModelError(
            f"{modules_path}: the Transformer module lives in {transformer['path']!r}; supported "
            "is only the Hugging Face model in the directory itself (path \"\")")

    pooling_config_path = root / str(pooling_module.get("path", "")) / "config.json"
    if not pooling_config_path.is_file():
        raise UnsupportedSentenceModelError(f"{pooling_config_path} (the Pooling module's "
                                            "config) is missing")
    pooling_config = _read_json(pooling_config_path)
    if not isinstance(pooling_config, dict):
        raise UnsupportedSentenceModelError(f"{pooling_config_path}: expected an object")
    pooling = _pooling_mode(pooling_config_path, pooling_config)
    if pooling_config.get("include_prompt", True) is False:
        raise UnsupportedSentenceModelError(
            f"{pooling_config_path}: pooling that leaves out the prompt's tokens "
            "(include_prompt: false) is not supported")

    return SentenceEmbeddingConfig(
        pooling=pooling, normalize=kinds[2:] == ["Normalize"], max_seq_length=_max_seq_length(root),
        dimension=pooling_config.get("word_embedding_dimension",
                                     pooling_config.get("embedding_dimension")),
    )


def _max_seq_length(root: Path) -> int | None:
    """sentence_bert_config.json's ``max_seq_length`` (sentence-transformers < 6), else the
    tokenizer's ``model_max_length``, where version 6 keeps it (a huge value there means unset)."""
    for name, key in ((SENTENCE_BERT_CONFIG, "max_seq_length"),
                      ("tokenizer_config.json", "model_max_length")):
        if (path := root / name).is_file():
            config = _read_json(path)
            value = config.get(key) if isinstance(config, dict) else None
            if isinstance(value, (int, float)) and 0 < value < 1e9:
                return int(value)
    return None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UnsupportedSentenceModelError(f"{path}: not readable JSON ({error})") from error


def _module_kind(modules_path: Path, module: dict) -> str:
    """``sentence_transformers.models.Pooling`` → ``Pooling``; anything not from
    sentence-transformers keeps its full name (and is then unsupported)."""
    kind = str(module.get("type", ""))
    if kind.startswith("sentence_transformers.") and kind.rsplit(".", 1)[-1] in (
        "Transformer", "Pooling", "Normalize"
    ):
        return kind.rsplit(".", 1)[-1]
    if not kind:
        raise UnsupportedSentenceModelError(f"{modules_path}: a module without a type: {module}")
    return kind


def _pooling_mode(path: Path, config: dict) -> Literal["mean", "cls"]:
    if (spelled := config.get("pooling_mode")) is not None:  # sentence-transformers >= 6
        spelled = [spelled] if isinstance(spelled, str) else list(spelled)
        modes = [_POOLING_ALIASES.get(str(mode), str(mode)) for mode in spelled]
    else:
        unknown = sorted(key for key, value in config.items()
                         if key.startswith("pooling_mode_") and value
                         and key not in POOLING_KEYS.values())
        if unknown:
            raise UnsupportedSentenceModelError(
                f"{path}: unknown pooling {', '.join(unknown)}; supported: "
                f"{', '.join(SUPPORTED_POOLING)}")
        modes = [mode for mode, key in POOLING_KEYS.items() if config.get(key)]
    if len(modes) != 1:
        raise UnsupportedSentenceModelError(
            f"{path}: pooling modes {modes or '(none)'}; exactly one of "
            f"{', '.join(SUPPORTED_POOLING)} is supported (several are concatenated)")
    if modes[0] not in SUPPORTED_POOLING:
        raise UnsupportedSentenceModelError(
            f"{path}: {modes[0]} pooling is not supported; supported: "
            f"{', '.join(SUPPORTED_POOLING)}")
    return modes[0]  # type: ignore[return-value]
