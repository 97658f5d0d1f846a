"""The vLLM internals the plugin relies on (``vllm_pelrp/serving/vllm_support.py``'s
``INTERNALS``), checked against other vLLM releases' sources: their sdists from PyPI.

    .venv/bin/python bench/vllm_internals.py                      # the newest 0.33.x and 0.34.x
    .venv/bin/python bench/vllm_internals.py --versions 0.32.0 0.34.0 --installed

Each sdist is downloaded once (checked against PyPI's sha256) into ``--cache`` and only its
``vllm/**.py`` files are unpacked, into a temporary folder. The check is static
(``vllm_support.check_source``: the module file exists, the class or function is defined, the
member is in the class or a base, the function's first parameters). Prints a table, internal ×
version → ok / what is missing; ``--json`` writes the same. Not run in CI (it downloads ~50 MB per
version); ``tests/test_vllm_support.py`` runs the same check on the installed vLLM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packaging.version import Version  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from vllm_pelrp.serving.vllm_support import INTERNALS, SUPPORTED, check_source  # noqa: E402

PYPI = "https://pypi.org/pypi/vllm/json"


def newest(releases: dict, prefix: str) -> str:
    """The newest final release whose version starts with ``prefix`` (``0.34`` → ``0.34.2``)."""
    found = [v for v in releases if (v == prefix or v.startswith(prefix + "."))
             and not Version(v).is_prerelease and any(f["packagetype"] == "sdist"
                                                      for f in releases[v])]
    if not found:
        raise SystemExit(f"PyPI has no vllm {prefix}.x sdist")
    return max(found, key=Version)


def sdist(releases: dict, version: str, cache: Path) -> Path:
    """vllm-<version>.tar.gz in ``cache``, downloaded from PyPI where missing."""
    files = [f for f in releases.get(version, []) if f["packagetype"] == "sdist"]
    if not files:
        raise SystemExit(f"PyPI has no sdist of vllm {version}")
    info = files[0]
    path = cache / info["filename"]
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != \
            info["digests"]["sha256"]:
        url = urljoin(PYPI, info["url"])  # a mirror may answer with relative addresses
        print(f"downloading {info['filename']} ({info['size'] / 2**20:.0f} MiB)", file=sys.stderr)
        with urllib.request.urlopen(url, timeout=300) as response:
            data = response.read()
        if hashlib.sha256(data).hexdigest() != info["digests"]["sha256"]:
            raise SystemExit(f"{info['filename']}: sha256 differs from PyPI's")
        path.write_bytes(data)
    return path


def unpack(archive: Path, into: Path) -> Path:
    """The sdist's ``vllm/**.py`` under ``into``; returns the folder holding ``vllm/``."""
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".py")
                   and m.name.split("/")[1:2] == ["vllm"]]
        tar.extractall(into, members=members, filter="data")
    return into / members[0].name.split("/")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", nargs="+", default=["0.33", "0.34"],
                        help="releases (0.34: the newest 0.34.x; 0.34.0: that one)")
    parser.add_argument("--installed", action="store_true",
                        help="add a column for the installed vLLM's sources")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) /
                        "vllm-sdists", help="where the sdists are kept between runs")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--only-missing", action="store_true",
                        help="list only the internals missing from some version")
    args = parser.parse_args()

    columns: dict[str, dict[str, str | None]] = {}
    if args.installed:
        import vllm

        columns[f"installed {vllm.__version__}"] = check_source(Path(vllm.__file__).parents[1])
    try:
        with urllib.request.urlopen(PYPI, timeout=60) as response:
            releases = json.load(response)["releases"]
    except OSError as error:
        raise SystemExit(f"PyPI cannot be reached ({error}): this check needs the sdists; "
                         "put vllm-<version>.tar.gz files into --cache by other means") from None
    args.cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for wanted in args.versions:
            version = wanted if wanted.count(".") >= 2 else newest(releases, wanted)
            root = unpack(sdist(releases, version, args.cache), Path(tmp) / version)
            columns[version] = check_source(root)

    table = Table(title=f"vLLM internals used by vllm-pelrp (supported: vllm{SUPPORTED})")
    table.add_column("internal")
    table.add_column("checked")
    for name in columns:
        table.add_column(name)
    for internal in INTERNALS:
        if args.only_missing and all(columns[c][internal.path] is None for c in columns):
            continue
        cells = [("[green]ok[/]" if columns[c][internal.path] is None else
                  f"[red]missing[/]: {columns[c][internal.path]}") for c in columns]
        table.add_row(internal.path, internal.checked + (" (cpu)" if internal.cpu_only else ""),
                      *cells)
    console = Console(width=200)
    console.print(table)
    for name, results in columns.items():
        missing = sum(why is not None for why in results.values())
        console.print(f"{name}: {len(results) - missing}/{len(results)} present")
    if args.json:
        args.json.write_text(json.dumps(columns, indent=1) + "\n")


if __name__ == "__main__":
    main()
