"""Backward scheduling fairness: a short explanation submitted while a long one runs.

Target: a ~3 s explanation (SHORT) submitted while a ~70 s one (LONG) runs finishes in <= 2x
its time alone. With the backward passes run strictly one at a time (FIFO), SHORT waits for
the rest of LONG instead.

One ``pelrp serve`` (default model, float32, ``--eager``, loopback, a free port) or
``--server URL``; both requests go to ``POST /v1/explain`` (prompt + completion given as token
ids cut from fixed English text, so the sizes are exact and nothing is generated):

- SHORT: ``--short-tokens`` prompt tokens + ``--short-completion`` completion tokens, target
  ``completion`` (one target row);
- LONG: ``--long-tokens`` prompt tokens + ``--long-completion`` completion tokens, target
  ``per_token`` (one target row per completion token).

Measured: SHORT alone (median of ``--alone-repeats``), LONG alone (once), then ``--rounds``
rounds of: LONG submitted, ``--delay`` seconds later SHORT submitted; SHORT's latency and
LONG's total. Reported: SHORT-during-LONG / SHORT-alone (median and max over the rounds) and
LONG's slowdown (median during / alone). Results (all raw numbers) to ``--json``.

    .venv/bin/python -m bench.perf.fairness                # full size, ~7 min on 2 cores
    .venv/bin/python -m bench.perf.fairness --quick        # smaller sizes, a smoke run (~2 min)
    .venv/bin/python -m bench.perf.fairness --server http://127.0.0.1:8000 --rounds 5
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench.common.servers import MODEL, start, stop

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_JSON = ROOT / "bench" / "perf" / "results" / "fairness.json"
LOG = "/tmp/pelrp_bench_fairness.log"
# the work cap (GFLOP) must let LONG through; the recording cap must hold both
# requests' forward reservations at once (2 x ~80 MB at full size: the 2048 MiB default does)
SERVER_ENV = {"VLLM_PELRP_MAX_EXPLAIN_GFLOP": "1000000"}

# fixed text the prompts and completions are cut from (repeated as often as needed)
PARAGRAPH = (
    "The old lighthouse stood at the end of a narrow spit of rock, and for more than a century "
    "its keepers had written down the weather twice a day: the direction of the wind, the "
    "height of the swell, the colour of the sky at dawn and at dusk. When the light was "
    "automated the books were carried to the town library, where a retired schoolteacher began "
    "to copy them into a spreadsheet, one line for every entry, and found that the winters had "
    "grown shorter, the storms fewer but stronger, and the fog that once closed the harbour for "
    "weeks now came only for days. "
)
COMPLETION = (
    " The records show a slow change in the weather of the coast, year after year, that "
    "nobody alive had noticed."
)
# (prompt tokens, completion tokens) of SHORT and LONG, calibrated alone on the 2-core CPU
# machine with the FIFO worker (7224d69): full 2.8 s and 76 s, quick 1.0 s and 15-18 s
SIZES = {"full": {"short": (360, 8), "long": (1100, 12)},
         "quick": {"short": (128, 4), "long": (480, 6)}}


def tokenize(base: str, text: str) -> list[int]:
    """Token ids of ``text`` from the server's own tokenizer (vLLM's ``POST /tokenize``), no
    special tokens."""
    reply = httpx.post(base + "/tokenize", json={"model": MODEL, "prompt": text,
                                                 "add_special_tokens": False}, timeout=60)
    reply.raise_for_status()
    return reply.json()["tokens"]


def cut(ids: list[int], count: int) -> list[int]:
    """The first ``count`` ids of ``ids`` repeated."""
    return [ids[i % len(ids)] for i in range(count)]


def explain(base: str, body: dict) -> tuple[float, dict]:
    """One ``POST /v1/explain``: (seconds, the explanation); raises on an error."""
    started = time.perf_counter()
    reply = httpx.post(base + "/v1/explain", json=body, timeout=3600)
    seconds = time.perf_counter() - started
    if reply.status_code != 200:
        raise RuntimeError(f"/v1/explain answered {reply.status_code}: {reply.text[:2000]}")
    return seconds, reply.json()


def describe(explanation: dict) -> dict:
    """Sizes of an explanation as the server saw them."""
    tokens = len(explanation["tokens"])
    return {"prompt_tokens": explanation["prompt_length"],
            "completion_tokens": tokens - explanation["prompt_length"],
            "target_rows": len(explanation.get("rows") or []) or 1}


def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@contextlib.contextmanager
def server(url: str | None):
    """``url`` as is, or a ``pelrp serve --eager`` started for the run (serving_bench's
    ``start``/``stop``) with ``SERVER_ENV`` added, stopped at the end."""
    if url is not None:
        yield url.rstrip("/")
        return
    saved = {name: os.environ.get(name) for name in SERVER_ENV}
    os.environ.update(SERVER_ENV)
    try:
        # cwd outside the checkout: `python -m` puts the cwd on sys.path, and the top-level
        # kernels/ folder must not be importable as `kernels` (tests/_live_server.py); with a
        # cwd elsewhere, PYTHONPATH also decides which vllm_pelrp the server runs
        with tempfile.TemporaryDirectory(prefix="pelrp_fairness_") as cwd, contextlib.chdir(cwd):
            process, base = start(True, LOG, compiled=False)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        yield base
    finally:
        stop(process)
        with contextlib.suppress(ProcessLookupError):  # engine core / workers left behind
            os.killpg(process.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of LONG + SHORT submitted during it (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes (%s), a smoke run of a few minutes" % (SIZES["quick"],))
    parser.add_argument("--server", metavar="URL", default=None,
                        help="use this running pelrp server (started with "
                             "VLLM_PELRP_MAX_EXPLAIN_GFLOP large enough for LONG) instead of "
                             "starting one")
    parser.add_argument("--short-tokens", type=int, default=None, help="SHORT's prompt tokens")
    parser.add_argument("--short-completion", type=int, default=None,
                        help="SHORT's completion tokens (target 'completion')")
    parser.add_argument("--long-tokens", type=int, default=None, help="LONG's prompt tokens")
    parser.add_argument("--long-completion", type=int, default=None,
                        help="LONG's completion tokens (target 'per_token': one row each)")
    parser.add_argument("--delay", type=float, default=None,
                        help="seconds between submitting LONG and SHORT (default 5; quick 2)")
    parser.add_argument("--alone-repeats", type=int, default=3,
                        help="SHORT alone: the median of this many (default 3)")
    parser.add_argument("--mode", default="pa-lrp")
    parser.add_argument("--note", default=None,
                        help="free text kept in the JSON (e.g. which code the server ran)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help=f"write the results here (default {DEFAULT_JSON.relative_to(ROOT)})")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    size = SIZES["quick" if args.quick else "full"]
    short_tokens = args.short_tokens or size["short"][0]
    short_completion = args.short_completion or size["short"][1]
    long_tokens = args.long_tokens or size["long"][0]
    long_completion = args.long_completion or size["long"][1]
    delay = args.delay if args.delay is not None else (2.0 if args.quick else 5.0)
    results: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
        "server": args.server or "started (pelrp serve --eager, float32)",
        "server_pythonpath": os.environ.get("PYTHONPATH") if args.server is None else None,
        "server_env": SERVER_ENV if args.server is None else None,
        "machine": {"cpu_count": os.cpu_count(),
                    "sched_affinity": len(os.sched_getaffinity(0)),
                    "platform": platform.platform(), "load_average_start": os.getloadavg()},
        "note": args.note, "quick": args.quick, "mode": args.mode, "delay_s": delay,
        "rounds": args.rounds}

    with server(args.server) as base:
        console.log(f"server {base}")
        prompt_ids = tokenize(base, PARAGRAPH)
        completion_ids = tokenize(base, COMPLETION)

        def body(tokens: int, completion: int, target: str) -> dict:
            return {"model": MODEL, "prompt": cut(prompt_ids, tokens),
                    "completion": cut(completion_ids, completion), "target": target,
                    "mode": args.mode}

        short = body(short_tokens, short_completion, "completion")
        long = body(long_tokens, long_completion, "per_token")
        for target in ("completion", "per_token"):  # warm-up: the first backward builds things
            explain(base, body(16, 2, target))

        short_alone = []
        for index in range(args.alone_repeats):
            seconds, out = explain(base, short)
            short_alone.append(seconds)
            console.log(f"SHORT alone {index}: {seconds:.2f} s")
        results["short"] = dict(describe(out), target="completion")
        long_alone, out = explain(base, long)
        results["long"] = dict(describe(out), target="per_token")
        console.log(f"LONG alone: {long_alone:.2f} s")
        console.log(f"SHORT {results['short']['prompt_tokens']} + "
                    f"{results['short']['completion_tokens']} tokens, 1 row; LONG "
                    f"{results['long']['prompt_tokens']} + {results['long']['completion_tokens']}"
                    f" tokens, {results['long']['target_rows']} rows")

        rounds = []
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            for index in range(args.rounds):
                started = time.perf_counter()
                pending = pool.submit(explain, base, long)
                time.sleep(delay)
                if pending.done():  # LONG must still be running when SHORT arrives
                    pending.result()
                    raise RuntimeError(f"LONG finished within --delay {delay} s; make it longer")
                submitted = time.perf_counter() - started
                short_seconds, out = explain(base, short)
                short_done = time.perf_counter() - started
                long_seconds, _ = pending.result()
                rounds.append({"short_s": short_seconds, "long_s": long_seconds,
                               "short_submitted_at_s": submitted, "short_done_at_s": short_done,
                               "short_before_long": short_done < long_seconds})
                console.log(f"round {index}: SHORT {short_seconds:.2f} s "
                            f"({short_seconds / statistics.median(short_alone):.1f}x alone, "
                            f"{'before' if short_done < long_seconds else 'after'} LONG), "
                            f"LONG {long_seconds:.2f} s")
        results["stats"] = httpx.get(base + "/v1/explain/stats", timeout=60).json()
        # the plugin's Prometheus series (pelrp_*: e.g. the backward queue-wait histogram)
        with contextlib.suppress(httpx.HTTPError):
            results["metrics"] = [line for line in httpx.get(base + "/metrics", timeout=60)
                                  .text.splitlines() if line.startswith("pelrp_")]

    alone = statistics.median(short_alone)
    ratios = [r["short_s"] / alone for r in rounds]
    results.update({
        "short_alone_s": short_alone, "short_alone_median_s": alone, "long_alone_s": long_alone,
        "rounds_raw": rounds, "short_ratio_per_round": ratios,
        "short_ratio_median": statistics.median(ratios), "short_ratio_max": max(ratios),
        "long_slowdown_median": statistics.median(r["long_s"] for r in rounds) / long_alone,
        "target_short_ratio_max": 2.0,
        "target_met": max(ratios) <= 2.0})
    results["machine"]["load_average_end"] = os.getloadavg()

    table = Table(title="SHORT submitted while LONG runs (POST /v1/explain)")
    for column in ("", "tokens", "rows", "alone s", "during other s", "ratio"):
        table.add_column(column, justify="right" if column else "left")
    s, g = results["short"], results["long"]
    table.add_row("SHORT", f"{s['prompt_tokens']} + {s['completion_tokens']}", "1",
                  f"{alone:.2f}", f"{statistics.median(r['short_s'] for r in rounds):.2f}",
                  f"{results['short_ratio_median']:.2f}x (max {results['short_ratio_max']:.2f}x)")
    table.add_row("LONG", f"{g['prompt_tokens']} + {g['completion_tokens']}",
                  str(g["target_rows"]), f"{long_alone:.2f}",
                  f"{statistics.median(r['long_s'] for r in rounds):.2f}",
                  f"{results['long_slowdown_median']:.2f}x")
    console.print(table)
    verdict = "[green]met[/green]" if results["target_met"] else "[red]missed[/red]"
    console.print(f"target SHORT during LONG <= 2x alone (every round): {verdict}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
