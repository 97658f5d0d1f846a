"""The retrieval task: token flipping on a query–document cosine under a sentence encoder.
The faithfulness runner drives it (``bench/quality/faithfulness``):

    python -m bench.quality.faithfulness --tasks retrieval            # all-MiniLM-L6-v2, 40 dev / 60 test
    python -m bench.quality.faithfulness --tasks retrieval --n-dev 72 --n-test 108   # every shipped pair

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
  (``references/lxt_reference.py`` in ``.venv-lxt``), the document's E ⊙ g at the word embeddings
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
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .methods import combination_label, timed
from .protocol import CURVES, FRACTIONS, CaseCurves, ReadingCache, curve_inputs, trapezoid_auc
from .statistics import mean_se
from .tasks import load_items

TASK = "retrieval"
DEFAULT_MODEL = "all-MiniLM-L6-v2"
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
    (``references/lxt_reference.py``; one warm-up, then each case once, timed). None if unavailable."""
    python = REPO / ".venv-lxt" / "bin" / "python"
    if not python.exists():
        print("  lxt: .venv-lxt missing (run `bash references/lxt_env.sh`); skipped", flush=True)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.json", Path(tmp) / "out.json"
        source.write_text(json.dumps({
            "mode": "attnlrp", "time": True, "repeats": 1, "threads": threads,
            "cases": [{"input_ids": c.query_ids,
                       "target": {"kind": "cosine", "other_input_ids": c.doc_ids,
                                  "pooling": "mean"}} for c in cases]}))
        start = time.perf_counter()
        proc = subprocess.run([str(python), str(REPO / "references" / "lxt_reference.py"), "--model",
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


# ---- aggregation ------------------------------------------------------------------------------
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
