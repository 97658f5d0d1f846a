"""The token-flipping protocol of the PA-LRP paper's code (``NLP/utils.py``: ``flip_wiki``,
``flip_arc``; AUCs in ``NLP/llama_engine.py``), re-implemented without its defects.

For one input and one relevance vector:

* Tokens are replaced **in place** by a neutral token; the sequence keeps its length, so every
  other token keeps its position (RoPE position ids 0..T-1 are unchanged).
* Only the *mutable* positions take part (all tokens for next-token prediction; the question and
  choices, not the fixed "Answer:" suffix, for multiple choice, like the paper's ``should_keep``).
  N = number of mutable positions; at fraction f, n = round(f·N) tokens are flipped (half up).
  The paper's code takes ceil(f·N); the two agree whenever f·N is whole (always for the
  next-token task). Rounding keeps deletion and insertion exact complements (deleting the top
  n = inserting the bottom N − n), so the quiz costs half the forwards; with ceil they would
  differ by one token at some fractions.
* Fractions 0, 0.1, …, 1.0.
* Four curves, each read at the target logit (at the last position):

  - deletion, most-relevant first (MoRF): replace the n highest-relevance tokens;
  - deletion, least-relevant first (LeRF): replace the n lowest-relevance tokens
    (the paper's "pruning");
  - insertion, most-relevant first: start from all-neutral, restore the n highest
    (the paper's "generate"; its logit AUC is the paper's MERF);
  - insertion, least-relevant first: restore the n lowest (the paper's LERF).

  Order is by the signed relevance (``np.argsort(x)``, the paper's default without
  ``--reverse_default_abs``); ties are broken by position (stable sort).
* Per curve and fraction four readings: the target **logit**, the target **probability**
  (softmax over the whole vocabulary, or over the answer letters for multiple choice, as the
  paper's ``correct_subset``), the **normalised probability** min(p/p₀, 1) (p₀ on the
  unflipped input: each case's curve runs from 1 at the input, so every case counts alike; the
  cap keeps a flip that makes the target likelier than on the input from outweighing whole
  cases), and the squared logit drop (y0 − y)² (the paper's MSE).
* Areas: trapezoid rule over the fractions (``sklearn.metrics.auc``), per case, then averaged
  (the same as the paper's area of the mean curve: both are linear).

Paper defects not copied: the in-place mutation of the input tensor across fractions, the
floating-point ``ceil(0.30000000000000004·N)`` off-by-one, and the pad "fixes" (no padding
here: every batch row has the same length).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

FRACTIONS = np.round(np.linspace(0.0, 1.0, 11), 10)
CURVES = ("deletion_morf", "deletion_lerf", "insertion_morf", "insertion_lerf")
READINGS = ("logit", "prob", "nprob", "sqdrop")


def n_flipped(fraction: float, count: int) -> int:
    """Tokens flipped at ``fraction`` of ``count``: round(f·N), half up, robust to float error
    (the paper: ceil(f·N); equal when f·N is whole)."""
    return int(np.floor(fraction * count + 0.5 + 1e-9))


def ranking(relevance: Sequence[float], descending: bool) -> np.ndarray:
    """Indices into ``relevance``, most relevant (signed) first or least relevant first."""
    values = np.asarray(relevance, dtype=np.float64)
    key = -values if descending else values
    return np.argsort(key, kind="stable")


def curve_inputs(
    input_ids: Sequence[int],
    mutable: Sequence[int],
    relevance: Sequence[float],
    neutral_id: int,
    fractions: Sequence[float] = FRACTIONS,
) -> dict[str, list[tuple[int, ...]]]:
    """The perturbed inputs of the four curves: {curve: [ids at each fraction]}.

    ``relevance`` has one value per entry of ``mutable`` (the positions that may be flipped).
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    mutable = np.asarray(mutable, dtype=np.int64)
    if len(relevance) != len(mutable):
        raise ValueError(f"relevance has {len(relevance)} values for {len(mutable)} mutable positions")
    count = len(mutable)
    most_first = mutable[ranking(relevance, descending=True)]
    least_first = mutable[ranking(relevance, descending=False)]
    neutral = ids.copy()
    neutral[mutable] = neutral_id
    out: dict[str, list[tuple[int, ...]]] = {name: [] for name in CURVES}
    for fraction in fractions:
        n = n_flipped(fraction, count)
        for name, order in (("morf", most_first), ("lerf", least_first)):
            deleted = ids.copy()  # fresh copy per fraction: no mutation carried over
            deleted[order[:n]] = neutral_id
            out[f"deletion_{name}"].append(tuple(int(i) for i in deleted))
            inserted = neutral.copy()
            inserted[order[:n]] = ids[order[:n]]
            out[f"insertion_{name}"].append(tuple(int(i) for i in inserted))
    return out


def trapezoid_auc(values: Sequence[float], fractions: Sequence[float] = FRACTIONS) -> float:
    """Area under the curve over the fractions, trapezoid rule (as ``sklearn.metrics.auc``)."""
    y = np.asarray(values, dtype=np.float64)
    x = np.asarray(fractions, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


@dataclass
class Reading:
    """The model's output at the target for one input: target logit and target probability."""

    logit: float
    prob: float


@dataclass
class CaseCurves:
    """One case, one method: the curves (fractions × readings) and their areas."""

    curves: dict[str, dict[str, list[float]]]  # curve -> reading -> values per fraction
    aucs: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_readings(cls, inputs: dict[str, list[tuple[int, ...]]], read: dict[tuple, Reading],
                      original: Reading, fractions: Sequence[float] = FRACTIONS) -> "CaseCurves":
        curves: dict[str, dict[str, list[float]]] = {}
        for name in CURVES:
            readings = [read[ids] for ids in inputs[name]]
            curves[name] = {
                "logit": [r.logit for r in readings],
                "prob": [r.prob for r in readings],
                "nprob": [min(r.prob / original.prob, 1.0) if original.prob > 0 else 0.0
                          for r in readings],
                "sqdrop": [(original.logit - r.logit) ** 2 for r in readings],
            }
        result = cls(curves)
        result.aucs = summarise(curves, fractions)
        return result


def summarise(curves: dict[str, dict[str, list[float]]],
              fractions: Sequence[float] = FRACTIONS) -> dict[str, float]:
    """AUCs of every curve and reading, the gaps, and the paper's named metrics.

    ``deletion_gap`` = AUC(deletion LeRF) − AUC(deletion MoRF); ``insertion_gap`` =
    AUC(insertion MoRF) − AUC(insertion LeRF): larger is more faithful. ``score`` = their mean,
    ``gap`` = their sum. Readings: ``prob`` is the target probability, ``nprob`` the same divided
    by its value on the unflipped input, at most 1 (each case counts alike; the study's gap).
    """
    aucs = {f"{name}_{reading}": trapezoid_auc(curves[name][reading], fractions)
            for name in CURVES for reading in READINGS}
    for reading in ("logit", "prob", "nprob"):
        deletion = aucs[f"deletion_lerf_{reading}"] - aucs[f"deletion_morf_{reading}"]
        insertion = aucs[f"insertion_morf_{reading}"] - aucs[f"insertion_lerf_{reading}"]
        aucs[f"deletion_gap_{reading}"] = deletion
        aucs[f"insertion_gap_{reading}"] = insertion
        aucs[f"score_{reading}"] = (deletion + insertion) / 2
        aucs[f"gap_{reading}"] = deletion + insertion
    # the paper's table (NLP/eval_pert_*.py analyze): generation = insertion MoRF,
    # pruning = deletion LeRF; MERF/LERF = insertion logit AUCs, most/least relevant first.
    aucs["paper_generate_AU_AC"] = aucs["insertion_morf_prob"]
    aucs["paper_generate_AU_MSE"] = aucs["insertion_morf_sqdrop"]
    aucs["paper_pruning_AU_AC"] = aucs["deletion_lerf_prob"]
    aucs["paper_pruning_AU_MSE"] = aucs["deletion_lerf_sqdrop"]
    aucs["paper_MERF"] = aucs["insertion_morf_logit"]
    aucs["paper_LERF"] = aucs["insertion_lerf_logit"]
    return aucs


class ReadingCache:
    """Batched, de-duplicated model readings: many methods share perturbed inputs (the
    endpoints always, and deletion MoRF at f equals insertion LeRF at 1 − f when f·N is whole)."""

    def __init__(self, read_batch: Callable[[list[tuple[int, ...]]], list[Reading]],
                 batch_size: int = 32) -> None:
        self.read_batch = read_batch
        self.batch_size = batch_size
        self.cache: dict[tuple[int, ...], Reading] = {}
        self.evaluated = 0

    def read(self, sequences: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], Reading]:
        missing = list(dict.fromkeys(s for s in sequences if s not in self.cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            for seq, reading in zip(chunk, self.read_batch(chunk)):
                self.cache[seq] = reading
        self.evaluated += len(missing)
        return {s: self.cache[s] for s in sequences}
