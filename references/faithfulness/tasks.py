"""The two tasks, on real text shipped with the benchmark (see data/SOURCES.md).

* ``nexttoken``: the first ``length`` tokens of a prose entry of the BSD fortune database; the
  target is the model's own argmax next token (as the paper's Wikipedia task). All text tokens
  are mutable; special tokens the tokenizer adds (a BOS such as Gemma's ``<bos>``) come on top
  of the ``length`` and are never flipped.
* ``prose``: the same next-token task on passages of technical prose from the GNU Info manuals
  of Debian packages (``data/prose.jsonl``, built by ``data/build_prose.py``), long enough for
  contexts of 128 and 512 tokens.
* ``quiz``: a four-way multiple-choice question from BSD quiz(6) answer files::

      Question: What is the capital of Norway?
      A. Oslo
      B. Lima
      C. Rome
      D. Cairo
      Answer:

  The target is the answer letter (" A" … " D") with the highest logit after "Answer:" (the
  paper's ARC set-up with ``correct_subset``); its probability is the softmax over the four
  letters. "Question:" and "\\nAnswer:" are fixed (the paper's ``should_keep``); the question
  and the choices are mutable. The prompt is plain text, never a chat template (base models such
  as Gemma 3 270M have none); a BOS the tokenizer adds belongs to the fixed prefix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
TASKS = ("nexttoken", "quiz", "prose")
NEXT_TOKEN_TASKS = ("nexttoken", "prose")  # the first ``length`` tokens of a text, its argmax next
LETTERS = ("A", "B", "C", "D")


@dataclass
class Case:
    """One explained input: the target is the logit of ``target_id`` at the last position."""

    task: str
    item_id: str
    input_ids: list[int]
    mutable: list[int]  # positions that may be flipped
    prob_ids: list[int] | None = None  # softmax over these ids only (None: whole vocabulary)
    target_id: int = -1  # set by ``resolve_target``
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def target_position(self) -> int:
        return len(self.input_ids) - 1


def load_items(task: str) -> list[dict]:
    with open(DATA / f"{task}.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=special)["input_ids"]]


def nexttoken_case(item: dict, tokenizer: Any, length: int, task: str = "nexttoken") -> Case | None:
    """The tokenizer's leading special tokens (Gemma's ``<bos>``; none for SmolLM2), then the
    first ``length`` text tokens: N = ``length`` mutable tokens whatever the tokenizer adds."""
    ids = _encode(tokenizer, item["text"], special=True)
    special = set(tokenizer.all_special_ids)
    lead = 0
    while lead < len(ids) and ids[lead] in special:
        lead += 1
    if len(ids) < lead + length + 1:  # the cut must fall inside the text
        return None
    ids = ids[: lead + length]
    mutable = [i for i, t in enumerate(ids) if t not in special]
    return Case(task, item["id"], ids, mutable, meta={"source": item["source"]})


def letter_ids(tokenizer: Any) -> list[int]:
    out = []
    for letter in LETTERS:
        ids = _encode(tokenizer, " " + letter, special=False)
        if len(ids) != 1:
            ids = _encode(tokenizer, letter, special=False)
        if len(ids) != 1:
            raise ValueError(f"answer letter {letter!r} is not a single token for this tokenizer")
        out.append(ids[0])
    return out


def quiz_case(item: dict, tokenizer: Any) -> Case:
    prefix = _encode(tokenizer, "Question:", special=True)
    body_text = " " + item["question"] + "".join(
        f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, item["choices"]))
    body = _encode(tokenizer, body_text, special=False)
    suffix = _encode(tokenizer, "\nAnswer:", special=False)
    ids = prefix + body + suffix
    mutable = list(range(len(prefix), len(prefix) + len(body)))
    return Case("quiz", item["id"], ids, mutable, prob_ids=letter_ids(tokenizer),
                meta={"source": item["source"], "answer": item["answer"]})


def task_case(task: str, item: dict, tokenizer: Any, length: int) -> Case | None:
    """One item as a case of ``task`` (None: the text is shorter than ``length`` tokens)."""
    if task in NEXT_TOKEN_TASKS:
        return nexttoken_case(item, tokenizer, length, task)
    return quiz_case(item, tokenizer)


def load_cases(task: str, split: str, count: int, tokenizer: Any, length: int = 40) -> list[Case]:
    """The first ``count`` usable items of ``split`` ("dev" or "test"), in file order."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    cases = []
    for item in load_items(task):
        if item["split"] != split:
            continue
        case = task_case(task, item, tokenizer, length)
        if case is not None:
            cases.append(case)
        if len(cases) == count:
            break
    return cases


def neutral_token_id(tokenizer: Any, choice: str = "auto") -> tuple[int, str]:
    """The replacement token. ``auto`` follows the paper's code (the UNK token, or '#' where
    there is none), but only takes a *real* unknown-word token (its text contains "unk", e.g.
    LLaMA-2's ``<unk>``): SmolLM2 declares its document separator ``<|endoftext|>`` as UNK, and
    that is no neutral filler (on 6 dev cases, 30% random flips cost 5.0 nats of the target's
    log-probability with it and 3.1 with '#'). Gemma 3's ``<unk>`` (id 3) is a real one, and
    the same check finds no clear difference to '#' (Gemma 3 270M, 16 dev cases per task × 8
    draws of 30% random flips, same positions for both: next-token 3.40 vs 2.89 nats, paired
    0.51 ± 0.42; quiz 0.52 vs 0.55, paired −0.03 ± 0.06; every mutable token flipped:
    15.8 vs 18.1 and 1.00 vs 0.92), so ``auto`` keeps the paper's rule and takes it. ``unk``
    forces the declared UNK; anything else is taken as the literal text of one token.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    unk_text = str(getattr(tokenizer, "unk_token", "") or "")
    if choice == "unk" or (choice == "auto" and unk is not None and "unk" in unk_text.lower()):
        if unk is None:
            raise ValueError("this tokenizer has no UNK token")
        return int(unk), unk_text
    text = "#" if choice == "auto" else choice
    ids = _encode(tokenizer, text, special=False)
    if len(ids) != 1:
        raise ValueError(f"neutral token {text!r} is not a single token for this tokenizer")
    return int(ids[0]), text
