#!/usr/bin/env python3
"""Rebuild the two shipped task files from Debian packages (run once by a maintainer).

The benchmark never runs this: it reads the JSONL files written here, which are committed.
To rebuild (Debian bookworm; any mirror the machine's apt is set up for)::

    mkdir -p /tmp/debs && cd /tmp/debs
    apt-get download fortunes bsdgames
    for f in *.deb; do dpkg -x "$f" ex; done
    python references/faithfulness/data/build_data.py --root /tmp/debs/ex

Sources and licences: see SOURCES.md beside this file.

* ``nexttoken.jsonl``: prose entries of the BSD fortune database (Debian package
  ``fortunes`` 1:1.99.1-7.3, ``/usr/share/games/fortunes/{FILES}``), attribution lines
  ("-- Author") removed, whitespace collapsed, only entries of at least MIN_WORDS words.
* ``quiz.jsonl``: four-way multiple-choice questions made from the answer files of BSD
  ``quiz(6)`` (Debian package ``bsdgames`` 2.17-29, ``/usr/share/games/bsdgames/quiz/``):
  capitals of Europe, Asia, Africa, the Americas and the US states, and chemical element
  names by symbol. The three distractors come from the same file (seeded).

Each item gets a fixed ``split`` ("dev" or "test", half each, seeded shuffle), so the split
never depends on the model or the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
SEED = 20240611
FORTUNE_FILES = ["literature", "wisdom", "science", "education", "art", "work", "people"]
MIN_WORDS = 45
# entries left out of the natural-text task for their language (the fortune files are uncensored)
BLOCKLIST = re.compile(r"fuck|shit|nigg|rape|sex|whore|bitch|cunt|penis|breast", re.I)
QUIZ_FILES = {
    "europe": "What is the capital of {}?",
    "asia": "What is the capital of {}?",
    "africa": "What is the capital of {}?",
    "america": "What is the capital of {}?",
    "state": "What is the capital of the US state of {}?",
    "elements": "Which chemical element has the symbol {}?",
}


def fortune_entries(path: Path) -> list[str]:
    text = path.read_text(encoding="latin-1")
    entries = []
    for raw in text.split("\n%\n"):
        lines = [line for line in raw.splitlines() if not line.strip().startswith("--")]
        body = " ".join(" ".join(lines).split())
        if not body or not body.isascii():
            continue
        entries.append(body)
    return entries


def _first_alternative(pattern: str) -> str:
    """quiz(6) patterns: a|b alternatives, {optional}, [a|b] groups; keep the fullest first form."""
    out, depth, start, parts = [], 0, 0, []
    # split the top level on '|'
    for index, char in enumerate(pattern):
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif char == "|" and depth == 0:
            parts.append(pattern[start:index])
            start = index + 1
    parts.append(pattern[start:])
    first = parts[0]
    index = 0
    while index < len(first):
        char = first[index]
        if char in "{[":
            close = "}" if char == "{" else "]"
            depth, end = 1, index + 1
            while depth:
                if first[end] in "{[":
                    depth += 1
                elif first[end] in "}]":
                    depth -= 1
                end += 1
            out.append(_first_alternative(first[index + 1 : end - 1]))
            index = end
        else:
            out.append(char)
            index += 1
    text = re.sub(r".\x08", "", "".join(out))  # overstruck accents: x<BS>y -> y
    return text.replace("\\", "").strip()


def quiz_pairs(path: Path, name: str) -> list[tuple[str, str]]:
    pairs = []
    for line in path.read_text(encoding="latin-1").splitlines():
        fields = line.split(":")
        if len(fields) < 2:
            continue
        if name == "elements":  # symbol:number:weight:element
            key, answer = _first_alternative(fields[0]), _first_alternative(fields[3])
        else:
            key, answer = _first_alternative(fields[0]), _first_alternative(fields[1])
        if key and answer and answer.lower() not in ("gok", "none") and key.isascii() and answer.isascii():
            pairs.append((key, answer))
    return pairs


def build(root: Path) -> None:
    rng = random.Random(SEED)
    fortunes_dir = root / "usr/share/games/fortunes"
    items = []
    for name in FORTUNE_FILES:
        for body in fortune_entries(fortunes_dir / name):
            if len(body.split()) >= MIN_WORDS and not BLOCKLIST.search(body):
                items.append({"source": f"fortunes:{name}", "text": body})
    rng.shuffle(items)
    for index, item in enumerate(items):
        item["id"] = f"nt{index:04d}"
        item["split"] = "dev" if index % 2 == 0 else "test"
    with open(HERE / "nexttoken.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    print(f"nexttoken.jsonl: {len(items)} items")

    quiz_dir = root / "usr/share/games/bsdgames/quiz"
    questions = []
    for name, template in QUIZ_FILES.items():
        pairs = quiz_pairs(quiz_dir / name, name)
        answers = sorted({answer for _, answer in pairs})
        for key, answer in pairs:
            distractors = rng.sample([a for a in answers if a != answer], 3)
            choices = distractors + [answer]
            rng.shuffle(choices)
            questions.append({"source": f"bsdgames-quiz:{name}", "question": template.format(key),
                              "choices": choices, "answer": choices.index(answer)})
    rng.shuffle(questions)
    for index, item in enumerate(questions):
        item["id"] = f"qz{index:04d}"
        item["split"] = "dev" if index % 2 == 0 else "test"
    with open(HERE / "quiz.jsonl", "w") as f:
        for item in questions:
            f.write(json.dumps(item) + "\n")
    print(f"quiz.jsonl: {len(questions)} items")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="folder the .deb files were unpacked into")
    build(parser.parse_args().root)
