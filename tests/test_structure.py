"""The house rules that hold the code together, checked on the source: no import cycles among the
package's modules (lazy imports included), one settings registry that alone touches the
environment, the docs' settings table generated from it, one model table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from vllm_pelrp import settings

ROOT = Path(__file__).resolve().parents[1]
# the import name of each source folder (kernels/ ships as vllm_pelrp.kernels)
PACKAGES = {ROOT / "vllm_pelrp": "vllm_pelrp", ROOT / "kernels": "vllm_pelrp.kernels"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (never run, so no edge)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skipped.update(id(n) for n in ast.walk(inner))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports, anywhere in its body (function-level imports
    included; ``from . import x`` counts the submodule x, not the package)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_only(tree)
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                submodules = [f"{target}.{a.name}" for a in node.names
                              if f"{target}.{a.name}" in modules]
                edges.update(submodules)
                if len(submodules) < len(node.names) and target in modules:
                    edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_function_level_imports_and_skips_type_checking_ones(tmp_path):
    graph = import_graph()
    # assemble imports grounding at module level, the CLI imports the explainer lazily
    assert "vllm_pelrp.grounding" in graph["vllm_pelrp.assemble"]
    assert "vllm_pelrp.explainer" in graph["vllm_pelrp.cli"]
    assert "vllm_pelrp.settings" in graph["vllm_pelrp.kernels.rope_lrp"]


def test_no_import_cycles_among_the_package_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (lazy imports included): " + "; ".join(
        " <-> ".join(component) for component in found)


ENVIRONMENT_ACCESS = re.compile(r"\bos\.(environ|getenv|putenv|unsetenv)\b|\bfrom os import\b")


def test_only_the_settings_module_touches_the_environment():
    touching = sorted(
        str(path.relative_to(ROOT)) for path in _modules().values()
        if path.name != "settings.py" and ENVIRONMENT_ACCESS.search(path.read_text()))
    assert touching == [], f"modules reading or setting the environment outside settings.py: " \
                           f"{touching}"


def test_every_project_variable_has_the_prefix_or_is_an_old_name_or_someone_elses():
    for setting in settings.SETTINGS.values():
        if setting.owner == "pelrp":
            assert setting.name.startswith(settings.PREFIX), setting.name
        else:
            assert not setting.name.startswith(settings.PREFIX), setting.name
        assert setting.doc and setting.parse.__name__ != "<lambda>", setting.name


def test_every_variable_named_in_the_package_source_is_registered():
    named = set()
    for path in _modules().values():
        named.update(re.findall(r"[\"'`]((?:VLLM_PELRP|PELRP)_[A-Z0-9_]+)[\"'`]",
                                path.read_text()))
    unknown = {n for n in named if n not in settings.SETTINGS and n not in settings.OLD_NAMES
               and n not in settings.REPLACED_NAMES and n != settings.PREFIX}
    assert not unknown, f"variables named in the package but not in vllm_pelrp/settings.py: " \
                        f"{sorted(unknown)}"


def test_the_docs_settings_table_is_the_registry():
    text = (ROOT / "docs" / "serving.md").read_text()
    match = re.search(r"<!-- settings-table:[^>]*-->\n(.*?)\n<!-- /settings-table -->", text,
                      re.S)
    assert match, "docs/serving.md has no generated settings table"
    assert match.group(1) == settings.markdown_table(), (
        "docs/serving.md's settings table differs from vllm_pelrp.settings.markdown_table(): "
        "paste its output between the settings-table comments")


def test_old_names_still_work_for_one_release_with_a_warning(monkeypatch):
    monkeypatch.delenv("VLLM_PELRP_RECENT_MB", raising=False)
    monkeypatch.setenv("PELRP_RECENT_MB", "1.5")
    with pytest.warns(DeprecationWarning, match="PELRP_RECENT_MB is deprecated.*"
                                                "set VLLM_PELRP_RECENT_MB instead"):
        assert settings.get("VLLM_PELRP_RECENT_MB") == 1.5
    monkeypatch.setenv("VLLM_PELRP_RECENT_MB", "2")  # the new name wins, silently
    assert settings.get("VLLM_PELRP_RECENT_MB") == 2.0
    monkeypatch.setenv("PELRP_GROUNDING_THRESHOLD", "2")  # old names are parsed as strictly
    monkeypatch.delenv("VLLM_PELRP_GROUNDING_THRESHOLD", raising=False)
    with pytest.warns(DeprecationWarning), pytest.raises(
            ValueError, match="PELRP_GROUNDING_THRESHOLD='2': expected a number from 0 to 1"):
        settings.get("VLLM_PELRP_GROUNDING_THRESHOLD")


def test_settings_are_parsed_strictly_and_children_get_checked_values(monkeypatch):
    monkeypatch.setenv("VLLM_PELRP_SPARE_CORES", " Off ")
    assert settings.get("VLLM_PELRP_SPARE_CORES") is False
    assert settings.VLLM_PELRP_SPARE_CORES is False  # attribute access, as vllm.envs
    monkeypatch.setenv("VLLM_PELRP_SPARE_CORES", "nope")
    with pytest.raises(ValueError, match="VLLM_PELRP_SPARE_CORES='nope' is not an on/off"):
        settings.get("VLLM_PELRP_SPARE_CORES")
    monkeypatch.setenv("VLLM_PELRP_SPARE_CORES", "")
    assert settings.get("VLLM_PELRP_SPARE_CORES") is True  # empty = the default
    with pytest.raises(KeyError, match="NOT_A_SETTING is not a registered setting"):
        settings.get("NOT_A_SETTING")
    child = settings.environment(VLLM_PELRP_SPARE_CORES=False, VLLM_PLUGINS=["a", "pelrp"],
                                 VLLM_PELRP_CACHE=None)
    assert child["VLLM_PELRP_SPARE_CORES"] == "0" and child["VLLM_PLUGINS"] == "a,pelrp"
    with pytest.raises(ValueError, match="VLLM_PELRP_RECENT_EXPLANATIONS='1.5' is out of range"):
        settings.environment(VLLM_PELRP_RECENT_EXPLANATIONS=1.5)
    # a setting whose meaning changed under a new name: the old name is refused, not translated
    monkeypatch.setenv("VLLM_PELRP_MAX_EXPLAIN_COST", "65536")
    with pytest.raises(ValueError, match="VLLM_PELRP_MAX_EXPLAIN_COST is no longer read.*"
                                         "VLLM_PELRP_MAX_EXPLAIN_GFLOP"):
        settings.get("VLLM_PELRP_MAX_EXPLAIN_GFLOP")


def test_one_model_table_the_rest_derived_from_the_model_files():
    import importlib

    from vllm_pelrp import models

    source = (ROOT / "vllm_pelrp" / "models" / "__init__.py").read_text()
    for name in models.SUPPORTED_ARCHITECTURES:  # no architecture name is written there twice
        assert f'"{name}"' not in source, name
    for file in models.MODEL_FILES:
        module = importlib.import_module(f"vllm_pelrp.models.{file}")
        declared = getattr(module, "ARCHITECTURES", None) or {
            n: module.ARCHITECTURE for n in module.ARCHITECTURE.names}
        for name, arch in declared.items():
            assert models.architecture(name) is arch
            assert set(arch.model_types.values()) <= set(arch.names), name
    assert models.DECODER_ARCHITECTURES == ("LlamaForCausalLM", "MistralForCausalLM",
                                            "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                            "Gemma3ForCausalLM", "Phi3ForCausalLM",
                                            "Qwen3MoeForCausalLM", "MixtralForCausalLM")
    assert models.MODEL_TYPES["gemma3_text"] == "Gemma3ForCausalLM"
    assert models.MODEL_TYPES["xlm-roberta"] == "XLMRobertaModel"
