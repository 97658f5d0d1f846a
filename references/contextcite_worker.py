#!/usr/bin/env python3
"""ContextCite (MadryLab, ``context-cite`` 0.0.4) for the grounding benchmark; runs inside
``.venv-contextcite`` (``bash references/contextcite_env.sh``) as a long-lived child of
``python -m bench.quality.grounding``, so each case's ContextCite run is interleaved with our own
explanation of the same case in the same run.

Protocol: JSON lines. The first line on stdin is the set-up
``{"model": DIR, "threads": int | null}``; the worker loads the checkpoint with
``AutoModelForCausalLM`` (same transformers and torch versions as the main environment) and
answers ``{"ready": true, "versions": {...}}``. Then one request line per case::

    {"documents": [str, ...],                   # the sources, in prompt order
     "subsets": {"1011": user_text, ...},      # user message for every kept-documents mask
     "answer": str, "answer_ids": [int, ...],  # the model's answer (text and ids)
     "prompt_ids": [int, ...],                 # the main process's prompt ids (checked)
     "num_ablations": 64, "prefix_ablations": [32]}

and one reply line: ContextCite's per-source scores (its LASSO weights), the time of
``ContextCiter.get_attributions`` (its ablation forwards plus its regression), and for every
``prefix_ablations`` count the scores and time of the same run cut after that many ablations
(its masks come from seeds 0, 1, 2, … so the first n of 64 ablations are exactly the n it would
draw with ``num_ablations=n``; time = until the n-th ablation forward returned, plus the
regression on n rows).

ContextCite is used as documented, with two adaptations that keep its method unchanged:

* a ``BaseContextPartitioner`` whose sources are the documents (one source per document, as
  ours) and whose ablated context is the library's own rendering of the kept documents
  (``vllm_pelrp.grounding.render_documents``, pre-rendered by the main process for every
  mask, since there are only 2**n of them), with ``prompt_template="{context}"``: the prompt
  ContextCite ablates is exactly the one we explain;
* the response is the given answer (``ContextCiter._cache["output"]``), not a new generation:
  both methods explain the same answer, and neither is timed generating it.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # ContextCite shows a progress bar per run

import nltk  # noqa: E402

# context_cite.utils runs nltk.download("punkt_tab") at import; the machines are offline and
# punkt is used only by ContextCite's sentence partitioner, which is replaced here.
nltk.download = lambda *args, **kwargs: True

import numpy as np  # noqa: E402
import torch  # noqa: E402
from context_cite import ContextCiter  # noqa: E402
from context_cite.context_partitioner import BaseContextPartitioner  # noqa: E402
from context_cite.utils import aggregate_logit_probs  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


class DocumentPartitioner(BaseContextPartitioner):
    """One source per document; the ablated context is the pre-rendered prompt for the mask."""

    def __init__(self, context: str, documents: list[str], subsets: dict[str, str]) -> None:
        super().__init__(context)
        self.documents = documents
        self.subsets = subsets

    @property
    def num_sources(self) -> int:
        return len(self.documents)

    def split_context(self) -> None:  # the sources are given
        return None

    def get_source(self, index: int) -> str:
        return self.documents[index]

    def get_context(self, mask=None) -> str:
        if mask is None:
            mask = np.ones(self.num_sources, dtype=bool)
        return self.subsets["".join("1" if m else "0" for m in mask)]


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("context-cite", "torch", "transformers", "scikit-learn", "nltk")}


@torch.no_grad()
def answer_logprob(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(ids, use_cache=False).logits[0, len(prompt_ids) - 1 : -1].double()
    return float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer_ids)[:, None]).sum())


def explain(model, tokenizer, request: dict) -> dict:
    documents = request["documents"]
    subsets = request["subsets"]
    full = subsets["1" * len(documents)]
    partitioner = DocumentPartitioner(full, documents, subsets)
    citer = ContextCiter(model, tokenizer, full, "", partitioner=partitioner,
                         prompt_template="{context}",
                         num_ablations=int(request["num_ablations"]))
    prompt_ids, chat_prompt = citer._get_prompt_ids(return_prompt=True)
    citer._cache["output"] = chat_prompt + request["answer"]  # the given answer, not generated
    stamps: list[float] = []
    hook = model.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    try:
        start = time.perf_counter()
        scores = citer.get_attributions(verbose=False)
        elapsed = time.perf_counter() - start
    finally:
        hook.remove()
    response_ids = list(citer._response_ids)
    out = {"scores": [float(s) for s in scores], "time_s": elapsed,
           "forwards": len(stamps), "prompt_ids_match": prompt_ids == request["prompt_ids"],
           "response_ids_match": response_ids == request["answer_ids"], "prefix": {}}
    count = len(response_ids)
    outputs = aggregate_logit_probs(citer._logit_probs[:, :count])
    for n in request.get("prefix_ablations", []):
        n = int(n)
        if n > len(stamps):
            continue
        fit_start = time.perf_counter()
        weight, _ = citer.solver.fit(citer._masks[:n], outputs[:n], count)
        fit = time.perf_counter() - fit_start
        out["prefix"][str(n)] = {"scores": [float(s) for s in weight],
                                 "time_s": stamps[n - 1] - start + fit}
    out["answer_logprob"] = answer_logprob(model, request["prompt_ids"], request["answer_ids"])
    return out


def main() -> int:
    setup = json.loads(sys.stdin.readline())
    if setup.get("threads"):
        torch.set_num_threads(int(setup["threads"]))
    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    tokenizer.padding_side = "left"
    print(json.dumps({"ready": True, "versions": versions()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            reply = explain(model, tokenizer, request)
        except Exception as error:  # reported to the main process, which stops the run
            reply = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
