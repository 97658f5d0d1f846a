"""The retrieval task: token flipping on a query–document cosine under a sentence encoder.

    python -m bench.faithfulness --tasks retrieval            # all-MiniLM-L6-v2, 40 dev / 60 test
    python -m bench.faithfulness --tasks retrieval --n-dev 72 --n-test 108   # every shipped pair

Cases: ``data/retrieval.jsonl`` (Debian package descriptions; ``data/build_retrieval.py`` and
``data/SOURCES.md``): a query ("Which package provides <synopsis>?") and a document (the
package's long description). The target is the cosine of the two texts' embeddings as the model
serves them (pooling of the sentence-transformers directory, L2-normalised).

Protocol (``protocol.py``, as for the decoder tasks): only **document** tokens are flipped, in
place (the document keeps its length, every token its position; ``[CLS]`` and ``[SEP]`` are never
flipped), to a neutral token (default ``.``: see ``neutral_token``); the query is fixed. At each
fraction 0, 0.1, …, 1.0 the document embedding is recomputed with the flipped tokens (all
variants of one document have one length, so they are batched without padding) and the cosine
to the unchanged query embedding is read. Orders come from the **document side** of each
method's explanation (``explanation.other`` for the engine). Four curves (deletion / insertion,
most- / least-relevant first), trapezoid AUCs; deletion gap = AUC(LeRF) − AUC(MoRF), insertion
gap = AUC(MoRF) − AUC(LeRF), score = their mean (the decoder tasks' convention); ``ins − del`` =
AUC(insertion MoRF) − AUC(deletion MoRF). Every method is run on both splits; the reference of
the paired differences is our AttnLRP; a difference counts only beyond 2 standard errors.

Methods (document-side relevance):

* ``PA-LRP``: our engine in mode ``pa-lrp``, ``combined_relevance`` of the document's
  explanation, i.e. the library's default combination (``--combination`` picks another);
  ``pa-lrp[…]`` the other combinations of ``vllm_pelrp.assemble.COMBINATIONS`` from the same pass
  (``combine_parts`` of the token part and the position table's part); ``pa-lrp token-only``
  the token part; ``pa-lrp position-only`` |position part| (the paper's ``--pe_only``);
* ``attnlrp (ours)``, ``cp-lrp (ours)``: the engine's other modes (token relevance, which holds
  the position table's share);
* ``lxt-attnlrp (external)``: LXT 2.1's BERT ``attnLRP`` with its cosine target
  (``bench/lxt_reference.py`` in ``.venv-lxt``), the document's E ⊙ g at the word embeddings
  (what LXT's gradient × input gives); ``lxt-attnlrp (embedding sum)``: S ⊙ g at the embedding
  sum S = word + position + token type (the split our AttnLRP mode reports);
* ``grad-x-input``: gradient of the cosine (query embedding fixed) × the document's word
  embeddings, summed over the hidden dimension (HF model);
* ``integrated-gradients``: Captum, on the document's word embeddings; baseline = the input with
  every flippable token replaced by the neutral token's embedding ([CLS], [SEP] kept: what
  full flipping inserts), ``--ig-steps`` (32) steps;
* ``attention-last``: last layer, mean over heads, attention each document token *receives*,
  averaged over all rows (mean pooling averages every row; row 0 for CLS pooling);
  ``attention-rollout``: Abnar & Zuidema's rollout, same row average;
* ``random``: uniform noise, ``--random-seeds`` (3) seeds per case; its curves are the mean
  over the seeds (per-seed scores in results.json).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .methods import combination_label, timed
from .protocol import CURVES, FRACTIONS, CaseCurves, ReadingCache, curve_inputs, trapezoid_auc
from .tasks import load_items

TASK = "retrieval"
DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_OUT = Path(__file__).parent / "results" / "retrieval-minilm"
DEFAULTS = {"n_dev": 40, "n_test": 60, "ig_steps": 32, "batch_size": 64}
REFERENCE = "attnlrp (ours)"
PALRP = "PA-LRP"
LXT_WORD = "lxt-attnlrp (external)"
LXT_SUM = "lxt-attnlrp (embedding sum)"
RANDOM = "random"
SE_RULE = 2.0  # a paired difference counts only beyond this many standard errors
REPO = Path(__file__).resolve().parents[2]
KEYS = ("deletion_morf", "deletion_lerf", "deletion_gap", "insertion_morf", "insertion_lerf",
        "insertion_gap", "ins_minus_del", "score")


# ---- cases ------------------------------------------------------------------------------------
@dataclass
class RetrievalCase:
    item_id: str
    query: str
    document: str
    query_ids: list[int]
    doc_ids: list[int]
    mutable: list[int]  # document positions that may be flipped: every token but [CLS] / [SEP]
    meta: dict[str, Any] = field(default_factory=dict)

    task: str = TASK


def load_retrieval_cases(split: str, count: int, tokenizer: Any,
                         max_length: int = 512) -> list[RetrievalCase]:
    """The first ``count`` pairs of ``split`` in file order (documents over ``max_length``
    tokens are skipped; none of the shipped ones is)."""
    special = set(tokenizer.all_special_ids)
    cases = []
    for item in load_items(TASK):
        if item["split"] != split or len(cases) >= count:
            continue
        query_ids = [int(i) for i in tokenizer(item["query"])["input_ids"]]
        doc_ids = [int(i) for i in tokenizer(item["document"])["input_ids"]]
        if len(doc_ids) > max_length or len(query_ids) > max_length:
            continue
        mutable = [i for i, t in enumerate(doc_ids) if t not in special]
        cases.append(RetrievalCase(item["id"], item["query"], item["document"], query_ids,
                                   doc_ids, mutable, meta={"package": item["package"]}))
    return cases


def neutral_token(tokenizer: Any, choice: str = "auto") -> tuple[int, str]:
    """The replacement token. ``auto`` is ``.``: on the first 16 dev pairs (all-MiniLM-L6-v2,
    8 draws of 30 % random document flips each) the cosine (0.647 unflipped) drops by 0.047
    with ``.``, 0.106 with ``the``, 0.118 with [UNK], 0.125 with [PAD] and 0.355 with [MASK];
    every token flipped leaves 0.029, −0.011, 0.054, 0.052 and 0.033. All of them remove the
    document's content (near-zero cosine when everything is flipped), but [MASK] — never seen in
    the sentence-embedding fine-tuning — pulls the mean-pooled embedding towards a direction of
    its own, so random flips cost 7× more with it than with ``.``: a filler should take content
    out, not put its own in. ``mask``, ``unk`` and ``pad`` select those special tokens; anything
    else is taken as the text of one token."""
    special = {"mask": tokenizer.mask_token_id, "unk": tokenizer.unk_token_id,
               "pad": tokenizer.pad_token_id}
    if choice in special:
        if special[choice] is None:
            raise ValueError(f"this tokenizer has no {choice} token")
        return int(special[choice]), tokenizer.convert_ids_to_tokens(int(special[choice]))
    text = "." if choice == "auto" else choice
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"neutral token {text!r} is not a single token for this tokenizer")
    return int(ids[0]), text


# ---- the model's reading: the cosine ----------------------------------------------------------
class Embedder:
    """Embeddings as the model serves them (its pooling, then L2) from the HF model, batched:
    all rows of one batch have one length (flipping keeps the length), so no padding."""

    def __init__(self, hf_model: Any, pooling: Any) -> None:
        self.model = hf_model
        self.mode = pooling.mode

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mode == "mean":
            return hidden.mean(1)
        if self.mode == "cls":
            return hidden[:, 0]
        return hidden.max(1).values

    def from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.pool(hidden.float()), dim=-1)

    @torch.no_grad()
    def embed(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        ids = torch.tensor([list(s) for s in sequences])
        return self.from_hidden(self.model(input_ids=ids).last_hidden_state)

    def cosine_of_embeds(self, embeds: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Differentiable cosine of documents given as word embeddings (B, T, H) to ``query``."""
        return self.from_hidden(self.model(inputs_embeds=embeds).last_hidden_state) @ query


# ---- methods ----------------------------------------------------------------------------------
class RetrievalMethods:
    """Document-side relevance of every in-process method for one ``EncoderExplainer``."""

    def __init__(self, explainer: Any, neutral_id: int, ig_steps: int = 32,
                 random_seeds: int = 3, combination: str | None = None) -> None:
        from vllm_pelrp.assemble import DEFAULT_COMBINATION

        self.ex = explainer
        self.model = explainer.hf_model
        self.embedder = Embedder(explainer.hf_model, explainer.pooling)
        self.neutral_id = neutral_id
        self.ig_steps = ig_steps
        self.random_seeds = random_seeds
        self.combination = combination or DEFAULT_COMBINATION
        self.engine_value: dict[str, float] = {}  # case id -> the engine's cosine
        self.ig_relative_delta: dict[str, float] = {}  # case id -> |IG completeness error|

    # ---- LRP engine ----------------------------------------------------------------------
    def engine(self, case: RetrievalCase, mode: str) -> Any:
        explanation = self.ex.explain(case.query_ids, target={"similarity": case.doc_ids},
                                      mode=mode, combination=self.combination)
        self.engine_value[case.item_id] = float(explanation.target.value)
        return explanation.other

    def pa_lrp(self, case: RetrievalCase) -> dict[str, np.ndarray]:
        from vllm_pelrp.assemble import COMBINATIONS, combine_parts

        doc = self.engine(case, "pa-lrp")
        token = torch.tensor(doc.token_relevance, dtype=torch.float64)
        position = torch.tensor(doc.positional_relevance, dtype=torch.float64)
        out = {PALRP: np.asarray(doc.combined_relevance, dtype=np.float64)}
        for name in COMBINATIONS:
            combined = combine_parts(token, [position], name).numpy()
            if name == self.combination:  # the library's own combined_relevance, checked
                if not np.allclose(combined, out[PALRP], atol=1e-5):
                    raise AssertionError("combine_parts differs from combined_relevance")
            else:
                out[combination_label(name)] = combined
        out["pa-lrp token-only"] = token.numpy()
        out["pa-lrp position-only"] = position.abs().numpy()
        return out

    def attnlrp(self, case: RetrievalCase) -> np.ndarray:
        return np.asarray(self.engine(case, "attnlrp").token_relevance, dtype=np.float64)

    def cp_lrp(self, case: RetrievalCase) -> np.ndarray:
        return np.asarray(self.engine(case, "cp-lrp").token_relevance, dtype=np.float64)

    # ---- gradients -----------------------------------------------------------------------
    def _query(self, case: RetrievalCase) -> torch.Tensor:
        return self.embedder.embed([case.query_ids])[0]

    def _words(self, ids: Sequence[int]) -> torch.Tensor:
        return self.model.get_input_embeddings()(torch.tensor([list(ids)])).detach()

    def grad_x_input(self, case: RetrievalCase) -> np.ndarray:
        query = self._query(case)
        embeds = self._words(case.doc_ids).requires_grad_(True)
        with torch.enable_grad():
            self.embedder.cosine_of_embeds(embeds, query).sum().backward()
        return (embeds * embeds.grad).sum(-1)[0].detach().double().numpy()

    def integrated_gradients(self, case: RetrievalCase) -> np.ndarray:
        from captum.attr import IntegratedGradients

        query = self._query(case)
        embeds = self._words(case.doc_ids)
        base_ids = list(case.doc_ids)
        for i in case.mutable:
            base_ids[i] = self.neutral_id
        baseline = self._words(base_ids)
        ig = IntegratedGradients(lambda e: self.embedder.cosine_of_embeds(e, query))
        with torch.enable_grad():
            attributions, delta = ig.attribute(embeds, baselines=baseline, n_steps=self.ig_steps,
                                               internal_batch_size=self.ig_steps,
                                               return_convergence_delta=True)
        with torch.no_grad():
            span = float(self.embedder.cosine_of_embeds(torch.cat([embeds, baseline]), query)
                         @ torch.tensor([1.0, -1.0]))
        # completeness error of the Riemann sum, relative to f(x) - f(baseline)
        self.ig_relative_delta[case.item_id] = abs(float(delta)) / max(abs(span), 1e-12)
        return attributions.sum(-1)[0].detach().double().numpy()

    # ---- attention -----------------------------------------------------------------------
    @torch.no_grad()
    def attention_maps(self, case: RetrievalCase) -> list[torch.Tensor]:
        previous = self.model.config._attn_implementation
        try:
            self.model.set_attn_implementation("eager")
            out = self.model(input_ids=torch.tensor([case.doc_ids]), output_attentions=True)
        finally:
            self.model.set_attn_implementation(previous)
        return [a[0].float() for a in out.attentions]

    def _rows(self, matrix: torch.Tensor) -> np.ndarray:
        """Attention each token receives, averaged over the rows the pooling reads."""
        rows = matrix[:1] if self.embedder.mode == "cls" else matrix
        return rows.mean(0).double().numpy()

    def attention_last(self, case: RetrievalCase) -> np.ndarray:
        return self._rows(self.attention_maps(case)[-1].mean(0))

    def attention_rollout(self, case: RetrievalCase) -> np.ndarray:
        maps = self.attention_maps(case)
        eye = torch.eye(maps[0].shape[-1])
        rollout = eye
        for attention in maps:
            a = 0.5 * attention.mean(0) + 0.5 * eye
            rollout = (a / a.sum(-1, keepdim=True)) @ rollout
        return self._rows(rollout)

    # ---- random --------------------------------------------------------------------------
    def random(self, case: RetrievalCase) -> dict[str, np.ndarray]:
        key = sum(ord(c) * (i + 1) for i, c in enumerate(case.item_id))
        return {f"{RANDOM}#{s}": np.random.default_rng([s, key]).random(len(case.doc_ids))
                for s in range(self.random_seeds)}

    def single(self) -> dict[str, Callable[[RetrievalCase], np.ndarray]]:
        return {
            REFERENCE: self.attnlrp,
            "cp-lrp (ours)": self.cp_lrp,
            "grad-x-input": self.grad_x_input,
            "integrated-gradients": self.integrated_gradients,
            "attention-last": self.attention_last,
            "attention-rollout": self.attention_rollout,
        }


# ---- external LXT -----------------------------------------------------------------------------
def run_lxt(model_dir: Path, cases: Sequence[RetrievalCase], threads: int | None
            ) -> dict[str, Any] | None:
    """LXT's BERT AttnLRP with its cosine target for every case, one subprocess in .venv-lxt
    (``bench/lxt_reference.py``; one warm-up, then each case once, timed). None if unavailable."""
    python = REPO / ".venv-lxt" / "bin" / "python"
    if not python.exists():
        print("  lxt: .venv-lxt missing (run `bash bench/lxt_env.sh`); skipped", flush=True)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.json", Path(tmp) / "out.json"
        source.write_text(json.dumps({
            "mode": "attnlrp", "time": True, "repeats": 1, "threads": threads,
            "cases": [{"input_ids": c.query_ids,
                       "target": {"kind": "cosine", "other_input_ids": c.doc_ids,
                                  "pooling": "mean"}} for c in cases]}))
        start = time.perf_counter()
        proc = subprocess.run([str(python), str(REPO / "bench" / "lxt_reference.py"), "--model",
                               str(model_dir), "--input-json", str(source), "--output-json",
                               str(target)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"  lxt failed; skipped:\n{proc.stderr[-2000:]}", flush=True)
            return None
        out = json.loads(target.read_text())
        out["wall_s"] = time.perf_counter() - start
        return out


# ---- curves -----------------------------------------------------------------------------------
def cosine_aucs(curves: dict[str, list[float]]) -> dict[str, float]:
    aucs = {name: trapezoid_auc(curves[name]) for name in CURVES}
    aucs["deletion_gap"] = aucs["deletion_lerf"] - aucs["deletion_morf"]
    aucs["insertion_gap"] = aucs["insertion_morf"] - aucs["insertion_lerf"]
    aucs["ins_minus_del"] = aucs["insertion_morf"] - aucs["deletion_morf"]
    aucs["score"] = (aucs["deletion_gap"] + aucs["insertion_gap"]) / 2
    return aucs


def make_curves(per_curve: dict[str, list[float]]) -> CaseCurves:
    curves = CaseCurves({name: {"cosine": list(values)} for name, values in per_curve.items()})
    curves.aucs = cosine_aucs(per_curve)
    return curves


def evaluate_case(embedder: Embedder, case: RetrievalCase, relevances: dict[str, np.ndarray],
                  neutral_id: int, batch_size: int) -> tuple[dict[str, CaseCurves], int, float]:
    """Curves of every method on one case (flipped documents shared, de-duplicated, batched).
    Random's seeds (``random#k``) are averaged into one ``random`` entry (its AUCs are then the
    mean of the seeds' AUCs: the area is linear)."""
    start = time.perf_counter()
    query = embedder.embed([case.query_ids])[0]
    cache = ReadingCache(lambda seqs: (embedder.embed(seqs) @ query).tolist(), batch_size)
    mutable = np.asarray(case.mutable)
    inputs = {name: curve_inputs(case.doc_ids, case.mutable, np.asarray(rel)[mutable], neutral_id)
              for name, rel in relevances.items()}
    original = tuple(case.doc_ids)
    read = cache.read([original] + [s for per in inputs.values() for seqs in per.values() for s in seqs])
    raw = {name: {c: [read[s] for s in per[c]] for c in CURVES} for name, per in inputs.items()}
    out: dict[str, CaseCurves] = {}
    seeds = sorted(n for n in raw if n.startswith(f"{RANDOM}#"))
    for name, per_curve in raw.items():
        if name not in seeds:
            out[name] = make_curves(per_curve)
    if seeds:
        out[RANDOM] = make_curves({c: np.mean([raw[s][c] for s in seeds], axis=0).tolist()
                                   for c in CURVES})
        out[RANDOM].aucs["per_seed_score"] = [cosine_aucs(raw[s])["score"] for s in seeds]
    out_meta = read[original]
    for c in out.values():
        c.aucs["original"] = out_meta
    return out, cache.evaluated, time.perf_counter() - start


def run_split(methods: RetrievalMethods, cases: list[RetrievalCase], wanted: Sequence[str],
              neutral_id: int, lxt: dict | None, batch_size: int, log_prefix: str
              ) -> tuple[dict[str, list[CaseCurves]], dict[str, list[float]], dict[str, float]]:
    """Per method the per-case curves and explanation times; the flipping cost."""
    per_case: dict[str, list[CaseCurves]] = {}
    times: dict[str, list[float]] = {}
    cost = {"forwards": 0, "flip_s": 0.0, "sequences_per_case": []}
    start = time.perf_counter()
    for index, case in enumerate(cases):
        relevances: dict[str, np.ndarray] = {}
        if any(w == PALRP or w.startswith("pa-lrp") for w in wanted):
            variants, seconds = timed(methods.pa_lrp, case)
            for name, rel in variants.items():
                if name in wanted:
                    relevances[name] = rel
                    times.setdefault(name, []).append(seconds)
        for name, fn in methods.single().items():
            if name in wanted:
                relevances[name], seconds = timed(fn, case)
                times.setdefault(name, []).append(seconds)
        if RANDOM in wanted:
            seeded, seconds = timed(methods.random, case)
            relevances.update(seeded)
            times.setdefault(RANDOM, []).append(seconds)
        if lxt is not None:
            result = lxt["cases"][index]
            for name, key in ((LXT_WORD, "relevance_other"), (LXT_SUM, "relevance_embedding_sum_other")):
                if name in wanted:
                    relevances[name] = np.asarray(result[key], dtype=np.float64)
                    times.setdefault(name, []).append(result["time_s_median"])
        curves, evaluated, seconds = evaluate_case(methods.embedder, case, relevances, neutral_id,
                                                   batch_size)
        cost["forwards"] += evaluated
        cost["flip_s"] += seconds
        cost["sequences_per_case"].append(evaluated)
        for name, c in curves.items():
            per_case.setdefault(name, []).append(c)
        print(f"  {log_prefix} {index + 1}/{len(cases)} ({case.item_id}, {len(case.doc_ids)} doc "
              f"tokens, {evaluated} flipped documents in {seconds:.1f}s) "
              f"{time.perf_counter() - start:.0f}s", flush=True)
    return per_case, times, cost


# ---- aggregation and report -------------------------------------------------------------------
def mean_se(values: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se


def paired(per_case: dict[str, list[CaseCurves]], method: str, reference: str,
           key: str = "score") -> tuple[float, float]:
    return mean_se([a.aucs[key] - b.aucs[key] for a, b in zip(per_case[method], per_case[reference])])


def summarise(per_case: dict[str, list[CaseCurves]]) -> dict[str, dict]:
    out = {}
    for name, cs in per_case.items():
        out[name] = {"n": len(cs), "auc": {k: mean_se([c.aucs[k] for c in cs]) for k in KEYS},
                     "curves": {c: np.mean([x.curves[c]["cosine"] for x in cs], axis=0).tolist()
                                for c in CURVES}}
        if REFERENCE in per_case:
            out[name]["vs_reference"] = {k: paired(per_case, name, REFERENCE, k)
                                         for k in ("score", "ins_minus_del")}
    return out


def fmt(mean: float, se: float | None = None, digits: int = 3) -> str:
    if se is None or not np.isfinite(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def verdict(mean: float, se: float) -> str:
    if not np.isfinite(se) or se == 0:
        return "—"
    z = mean / se
    return f"{z:+.1f}" + (" ✓" if z > SE_RULE else " ✗" if z < -SE_RULE else "")


def split_table(summary: dict[str, dict]) -> list[str]:
    head = ("| method | del MoRF ↓ | del LeRF ↑ | **del gap ↑** | ins MoRF ↑ | ins LeRF ↓ | "
            "**ins gap ↑** | ins − del ↑ | score ↑ | Δscore vs AttnLRP (ours) | Δ / SE |")
    lines = [head, "|---" * 11 + "|"]
    for m in sorted(summary, key=lambda m: -summary[m]["auc"]["score"][0]):
        a = summary[m]["auc"]
        cells = [fmt(a[k][0]) if k in ("deletion_morf", "deletion_lerf", "insertion_morf",
                                       "insertion_lerf") else fmt(*a[k]) for k in KEYS]
        if m == REFERENCE or "vs_reference" not in summary[m]:
            cells += ["—", "—"]
        else:
            d = summary[m]["vs_reference"]["score"]
            cells += [fmt(*d), verdict(*d)]
        name = f"**{m}**" if m in (PALRP, REFERENCE) else m
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def timing_table(times: dict[str, list[float]]) -> list[str]:
    lines = ["| method | s / explanation | ratio to grad-x-input |", "|---|---|---|"]
    ref = float(np.mean(times["grad-x-input"])) if "grad-x-input" in times else float("nan")
    for m in sorted(times, key=lambda m: np.mean(times[m])):
        t = float(np.mean(times[m]))
        lines.append(f"| {m} | {t:.3f} | {t / ref:.2f} |")
    return lines


def plot(summaries: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(summaries)
    fig, axes = plt.subplots(len(splits), 4, figsize=(20, 4.6 * len(splits)), squeeze=False)
    names = sorted({m for s in splits for m in summaries[s]})
    cmap = plt.get_cmap("tab20")
    colours = {m: cmap(i % 20) for i, m in enumerate(names)}
    for row, split in enumerate(splits):
        for col, curve in enumerate(CURVES):
            ax = axes[row][col]
            for m in names:
                if m not in summaries[split]:
                    continue
                bold = m == PALRP
                ax.plot(FRACTIONS, summaries[split][m]["curves"][curve], label=m,
                        color="black" if bold else colours[m], lw=2.6 if bold else 1.2,
                        ls="--" if m == RANDOM else "-")
            ax.set_title(f"{split}: {curve.replace('_', ' ')}")
            ax.set_xlabel("fraction of document tokens " + ("replaced" if "deletion" in curve else "restored"))
            ax.set_ylabel("cosine(query, document)")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def all_methods(combination: str) -> list[str]:
    from vllm_pelrp.assemble import COMBINATIONS

    return ([PALRP] + [combination_label(c) for c in COMBINATIONS if c != combination]
            + ["pa-lrp token-only", "pa-lrp position-only", REFERENCE, "cp-lrp (ours)",
               LXT_WORD, LXT_SUM, "grad-x-input", "integrated-gradients", "attention-last",
               "attention-rollout", RANDOM])


def run(args: Any, argv: Sequence[str] | None) -> int:
    """``python -m bench.faithfulness --tasks retrieval`` (``run.main`` parses the flags)."""
    from vllm_pelrp import load_explainer
    from vllm_pelrp.explainer import EncoderExplainer, resolve_model_path

    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    n_dev = DEFAULTS["n_dev"] if args.n_dev is None else args.n_dev
    n_test = DEFAULTS["n_test"] if args.n_test is None else args.n_test
    ig_steps = DEFAULTS["ig_steps"] if args.ig_steps is None else args.ig_steps
    batch_size = DEFAULTS["batch_size"] if args.batch_size is None else args.batch_size
    out_dir = DEFAULT_OUT if args.out is None else args.out
    model_dir = resolve_model_path(args.model or DEFAULT_MODEL)
    ex = load_explainer(str(model_dir))
    if not isinstance(ex, EncoderExplainer) or ex.pooling is None:
        raise SystemExit(f"{model_dir}: the retrieval task needs a sentence-embedding encoder")
    from vllm_pelrp.assemble import DEFAULT_COMBINATION

    from .methods import COMBINATIONS as LABELS  # benchmark label -> library name

    combination = LABELS.get(args.combination, args.combination) or DEFAULT_COMBINATION
    neutral_id, neutral_text = neutral_token(ex.tokenizer, args.neutral)
    methods = RetrievalMethods(ex, neutral_id, ig_steps=ig_steps, random_seeds=args.random_seeds,
                               combination=combination)
    wanted = all_methods(combination)
    if args.no_lxt:
        wanted = [m for m in wanted if m not in (LXT_WORD, LXT_SUM)]
    print(f"retrieval: model {ex.name} ({model_dir}), pooling {ex.pooling}; neutral token "
          f"{neutral_text!r} (id {neutral_id}); PA-LRP = {combination}; threads "
          f"{torch.get_num_threads()}", flush=True)
    result: dict[str, Any] = {
        "task": TASK, "model": ex.name, "model_dir": str(model_dir), "neutral_token": neutral_text,
        "combination": combination, "ig_steps": ig_steps, "random_seeds": args.random_seeds,
        "batch_size": batch_size, "args": {k: str(v) for k, v in vars(args).items()},
        "command": "python -m bench.faithfulness " + " ".join(argv if argv is not None else sys.argv[1:]),
        "splits": {}}
    summaries, all_times, per_split_cases = {}, {}, {}
    splits = [("dev", n_dev)] + ([] if args.dev_only else [("test", n_test)])
    for split, count in splits:
        if count <= 0:
            continue
        cases = load_retrieval_cases(split, count, ex.tokenizer, ex.max_length)
        lxt = None
        if LXT_WORD in wanted or LXT_SUM in wanted:
            lxt = run_lxt(model_dir, cases, args.threads or None)
        names = [m for m in wanted if lxt is not None or m not in (LXT_WORD, LXT_SUM)]
        per_case, times, cost = run_split(methods, cases, names, neutral_id, lxt, batch_size, split)
        summary = summarise(per_case)
        summaries[split] = summary
        per_split_cases[split] = per_case
        for m, ts in times.items():
            all_times.setdefault(m, []).extend(ts)
        ours = [methods.engine_value[c.item_id] for c in cases]
        hf = [per_case[REFERENCE][i].aucs["original"] for i in range(len(cases))]
        entry = {
            "n": len(cases), "item_ids": [c.item_id for c in cases],
            "doc_tokens": [len(c.doc_ids) for c in cases],
            "summary": summary,
            "per_case": {m: {k: [c.aucs[k] for c in cs] for k in KEYS} for m, cs in per_case.items()},
            "random_per_seed_score": [c.aucs["per_seed_score"] for c in per_case.get(RANDOM, [])],
            "cosine_original": hf,
            "ig_relative_completeness_error": [methods.ig_relative_delta.get(c.item_id)
                                               for c in cases],
            "max_abs_cosine_engine_vs_hf": float(np.max(np.abs(np.subtract(ours, hf)))),
            "flipping": {"documents_evaluated": cost["forwards"], "seconds": cost["flip_s"],
                         "per_case_mean": float(np.mean(cost["sequences_per_case"]))},
        }
        if lxt is not None:
            entry["lxt_versions"] = lxt["versions"]
            entry["lxt_wall_s"] = lxt["wall_s"]
            entry["max_abs_cosine_lxt_vs_ours"] = float(max(
                abs(o["target_value"] - v) for o, v in zip(lxt["cases"], ours)))
        result["splits"][split] = entry
    result["times_s"] = {m: float(np.mean(ts)) for m, ts in all_times.items()}
    result["wall_s"] = time.perf_counter() - t0
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    result["cpu_s"] = sum(u.ru_utime + u.ru_stime for u in usage)
    result["load_average"] = {"start": load_start, "end": os.getloadavg()[0], "cores": os.cpu_count()}
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "dev" if args.dev_only else "results"
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    md = report(result, summaries, all_times)
    (out_dir / f"{name}.md").write_text(md)
    plot(summaries, out_dir / ("dev_curves.png" if args.dev_only else "curves.png"),
         f"{ex.name}: flipping document tokens, cosine to the query")
    print(md)
    print(f"wrote {out_dir}/{name}.md, {name}.json ({result['wall_s']:.0f}s)")
    return 0


def combination_choice(result: dict, summaries: dict[str, dict]) -> list[str]:
    """Which combination dev would have picked, and how that pick does on test (PA-LRP's
    combination is fixed beforehand: the library's default, not chosen on dev)."""
    if "dev" not in summaries:
        return []
    dev = summaries["dev"]
    names = [m for m in dev if m == PALRP or m.startswith("pa-lrp[")]
    best = max(names, key=lambda m: dev[m]["auc"]["score"][0])
    label = f"PA-LRP ({result['combination']})" if best == PALRP else best
    lines = ["## The combination", "", f"Best combination on dev by score: **{label}** "
             f"({fmt(*dev[best]['auc']['score'])}; PA-LRP {fmt(*dev[PALRP]['auc']['score'])})."]
    if "test" in summaries and best != PALRP and best in summaries["test"]:
        test = summaries["test"]
        lines.append(f"On test: {fmt(*test[best]['auc']['score'])} against PA-LRP's "
                     f"{fmt(*test[PALRP]['auc']['score'])}.")
    return lines + [""]


def report(result: dict, summaries: dict[str, dict], times: dict[str, list[float]]) -> str:
    lines = [f"# Faithfulness, retrieval: {result['model']}", "",
             f"Command: `{result['command'].strip()}`", "",
             f"Target: cosine(query, document) of the served embeddings; document tokens flipped "
             f"in place to {result['neutral_token']!r} ([CLS]/[SEP] and the query fixed); "
             "fractions 0, 0.1, …, 1.0; AUC = trapezoid over fractions; mean ± standard error "
             "over cases. Gaps: deletion = LeRF − MoRF, insertion = MoRF − LeRF, score = their "
             "mean; ins − del = AUC(insertion MoRF) − AUC(deletion MoRF). Δscore = the method "
             "minus our AttnLRP on the same cases (paired); Δ / SE beyond ±2 is marked ✓ (better) "
             f"or ✗ (worse). `PA-LRP` = `combined_relevance`, combination {result['combination']}.",
             ""]
    for split, summary in summaries.items():
        entry = result["splits"][split]
        lines += [f"## {split} split ({entry['n']} pairs, {np.mean(entry['doc_tokens']):.0f} "
                  f"document tokens on average; cosine {np.mean(entry['cosine_original']):.3f})", ""]
        lines += split_table(summary)
        seeds = np.asarray(entry["random_per_seed_score"])
        if seeds.size:
            lines += ["", "random: score per seed (mean over cases) "
                      + ", ".join(f"{v:.3f}" for v in seeds.mean(0))]
        lines += ["", f"Flipping cost: {entry['flipping']['documents_evaluated']} flipped documents "
                  f"({entry['flipping']['per_case_mean']:.0f} per pair after de-duplication) in "
                  f"{entry['flipping']['seconds']:.0f} s; |engine cosine − HF cosine| ≤ "
                  f"{entry['max_abs_cosine_engine_vs_hf']:.1e}"
                  + (f"; |LXT cosine − ours| ≤ {entry['max_abs_cosine_lxt_vs_ours']:.1e}"
                     if "max_abs_cosine_lxt_vs_ours" in entry else "") + "."]
        ig = [v for v in entry["ig_relative_completeness_error"] if v is not None]
        if ig:
            lines.append(f"Integrated Gradients ({result['ig_steps']} steps): completeness error "
                         f"|Σ attributions − (f(x) − f(baseline))| / |f(x) − f(baseline)|, median "
                         f"{np.median(ig):.3f}, max {np.max(ig):.3f}.")
        lines.append("")
    lines += combination_choice(result, summaries)
    lines += [f"## Time per explanation ({' and '.join(summaries)} split"
              f"{'s' if len(summaries) > 1 else ''} of this run)", ""] + timing_table(times)
    lines += ["", "PA-LRP rows share one engine pass (query and document). LXT runs in its own "
              "process (transformers 4.57, eager attention); its time is one explanation of "
              "both texts.", ""]
    load = result["load_average"]
    lines.append(f"Wall time: {result['wall_s']:.0f} s; CPU time {result['cpu_s']:.0f} s (1-minute "
                 f"load average {load['start']:.1f} at the start, {load['end']:.1f} at the end, "
                 f"{load['cores']} cores shared).")
    return "\n".join(lines) + "\n"
