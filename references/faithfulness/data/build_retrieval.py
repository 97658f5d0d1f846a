#!/usr/bin/env python3
"""Rebuild ``retrieval.jsonl`` (the retrieval task's query–document pairs) from a Debian
system's package database (run once by a maintainer; the benchmark reads the committed file).

    python references/faithfulness/data/build_retrieval.py              # /var/lib/dpkg/status
    python references/faithfulness/data/build_retrieval.py --status FILE --doc-root /usr/share/doc

Source: the ``Description`` field of the installed packages (``/var/lib/dpkg/status``; the
same text ``dpkg-query -W -f='${Description}'`` prints). A description is a synopsis line (the
"short description") and an extended description (the "long description"). Construction,
deterministic (no model, no tokenizer involved):

* one binary package per source package (the one named like its source if installed, else
  the alphabetically first), so that library/-dev/-common siblings with near-identical text
  do not repeat;
* the **document** is the long description: paragraph separators (" .") dropped, list
  bullets kept as text, whitespace collapsed; then whole sentences up to ``MAX_WORDS`` words
  (a first sentence longer than that is cut at ``MAX_WORDS`` words); only documents of at
  least ``MIN_WORDS`` words, ASCII only; identical documents (first 120 characters) are kept
  once;
* the **query** is the synopsis, as it is (a trailing full stop dropped), put into one fixed
  template, ``QUERY_TEMPLATE`` ("Which package provides <synopsis>?"); pairs whose long
  description contains the synopsis verbatim (case and whitespace ignored) are left out, so
  the query never copies the document;
* ``license``: the licence of the package's ``debian/*`` files (where the description is
  written) from ``/usr/share/doc/<package>/copyright`` when it is machine-readable (DEP-5),
  else of its ``Files: *`` stanza, else null ("see the copyright file");
* ``split``: a seeded shuffle of the pairs, then 2 of every 5 to dev and 3 to test.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
SEED = 20240611
MIN_WORDS = 20
MAX_WORDS = 60
MAX_ITEMS = 180  # keeps the file under 100 KB
QUERY_TEMPLATE = "Which package provides {}?"


def read_status(path: Path) -> list[dict[str, str]]:
    """Stanzas of a dpkg status file (RFC 822 style, continuation lines kept with their '\\n')."""
    packages = []
    for stanza in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") and key is not None:
                fields[key] += "\n" + line
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if "Package" in fields and "installed" in fields.get("Status", "").split():
            packages.append(fields)
    return packages


def one_per_source(packages: list[dict[str, str]]) -> list[dict[str, str]]:
    by_source: dict[str, list[dict[str, str]]] = {}
    for p in packages:
        source = p.get("Source", p["Package"]).split()[0]
        by_source.setdefault(source, []).append(p)
    chosen = []
    for source in sorted(by_source):
        group = sorted(by_source[source], key=lambda p: p["Package"])
        named = [p for p in group if p["Package"] == source]
        chosen.append((named or group)[0] | {"_source": source})
    return chosen


def long_description(description: str) -> str:
    lines = description.split("\n")[1:]
    return " ".join(" ".join(line.strip() for line in lines if line.strip() != ".").split())


def sentences_up_to(text: str, max_words: int) -> str:
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z(\"'])", text)
    out: list[str] = []
    count = 0
    for sentence in sentences:
        words = sentence.split()
        if count + len(words) > max_words:
            if not out:  # a first sentence longer than the budget: cut it
                out.append(" ".join(words[:max_words]))
            break
        out.append(sentence)
        count += len(words)
    return " ".join(out)


def query_of(synopsis: str) -> str:
    return QUERY_TEMPLATE.format(synopsis.strip().rstrip("."))


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def license_of(doc_root: Path, package: str) -> str | None:
    """The licence of the debian/* stanza of a DEP-5 copyright file, else of Files: *."""
    path = doc_root / package / "copyright"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    if not text.startswith("Format:"):
        return None
    found: dict[str, str] = {}
    for stanza in re.split(r"\n\s*\n", text):
        files = re.search(r"^Files:\s*(.+(?:\n[ \t].+)*)", stanza, re.M)
        licence = re.search(r"^License:\s*(\S.*)$", stanza, re.M)
        if files and licence:
            for pattern in files.group(1).split():
                found.setdefault(pattern, licence.group(1).strip())
    return found.get("debian/*") or found.get("*")


def build(status: Path, doc_root: Path, out: Path, max_items: int) -> list[dict]:
    items = []
    seen: set[str] = set()
    for p in one_per_source(read_status(status)):
        description = p.get("Description", "")
        synopsis = description.split("\n")[0].strip()
        body = long_description(description)
        if not synopsis or not body.isascii() or not synopsis.isascii():
            continue
        document = sentences_up_to(body, MAX_WORDS)
        if len(document.split()) < MIN_WORDS or _norm(synopsis) in _norm(body):
            continue
        key = _norm(document)[:120]
        if key in seen:
            continue
        seen.add(key)
        items.append({"package": p["Package"], "source": p["_source"],
                      "version": p.get("Version", ""),
                      "license": license_of(doc_root, p["Package"]),
                      "query": query_of(synopsis), "document": document})
    rng = random.Random(SEED)
    rng.shuffle(items)
    items = items[:max_items]
    for index, item in enumerate(items):
        item["id"] = f"rt{index:04d}"
        item["split"] = "dev" if index % 5 in (0, 2) else "test"
    with open(out, "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return items


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--status", type=Path, default=Path("/var/lib/dpkg/status"))
    parser.add_argument("--doc-root", type=Path, default=Path("/usr/share/doc"))
    parser.add_argument("--out", type=Path, default=HERE / "retrieval.jsonl")
    parser.add_argument("--max-items", type=int, default=MAX_ITEMS)
    args = parser.parse_args()
    built = build(args.status, args.doc_root, args.out, args.max_items)
    print(f"{args.out}: {len(built)} items "
          f"({sum(i['split'] == 'dev' for i in built)} dev, {sum(i['split'] == 'test' for i in built)} test)")
