"""Cases of the grounding benchmark: several Debian package descriptions and one question.

A case holds ``DOCUMENTS_PER_CASE`` documents (default 4), each a package description from the
shipped snapshot (data/packages.json, see data/SOURCES.md)::

    Package: curl
    curl is a command line tool for transferring data with URL syntax, supporting DICT, ...

and a question made from the synopsis (the first line of ``Description:``) of exactly one of
them, the *gold* package::

    Which package is described as "command line tool for transferring data with URL syntax"?
    Answer with the package name only.

The answer (the gold package's name) is in exactly one document: the gold one. The other
documents are drawn (seeded) from the same split and must not be confusable with it: their
synopses share no content word with the gold synopsis, their names do not start like the gold
name (no "gnupg" beside "gnupg-utils"), the gold name is not a word of any of them, and no
document's name is a word of the question. The gold document's position is drawn uniformly, so
a method that prefers a position scores 1/DOCUMENTS_PER_CASE on top-1 accuracy.

The prompt is the library's documented template (``vllm_pelrp.grounding.render_documents``:
instruction, numbered documents, question) as the single user message of the model's chat
template. Removing a source means rendering the prompt without that document (the others keep
their text and order, and are renumbered), for every method alike.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
DOCUMENTS_PER_CASE = 4
SEED = 7
QUESTION_TEMPLATES = {
    "described": 'Which package is described as "{synopsis}"? Answer with the package name only.',
    "provides": "Which package provides: {synopsis}? Answer with the package name only.",
}
DEFAULT_QUESTION = "provides"  # chosen on dev (docs/grounding-benchmark.md)
STOPWORDS = set("""a an and the of for to in on with by from or as is are be that this it its
at into using based over via not no all any other some simple basic small""".split())


@dataclass
class Case:
    case_id: str
    split: str
    question: str
    documents: list[str]
    names: list[str]  # package name of each document
    gold: int  # index of the document holding the answer
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def gold_name(self) -> str:
        return self.names[self.gold]


def load_packages() -> list[dict]:
    return json.loads((DATA / "packages.json").read_text())["packages"]


def document_text(package: dict) -> str:
    return f"Package: {package['name']}\n{package['description']}"


def words(text: str) -> set[str]:
    """Lower-case words; package names keep their inner '-', '+' and '.'."""
    return set(re.findall(r"[a-z0-9][a-z0-9+.-]*[a-z0-9+]|[a-z0-9]", text.lower()))


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if len(w) >= 3 and w not in STOPWORDS}


def name_position(answer: str, name: str) -> int | None:
    """Where ``answer`` first names package ``name`` (a whole word, case-insensitive), or None."""
    match = re.search(rf"(?<![a-z0-9+.-]){re.escape(name.lower())}(?![a-z0-9+-])", answer.lower())
    return None if match is None else match.start()


def names_answer(answer: str, name: str) -> bool:
    """Whether ``answer`` names package ``name``."""
    return name_position(answer, name) is not None


def compatible(gold: dict, other: dict, question: str) -> bool:
    if other["name"] == gold["name"]:
        return False
    if content_words(gold["synopsis"]) & content_words(other["synopsis"]):
        return False
    if other["name"][:3] == gold["name"][:3]:
        return False
    if gold["name"].lower() in words(document_text(other)):
        return False
    return other["name"].lower() not in words(question)


def load_cases(split: str, count: int | None = None, question: str = DEFAULT_QUESTION,
               documents: int = DOCUMENTS_PER_CASE) -> list[Case]:
    """One case per package of ``split`` (file order), the first ``count`` of them."""
    if split not in ("dev", "test"):
        raise ValueError(f"unknown split {split!r}; allowed: dev, test")
    if question not in QUESTION_TEMPLATES:
        raise ValueError(f"unknown question template {question!r}; allowed: "
                         + ", ".join(QUESTION_TEMPLATES))
    pool = [p for p in load_packages() if p["split"] == split]
    cases: list[Case] = []
    if count is not None and count <= 0:
        return cases
    for index, gold in enumerate(pool):
        rng = random.Random(f"{SEED}:{split}:{gold['name']}")
        text = QUESTION_TEMPLATES[question].format(synopsis=gold["synopsis"])
        others = [p for p in pool if compatible(gold, p, text)]
        rng.shuffle(others)
        chosen: list[dict] = []
        for other in others:  # distractors must not be confusable with each other either
            if all(compatible(c, other, text) and compatible(other, c, text) for c in chosen):
                chosen.append(other)
            if len(chosen) == documents - 1:
                break
        if len(chosen) < documents - 1:
            continue
        position = rng.randrange(documents)
        chosen.insert(position, gold)
        cases.append(Case(f"{split}-{gold['name']}", split, text,
                          [document_text(p) for p in chosen], [p["name"] for p in chosen],
                          position, meta={"synopsis": gold["synopsis"]}))
        if count is not None and len(cases) == count:
            break
    return cases
