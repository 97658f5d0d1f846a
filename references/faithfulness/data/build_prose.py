"""Build ``prose.jsonl``: passages of technical prose from the GNU Info manuals of this Debian 12
system (``/usr/share/info``), for next-token prediction at 128 and 512 tokens.

    python references/faithfulness/data/build_prose.py            # rewrites prose.jsonl

Deterministic (fixed seed, sorted inputs). Rules:

* Every ``*.info*.gz`` in ``/usr/share/info`` is read; split files (``find.info-1.gz``, …)
  belong to their manual. Manuals whose text states no licence are left out (see ``LICENCES``).
* An Info file is a list of nodes separated by ``\\x1f``. Index nodes, the licence appendix
  ("GNU Free Documentation License", "Copying", …) and the node header lines are dropped.
* A node's text is split into blocks at blank lines. A block is **prose** when it is no menu
  (``* ``), none of its lines is a heading underline, holds a run of 3 or more inner spaces
  (tables) or starts like a shell session or code (``$ ``, ``# ``, braces), it has at least 12
  words of which at least 75 % are plain words (letters, with punctuation around them: option
  lists and code fail this), and it is ASCII. A prose block's stripped lines are joined with
  single spaces; Info's cross-reference markup ``*note X::`` is kept as it reads.
* A passage is a run of consecutive prose blocks of one node, then the following nodes of the
  same manual, joined with a blank line, until it has at least ``MIN_WORDS`` words; it is then
  cut after the first sentence end past ``MIN_WORDS`` words (or kept whole). Passages do not
  overlap. At most ``PER_MANUAL`` passages per manual, spread evenly over the manual.
* A seeded shuffle, then alternately dev / test.

With ``MIN_WORDS`` = 420, at least 150 passages per split have 513 tokens or more under each
benchmark tokenizer (SmolLM2 and Gemma 3; the task skips shorter ones at run time); the
128-token task uses the same passages' first 128 tokens. The Python
documentation is deliberately not used (kept for an independent check).
"""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
from collections import defaultdict
from pathlib import Path

INFO = Path("/usr/share/info")
OUT = Path(__file__).parent / "prose.jsonl"
SEED = 16
MIN_WORDS = 420
PER_MANUAL = 80
# manual -> licence of its text, read from the manual's own copying notice (the first node)
LICENCES = {
    "coreutils": "GFDL-1.3+", "diffutils": "GFDL-1.3+", "ed": "GFDL-1.3+",
    "find": "GFDL-1.3+", "find-maint": "GFDL-1.3+", "grep": "GFDL-1.3+", "gzip": "GFDL-1.3+",
    "libtasn1": "GFDL-1.3+", "rluserman": "GFDL-1.3+", "sed": "GFDL-1.3+", "time": "GFDL-1.3+",
    "wget": "GFDL-1.3+", "gettext": "GFDL-1.2+ or GPL-2+", "autosprintf": "GFDL-1.2+ or GPL-2+",
    "gnupg": "GPL-3+", "gpgrt": "GPL-2+",
    "nettle": "public domain (the manual's own statement)", "libffi": "Expat",
}
SKIP_NODES = re.compile(r"index|copying|free documentation license|gnu general public|"
                        r"^concept|^top$|history", re.I)


def manual_of(path: Path) -> str:
    return re.sub(r"\.info(-\d+)?\.gz$", "", path.name)


def package_of(path: Path) -> tuple[str, str]:
    owner = subprocess.run(["dpkg", "-S", str(path)], capture_output=True, text=True).stdout
    package = owner.split(":")[0].strip()
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True,
                             text=True).stdout.strip()
    return package, version


def node_texts(paths: list[Path]) -> list[tuple[str, str]]:
    """(node name, body) of every node in a manual's files, in order."""
    out = []
    for path in paths:
        text = gzip.open(path, "rt", encoding="utf-8", errors="replace").read()
        for chunk in text.split("\x1f")[1:]:
            lines = chunk.strip("\n").split("\n")
            header = lines[0] if lines else ""
            match = re.search(r"Node: ([^,\t]+)", header)
            if not match:
                continue
            out.append((match.group(1).strip(), "\n".join(lines[1:])))
    return out


def prose_blocks(body: str) -> list[str]:
    blocks = []
    for block in re.split(r"\n\s*\n", body):
        lines = [line.strip() for line in block.strip("\n").split("\n") if line.strip()]
        if not lines or lines[0].startswith(("* Menu", "* ")):
            continue
        if any(re.fullmatch(r"[=*\-.]{3,}", line) or re.search(r"\S {3,}\S", line)
               or line.startswith(("$ ", "# ", "{", "}")) for line in lines):
            continue  # headings, tables, shell sessions, code
        text = " ".join(lines)
        words = text.split()
        plain = [w for w in words if re.fullmatch(r"[(\"'`]?[A-Za-z][A-Za-z'-]*[.,;:!?)\"']*", w)]
        if len(words) < 12 or len(plain) < 0.75 * len(words) or not text.isascii():
            continue  # too short, mostly code or symbols, or not ASCII
        blocks.append(re.sub(r"\s+", " ", text))
    return blocks


def cut(text: str) -> str:
    """At the first sentence end after MIN_WORDS words."""
    words = 0
    for match in re.finditer(r"\S+", text):
        words += 1
        if words >= MIN_WORDS and re.search(r"[.!?]$", match.group(0)):
            return text[: match.end()]
    return text


def passages(nodes: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(first node, passage) runs of prose blocks with at least MIN_WORDS words."""
    out, current, first = [], [], None
    for name, body in nodes:
        if SKIP_NODES.search(name):
            current, first = [], None
            continue
        for block in prose_blocks(body):
            if first is None:
                first = name
            current.append(block)
            if sum(len(b.split()) for b in current) >= MIN_WORDS:
                out.append((first, cut("\n\n".join(current))))
                current, first = [], None
    return out


def main() -> None:
    manuals: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(INFO.glob("*.info*.gz")):
        manuals[manual_of(path)].append(path)
    items = []
    for manual in sorted(manuals):
        if manual not in LICENCES:
            continue
        paths = sorted(manuals[manual], key=lambda p: (len(p.name), p.name))
        package, version = package_of(paths[0])
        found = passages(node_texts(paths))
        if len(found) > PER_MANUAL:  # spread evenly over the manual
            step = len(found) / PER_MANUAL
            found = [found[int(i * step)] for i in range(PER_MANUAL)]
        for index, (node, text) in enumerate(found):
            items.append({"id": f"{manual}-{index:03d}", "source": f"{manual} Info manual, node "
                          f"\"{node}\"", "manual": manual, "package": package, "version": version,
                          "license": LICENCES[manual], "text": text})
    random.Random(SEED).shuffle(items)
    for index, item in enumerate(items):
        item["split"] = "dev" if index % 2 == 0 else "test"
    with open(OUT, "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    counts = defaultdict(int)
    for item in items:
        counts[item["manual"]] += 1
    print(f"{len(items)} passages -> {OUT}: {dict(sorted(counts.items()))}")


if __name__ == "__main__":
    main()
