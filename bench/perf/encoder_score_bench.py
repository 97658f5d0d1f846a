"""Speed of an explained ``/score`` on an encoder, as a ratio to the same request unexplained.

One query against 8 documents (real text: the first dev pairs of the retrieval faithfulness data,
``references/faithfulness/data/retrieval.jsonl``), all-MiniLM-L6-v2 served by ``pelrp serve`` (vLLM's
pooling runner, float32, torch.compile as deployed by default; ``--eager``: eager). The two
requests alternate, ``--rounds`` times each after a warm-up, and the median wall times give the
ratio, so load from other processes affects both alike. Explained: each of the 8 scores carries
its explanation (query side, document side in ``other``), computed on the worker, where the
documents of one query share its forward and backward (``pipeline.compute_similarities``).

``--offline``: no server, before and after in one run: the same texts and weights in-process,
rounds alternating three requests' work. Plain: tokenize, then HF ``BertModel``'s forward of the
query and the documents as one padded batch, mean-pooled and normalised (what vLLM's pooling
runner computes; torch eager, not vLLM's compiled forward). Explained: plain, then the API's plans,
the worker's compute and the API's assembly to wire dicts, with the worker's compute either
``before``: each pair alone (``pipeline.compute_encoder`` per job: the query's forward and
backward once per document, as until issue 23) or ``after``: the worker's grouping
(``pipeline.shared_query_groups``, ``compute_similarities``: the query's once, a row per document).
``documents_only``: each document's forward and one-row backward, what sharing the query leaves
(``ratio_floor_vs_plain``: plain plus that, the least an explained request costs this way).

    .venv/bin/python bench/perf/encoder_score_bench.py [--rounds 7] [--mode pa-lrp] [--json out.json]
    .venv/bin/python bench/perf/encoder_score_bench.py --offline [--threads 1] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common.servers import free_port, launch, stop  # noqa: E402

MODEL = "all-MiniLM-L6-v2"
DATA = ROOT / "references" / "faithfulness" / "data" / "retrieval.jsonl"
RESULTS = ROOT / "bench" / "perf" / "results"


def start(compiled: bool, log: Path):
    import os

    port = free_port()
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    command = [sys.executable, "-m", "vllm_pelrp.cli", "serve", "--model", MODEL, "--port",
               str(port), "--dtype", "float32", "--kv-cache-memory-bytes", str(256 << 20),
               "--seed", "0", *([] if compiled else ["--eager"])]
    return launch(command, env, port, log, timeout=900)


def cases(documents: int) -> tuple[str, list[str]]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == "dev"][:documents]
    return rows[0]["query"], [r["document"] for r in rows]


def score(base: str, query: str, documents: list[str], explain: dict | None) -> float:
    body = {"model": MODEL, "queries": query, "documents": documents}
    if explain is not None:
        body["explain"] = explain
    started = time.perf_counter()
    reply = httpx.post(base + "/score", json=body, timeout=3600)
    elapsed = time.perf_counter() - started
    reply.raise_for_status()
    data = reply.json()["data"]
    assert len(data) == len(documents)
    if explain is not None:
        assert all(item.get("explanation") for item in data), "an explanation is missing"
    return elapsed


def offline(query: str, documents: list[str], mode: str, rounds: int) -> dict:
    """Plain, explained before and explained after, alternating (see the module docstring)."""
    import torch

    from vllm_pelrp import load_explainer, pipeline
    from vllm_pelrp.engine.additive import relevance_from_forward, run_forward
    from vllm_pelrp.engine.heads import normalized, similarity_seeds

    explainer = load_explainer(MODEL)
    tokenizer, weights, pooling = explainer.tokenizer, explainer.weights, explainer.pooling

    @torch.no_grad()
    def plain() -> torch.Tensor:
        batch = tokenizer([query, *documents], padding=True, return_tensors="pt")
        hidden = explainer.hf_model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        embeddings = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as sentence-transformers
        return normalized(embeddings, pooling)[0] @ normalized(embeddings, pooling)[1:].T

    def explained(shared: bool) -> list[dict]:
        scores = plain()
        plans = [explainer._plan(query, {"similarity": d}, mode, None) for d in documents]
        jobs = [pipeline.encoder_job(plan) for plan in plans]
        if shared:
            results = [None] * len(jobs)
            for group in pipeline.shared_query_groups(jobs):
                grouped = pipeline.compute_similarities(weights, [jobs[i] for i in group],
                                                        pooling=pooling)
                for i, result in zip(group, grouped):
                    results[i] = result
        else:
            results = [pipeline.compute_encoder(weights, job, pooling=pooling) for job in jobs]
        wire = [pipeline.assemble_encoder(plan, result, model=MODEL).model_dump(mode="json")
                for plan, result in zip(plans, results)]
        for item, score in zip(wire, scores.tolist()):
            assert abs(item["target"]["value"] - score) < 1e-4, "the explanation is off its score"
        return wire

    query_forward = run_forward(weights, torch.tensor(explainer._plan(
        query, {"dimension": 0}, mode, None).texts[0]))

    @torch.no_grad()
    def documents_only() -> None:
        """What sharing the query leaves: each document's forward and one-row backward."""
        for document in documents:
            ids = explainer._plan(document, {"dimension": 0}, mode, None).texts[0]
            forward = run_forward(weights, torch.tensor(ids))
            seeds = similarity_seeds(query_forward.final_hidden, forward.final_hidden, pooling)
            relevance_from_forward(weights, forward, seeds.second, mode)

    def timed(work) -> float:
        started = time.perf_counter()
        work()
        return time.perf_counter() - started

    first, second = explained(False), explained(True)  # warm-up; and both paths agree:
    for a, b in zip(first, second):
        for side_a, side_b in ((a, b), (a["other"], b["other"])):
            for name in ("token_relevance", "positional_relevance", "token_type_relevance"):
                gap = max((abs(x - y) for x, y in zip(side_a[name], side_b[name])), default=0.0)
                assert gap < 1e-5, f"{name} differs by {gap} between before and after"
    times: dict[str, list[float]] = {"plain_s": [], "before_s": [], "after_s": [],
                                     "documents_only_s": []}
    for _ in range(rounds):
        times["plain_s"].append(timed(plain))
        times["before_s"].append(timed(lambda: explained(False)))
        times["after_s"].append(timed(lambda: explained(True)))
        times["documents_only_s"].append(timed(documents_only))
    medians = {key.replace("_s", "_median_s"): statistics.median(v) for key, v in times.items()}
    return {
        "model": MODEL, "documents": len(documents), "mode": mode, "offline": True,
        "torch_threads": torch.get_num_threads(), "rounds": rounds, **times, **medians,
        "ratio_before_vs_plain": medians["before_median_s"] / medians["plain_median_s"],
        "ratio_after_vs_plain": medians["after_median_s"] / medians["plain_median_s"],
        "ratio_after_vs_before": medians["after_median_s"] / medians["before_median_s"],
        # plain plus each document's own forward and backward: what sharing the query can reach
        "ratio_floor_vs_plain": 1 + medians["documents_only_median_s"] / medians["plain_median_s"],
        "ratio_before_median_of_rounds": statistics.median(
            b / p for b, p in zip(times["before_s"], times["plain_s"])),
        "ratio_after_median_of_rounds": statistics.median(
            a / p for a, p in zip(times["after_s"], times["plain_s"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--mode", default="pa-lrp")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--offline", action="store_true",
                        help="no server: before and after in-process, in one run")
    parser.add_argument("--threads", type=int, help="--offline: torch threads (default: torch's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    query, documents = cases(args.documents)
    if args.offline:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        report(offline(query, documents, args.mode, args.rounds),
               args.json or RESULTS / "encoder_score_bench_offline.json")
        return
    log = Path("/tmp") / f"encoder_score_bench_{int(time.time())}.log"
    process, base = start(not args.eager, log)
    try:
        explain = {"mode": args.mode}
        score(base, query, documents, None)  # warm-up: compile, first explanation
        score(base, query, documents, explain)
        plain, explained = [], []
        for _ in range(args.rounds):
            plain.append(score(base, query, documents, None))
            explained.append(score(base, query, documents, explain))
    finally:
        stop(process)
    result = {
        "model": MODEL, "documents": len(documents), "mode": args.mode,
        "compiled": not args.eager, "rounds": args.rounds,
        "plain_s": plain, "explained_s": explained,
        "plain_median_s": statistics.median(plain),
        "explained_median_s": statistics.median(explained),
        "ratio_explained_vs_plain": statistics.median(explained) / statistics.median(plain),
        "ratio_median_of_rounds": statistics.median(e / p for e, p in zip(explained, plain)),
    }
    report(result, args.json or RESULTS / "encoder_score_bench.json")


def report(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        if not isinstance(value, list):
            print(f"{key:32s} {value}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
