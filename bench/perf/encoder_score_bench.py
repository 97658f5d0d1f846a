"""Speed of an explained ``/score`` on an encoder, as a ratio to the same request unexplained.

One query against 8 documents (real text: the first dev pairs of the retrieval faithfulness data,
``references/faithfulness/data/retrieval.jsonl``), all-MiniLM-L6-v2 served by ``pelrp serve`` (vLLM's
pooling runner, float32, torch.compile as deployed by default; ``--eager``: eager). The two
requests alternate, ``--rounds`` times each after a warm-up, and the median wall times give the
ratio, so load from other processes affects both alike. Explained: each of the 8 scores carries
its explanation (query side, document side in ``other``), computed on the worker.

    .venv/bin/python bench/perf/encoder_score_bench.py [--rounds 7] [--mode pa-lrp] [--json out.json]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--mode", default="pa-lrp")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--json", type=Path,
                        default=ROOT / "bench" / "perf" / "results" / "encoder_score_bench.json")
    args = parser.parse_args()
    query, documents = cases(args.documents)
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
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        if not isinstance(value, list):
            print(f"{key:32s} {value}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
