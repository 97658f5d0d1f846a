#!/usr/bin/env python3
"""Build the shipped snapshot of Debian package descriptions (run once by a maintainer).

The benchmark never runs this: it reads ``packages.json`` written here, which is committed, so
every machine sees the same documents whatever it has installed. To rebuild on a Debian 12
("bookworm") system::

    python references/grounding/data/build_data.py                     # reads /var/lib/dpkg/status
    python references/grounding/data/build_data.py --status FILE       # any dpkg status file

Sources and licence: see SOURCES.md beside this file.

For every installed package of the status file the builder keeps the name, version, section,
synopsis (the first line of ``Description:``) and the extended description, reflowed to plain
paragraphs (Debian's " ." blank lines become newlines, list markers kept) and cut after the
first whole sentence that reaches MIN_WORDS words (at most MAX_WORDS).

Packages left out, so that each document describes one program in its own words:

* shared libraries, development files, documentation, data/common parts, language bindings
  (``lib*``, ``*-dev``, ``*-doc``, ``*-common``, ``*-data``, ``python3-*``, ``gir1.2-*``,
  ``fonts-*``, ``node-*``) and transitional or dummy packages (their descriptions are
  boilerplate shared by many packages);
* packages whose synopsis names the package itself (the question is made from the synopsis
  and must not give the answer away);
* packages whose extended description is shorter than MIN_WORDS words;
* duplicate synopses or descriptions (only the first such package, by name, is kept).

Each package gets a fixed ``split`` ("dev" or "test", seeded shuffle, alternate), so a case's
split never depends on the model or the tokenizer; a case's other documents are drawn from the
same split.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
SEED = 20261128
MIN_WORDS = 25
MAX_WORDS = 70
EXCLUDE_NAME = re.compile(r"^(lib|python3-|gir1\.2-|fonts-|node-)|-(dev|doc|common|data|bin|dbg)$")
EXCLUDE_SYNOPSIS = re.compile(r"transitional|dummy|metapackage|meta-package|\(data files\)", re.I)


def parse_status(text: str) -> list[dict[str, str]]:
    stanzas = []
    for block in text.strip().split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.split("\n"):
            if line[:1] in (" ", "\t") and key is not None:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields and "Description" in fields:
            stanzas.append(fields)
    return stanzas


def reflow(extended: str) -> str:
    """Debian's extended description -> paragraphs joined by newlines."""
    paragraphs, current = [], []
    for raw in extended.split("\n"):
        line = raw[1:] if raw.startswith(" ") else raw
        if line.strip() == ".":
            if current:
                paragraphs.append(" ".join(current))
            current = []
        elif line.startswith(" ") and line.strip()[:1] in "-*+o" and current:
            # a list item starts a new line (verbatim lines are indented)
            paragraphs.append(" ".join(current))
            current = [line.strip()]
        elif line.strip():
            current.append(" ".join(line.split()))
    if current:
        paragraphs.append(" ".join(current))
    return "\n".join(paragraphs)


def cut(text: str, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> str | None:
    """The text up to the first sentence end at or after ``min_words`` words (<= max_words)."""
    words = 0
    for match in re.finditer(r"\S+", text):
        words += 1
        token = match.group()
        if words >= min_words and re.search(r"[.!?]$", token) and not re.search(r"\b(e\.g|i\.e|etc|vs)\.$", token):
            return text[: match.end()]
        if words >= max_words:
            return None
    return None


def words_of(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9][a-z0-9+.-]*[a-z0-9+]|[a-z0-9]", text.lower()))


def build(status: Path) -> list[dict]:
    stanzas = parse_status(status.read_text(encoding="utf-8", errors="replace"))
    candidates = []
    for fields in stanzas:
        name = fields["Package"]
        if fields.get("Status", "install ok installed") != "install ok installed":
            continue
        synopsis, _, extended = fields["Description"].partition("\n")
        synopsis = synopsis.strip()
        if EXCLUDE_NAME.search(name) or EXCLUDE_SYNOPSIS.search(synopsis + " " + extended[:200]):
            continue
        text = cut(reflow(extended))
        if text is None or not text.isascii() or not synopsis.isascii():
            continue
        candidates.append({"name": name, "version": fields.get("Version", ""),
                           "section": fields.get("Section", ""), "synopsis": synopsis,
                           "description": text})
    kept, seen = [], set()
    for c in sorted(candidates, key=lambda c: c["name"]):
        if c["name"].lower() in words_of(c["synopsis"]):
            continue  # the synopsis names the package: the question would give the answer away
        key = (c["synopsis"].lower(), c["description"].lower())
        if key[0] in seen or key[1] in seen:
            continue
        seen.update(key)
        kept.append(c)
    rng = random.Random(SEED)
    rng.shuffle(kept)
    for index, item in enumerate(kept):
        item["split"] = "dev" if index % 2 == 0 else "test"
    return sorted(kept, key=lambda c: c["name"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--status", type=Path, default=Path("/var/lib/dpkg/status"),
                        help="dpkg status file (default: this machine's)")
    parser.add_argument("--out", type=Path, default=HERE / "packages.json")
    args = parser.parse_args()
    items = build(args.status)
    args.out.write_text(json.dumps({"source": str(args.status), "seed": SEED,
                                    "packages": items}, indent=1) + "\n")
    counts = {s: sum(i["split"] == s for i in items) for s in ("dev", "test")}
    print(f"{args.out}: {len(items)} packages ({counts['dev']} dev / {counts['test']} test)")


if __name__ == "__main__":
    main()
