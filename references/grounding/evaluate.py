"""One grounding case measured: which document did the answer come from? The model's answer,
the answer's log-probability with sources removed, our one-pass ``explanation.grounding``,
ContextCite (``references/contextcite_worker.py`` in ``.venv-contextcite``), leave-one-out and
random order, and the per-case metrics. The grounding runner (``python -m bench.quality.grounding``)
drives it; the tests check it on the default model.

Metrics, per method (docs/grounding-benchmark.md):
* top-1 accuracy against the *answer's source* (the document whose package name the model's
  answer names first; cases whose answer names none are left out of this one), against the
  *gold* document on all cases, and against the gold document on correctly answered cases;
* the drop of the answer's log-probability (sum over its tokens, teacher-forced) when the top
  source is removed from the prompt, against the mean drop over every single source (the
  expected drop of removing a random one); the same for the top two sources against the mean
  over every pair (ContextCite's top-k removal evaluation, k = 1, 2);
* time per explanation: ours = one ``Explainer.explain(messages, documents, completion,
  target="completion")`` call; ContextCite = ``ContextCiter.get_attributions`` (its ablation
  forwards and its LASSO regression); leave-one-out = its 1 + n forwards. Neither is timed
  generating the answer. Ratio = their mean time over ours.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .tasks import Case, name_position

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parents[1] / "contextcite_worker.py"
SCORES = ("share", "token_share", "relevance", "token_relevance")
OURS = "PA-LRP grounding (ours)"
LOO = "leave-one-out ablation"
RANDOM = "random order"


def contextcite_name(n: int) -> str:
    return f"ContextCite ({n} ablations)"


# ---- model readings ---------------------------------------------------------------------------
def generate_answer(ex: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The model's greedy answer, without the end-of-turn / special tokens it stops with."""
    ids = ex.generate(prompt_ids, max_new_tokens=max_new_tokens)
    special = set(ex.tokenizer.all_special_ids)
    while ids and ids[-1] in special:
        ids = ids[:-1]
    return ids


@torch.no_grad()
def answer_logprob(model: Any, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """log p(answer | prompt): the sum over the answer's tokens, teacher-forced."""
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(ids, use_cache=False, logits_to_keep=len(answer_ids) + 1).logits[0, :-1].double()
    return float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer_ids)[:, None]).sum())


def prompt_for(ex: Any, case: Case, kept: Sequence[int]) -> list[int]:
    """Prompt ids with only the documents ``kept`` (in their order): removal = not rendered."""
    return ex.encode_prompt(messages=[{"role": "user", "content": case.question}],
                            documents=[case.documents[i] for i in kept])


def removal_logprobs(ex: Any, case: Case, answer_ids: list[int]) -> tuple[dict, float]:
    """log p(answer) with every set of at most two documents removed; and the time of the
    leave-one-out reads (the full prompt and each single removal, one forward each)."""
    n = len(case.documents)
    out: dict[tuple[int, ...], float] = {}
    loo_time = 0.0
    for removed in itertools.chain([()], itertools.combinations(range(n), 1),
                                   itertools.combinations(range(n), 2)):
        start = time.perf_counter()
        kept = [i for i in range(n) if i not in removed]
        out[removed] = answer_logprob(ex.hf_model, prompt_for(ex, case, kept), answer_ids)
        if len(removed) <= 1:
            loo_time += time.perf_counter() - start
    return out, loo_time


def answer_source(answer: str, names: Sequence[str]) -> int | None:
    """The document whose package name the answer names first (None: it names none)."""
    found = [(name_position(answer, name), index) for index, name in enumerate(names)]
    found = [(where, index) for where, index in found if where is not None]
    return min(found)[1] if found else None


# ---- ContextCite in its own environment -------------------------------------------------------
def contextcite_python() -> Path | None:
    path = REPO / ".venv-contextcite" / "bin" / "python"
    return path if path.exists() else None


class ContextCiteWorker:
    """``contextcite_worker.py`` in ``.venv-contextcite``, one request per case."""

    def __init__(self, python: Path, model_dir: Path, threads: int | None, log: Path) -> None:
        env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        self.log = open(log, "w")
        self.proc = subprocess.Popen([str(python), str(WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                     cwd=str(WORKER.parent))
        ready = self.call({"model": str(model_dir), "threads": threads})
        self.versions = ready["versions"]

    def call(self, request: dict) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            raise RuntimeError(f"the ContextCite worker stopped (log: {self.log.name})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"ContextCite worker: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def subset_texts(case: Case) -> dict[str, str]:
    """The user message for every mask of kept documents (ContextCite's ablations), rendered by
    the library; with no document kept, the template without any document block."""
    from vllm_pelrp.grounding import DOCUMENT_HEADER, SEPARATOR, render_documents

    n = len(case.documents)
    out = {}
    for bits in itertools.product("01", repeat=n):
        kept = [case.documents[i] for i in range(n) if bits[i] == "1"]
        if kept:
            out["".join(bits)] = render_documents(case.question, kept)[0]
        else:
            text, spans = render_documents(case.question, ["-"])
            header = text.index(SEPARATOR + DOCUMENT_HEADER.format(number=1))
            out["".join(bits)] = text[:header] + text[spans[0][1]:]
    return out


def contextcite_request(ex: Any, case: Case, answer_ids: list[int], num_ablations: int,
                        prefixes: Sequence[int]) -> dict:
    return {"documents": case.documents, "subsets": subset_texts(case),
            "answer": ex.tokenizer.decode(answer_ids), "answer_ids": answer_ids,
            "prompt_ids": prompt_for(ex, case, range(len(case.documents))),
            "num_ablations": num_ablations, "prefix_ablations": list(prefixes)}


# ---- ours -------------------------------------------------------------------------------------
def ours(ex: Any, case: Case, answer_ids: list[int], sentences: bool = False
         ) -> tuple[dict[str, list[float]], float, dict]:
    """Per-source numbers from one grounding explanation of the whole answer, and its wall time.

    ``sentences=False``: the sources of the whole answer only, what ContextCite's
    ``get_attributions()`` gives (the default also explains each answer sentence as an extra
    row of the same backward; that call is timed separately on the test split)."""
    start = time.perf_counter()
    explanation = ex.explain(messages=[{"role": "user", "content": case.question}],
                             documents=case.documents, completion=answer_ids, target="completion",
                             sentences=sentences)
    elapsed = time.perf_counter() - start
    grounding = explanation.grounding
    sources = grounding.sources
    scores = {
        "share": [s.share for s in sources],
        "token_share": [s.token_share for s in sources],
        "relevance": [s.token_relevance + s.positional_relevance for s in sources],
        "token_relevance": [s.token_relevance for s in sources],
    }
    extra = {"grounding_score": grounding.grounding_score,
             "instruction_share": grounding.instruction_share,
             "positional_share": grounding.positional_share,
             "sentences": len(grounding.sentences)}
    return scores, elapsed, extra


# ---- metrics ----------------------------------------------------------------------------------
def case_metrics(scores: Sequence[float], logprobs: dict, record: dict) -> dict[str, Any]:
    n = len(scores)
    order = [int(i) for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")]
    full = logprobs[()]
    top = order[0]
    top2 = tuple(sorted(order[:2]))
    return {
        "top": top,
        "top1_answer": None if record["answer_source"] is None else top == record["answer_source"],
        "top1_gold": top == record["gold"],
        "drop1": full - logprobs[(top,)],
        "drop2": full - logprobs[top2],
    }


def random_metrics(n: int, logprobs: dict, record: dict) -> dict[str, Any]:
    """The expectation over a uniformly random order."""
    full = logprobs[()]
    return {
        "top": None,
        "top1_answer": None if record["answer_source"] is None else 1.0 / n,
        "top1_gold": 1.0 / n,
        "drop1": float(np.mean([full - logprobs[(i,)] for i in range(n)])),
        "drop2": float(np.mean([full - logprobs[p] for p in itertools.combinations(range(n), 2)])),
    }


def mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan"), 0
    se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se, len(x)


def summarise(records: list[dict], method: str) -> dict[str, Any]:
    m = [r["methods"][method] for r in records]
    correct = [r["methods"][method] for r in records if r["correct"]]
    times = [r["times"].get(method) for r in records]
    return {
        "top1_answer_source": mean_se([x["top1_answer"] for x in m]),
        "top1_gold_all": mean_se([x["top1_gold"] for x in m]),
        "top1_gold_correct": mean_se([x["top1_gold"] for x in correct]),
        "drop1": mean_se([x["drop1"] for x in m]),
        "drop2": mean_se([x["drop2"] for x in m]),
        "drop1_minus_random": mean_se([x["drop1"] - r["methods"][RANDOM]["drop1"]
                                       for x, r in zip(m, records)]),
        "drop2_minus_random": mean_se([x["drop2"] - r["methods"][RANDOM]["drop2"]
                                       for x, r in zip(m, records)]),
        "time_s": mean_se([t for t in times if t is not None]),
    }


def paired(records: list[dict], a: str, b: str, key: str) -> tuple[float, float, int]:
    values = []
    for r in records:
        x, y = r["methods"][a][key], r["methods"][b][key]
        if x is not None and y is not None:
            values.append(float(x) - float(y))
    return mean_se(values)


# ---- one split --------------------------------------------------------------------------------
def run_case(ex: Any, case: Case, args: argparse.Namespace, worker: ContextCiteWorker | None,
             index: int) -> dict[str, Any]:
    prompt_ids = prompt_for(ex, case, range(len(case.documents)))
    answer_ids = generate_answer(ex, prompt_ids, args.max_new_tokens)
    answer = ex.tokenizer.decode(answer_ids)
    source = answer_source(answer, case.names)
    record: dict[str, Any] = {
        "case": case.case_id, "names": case.names, "gold": case.gold, "question": case.question,
        "answer": answer, "answer_tokens": len(answer_ids), "prompt_tokens": len(prompt_ids),
        "answer_source": source, "correct": source == case.gold, "times": {}, "methods": {},
    }
    if not answer_ids:
        record["skipped"] = "empty answer"
        return record
    # interleave: ours first on even cases, ContextCite first on odd ones
    reply = None
    steps = ["ours", "contextcite"] if index % 2 == 0 else ["contextcite", "ours"]
    for step in steps:
        if step == "ours":
            our_scores, seconds, extra = ours(ex, case, answer_ids)
            record["ours_scores"] = our_scores
            record["ours_extra"] = extra
            record["times"]["ours"] = seconds
            if worker is not None:  # test split: also time the default call (with sentence rows)
                with_sentences, seconds, extra = ours(ex, case, answer_ids, sentences=True)
                record["times"]["ours, with sentence rows"] = seconds
                record["ours_sentences"] = extra["sentences"]
                record["ours_same_sources"] = bool(np.allclose(
                    with_sentences["share"], our_scores["share"], rtol=1e-4, atol=1e-6))
        elif worker is not None:
            request = contextcite_request(ex, case, answer_ids, args.num_ablations, args.prefix_ablations)
            reply = worker.call(request)
    logprobs, loo_time = removal_logprobs(ex, case, answer_ids)
    record["logprobs"] = {",".join(map(str, k)): v for k, v in logprobs.items()}
    n = len(case.documents)
    methods: dict[str, dict] = {}
    for name in SCORES:
        methods[f"ours[{name}]"] = case_metrics(our_scores[name], logprobs, record)
        record["times"][f"ours[{name}]"] = record["times"]["ours"]
    loo_scores = [logprobs[()] - logprobs[(i,)] for i in range(n)]
    methods[LOO] = case_metrics(loo_scores, logprobs, record)
    record["times"][LOO] = loo_time
    methods[RANDOM] = random_metrics(n, logprobs, record)
    if reply is not None:
        methods[contextcite_name(args.num_ablations)] = case_metrics(reply["scores"], logprobs, record)
        record["times"][contextcite_name(args.num_ablations)] = reply["time_s"]
        record["contextcite"] = {k: reply[k] for k in ("scores", "forwards", "prompt_ids_match",
                                                       "response_ids_match", "answer_logprob")}
        record["contextcite"]["answer_logprob_diff"] = reply["answer_logprob"] - logprobs[()]
        for count, part in reply["prefix"].items():
            methods[contextcite_name(int(count))] = case_metrics(part["scores"], logprobs, record)
            record["times"][contextcite_name(int(count))] = part["time_s"]
            record["contextcite"][f"scores_{count}"] = part["scores"]
    record["methods"] = methods
    return record


def run_split(ex: Any, cases: list[Case], args: argparse.Namespace,
              worker: ContextCiteWorker | None, label: str) -> list[dict]:
    records = []
    start = time.perf_counter()
    for index, case in enumerate(cases):
        record = run_case(ex, case, args, worker, index)
        records.append(record)
        t = record["times"]
        cc = t.get(contextcite_name(args.num_ablations))
        print(f"  {label} {index + 1}/{len(cases)} {case.case_id}: answer {record['answer']!r} "
              f"(source {record['answer_source']}, gold {case.gold}); ours {t.get('ours', 0):.2f}s"
              + (f", ContextCite {cc:.2f}s" if cc is not None else "")
              + f"  [{time.perf_counter() - start:.0f}s]", flush=True)
    return [r for r in records if "skipped" not in r]


def warm_up(ex: Any, case: Case, args: argparse.Namespace, worker: ContextCiteWorker | None) -> None:
    """One untimed explanation by each method (first-call costs: allocations, lazy imports)."""
    prompt_ids = prompt_for(ex, case, range(len(case.documents)))
    answer_ids = generate_answer(ex, prompt_ids, args.max_new_tokens) or prompt_ids[-1:]
    ours(ex, case, answer_ids)
    if worker is not None:
        worker.call(contextcite_request(ex, case, answer_ids, min(args.num_ablations, 8), []))


def choose_score(records: list[dict]) -> tuple[str, dict]:
    table = {}
    for name in SCORES:
        s = summarise(records, f"ours[{name}]")
        table[name] = s
    best = max(SCORES, key=lambda n: (table[n]["top1_answer_source"][0], table[n]["drop1"][0]))
    return best, table
