"""What the tests measure against lives in references/, apart from the benchmarks, so that a
change to a benchmark cannot break CI: no module under tests/ or references/ imports bench
(at the top or inside a function), and no script there runs a file under bench/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_nothing_the_tests_use_imports_bench():
    files = sorted([*ROOT.joinpath("tests").rglob("*.py"), *ROOT.joinpath("references").rglob("*.py")])
    assert any(f.parent.name == "references" for f in files)  # the folder is where it should be
    offenders = {str(f.relative_to(ROOT)): name for f in files for name in _imports(f)
                 if name == "bench" or name.startswith("bench.")}
    assert not offenders, offenders


def _code_strings(path: Path) -> list[str]:
    """String constants in code (docstrings and comments left out)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
                  and isinstance(node.value, ast.Constant)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_test_runs_a_file_under_bench():
    """A path into bench/ built in code (``ROOT / "bench" / ...``) or a ``-m bench...``."""
    files = sorted([*ROOT.joinpath("tests").rglob("*.py"), *ROOT.joinpath("references").rglob("*.py")])
    offenders = {str(f.relative_to(ROOT)): s for f in files if f != Path(__file__).resolve()
                 for s in _code_strings(f) if s == "bench" or s.startswith(("bench/", "bench."))}
    assert not offenders, offenders
    for script in (ROOT / "scripts" / "test.sh", *ROOT.joinpath("references").glob("*.sh")):
        commands = [line for line in script.read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
        assert not [line for line in commands if "bench/" in line or "bench." in line], script
