"""The README's main job: ask the running `pelrp serve` for an explained chat completion with the
OpenAI SDK, and show the explanation in the terminal (and as HTML)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from openai import OpenAI

from vllm_pelrp import Explanation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"),
                        help="the key the server was started with (--api-key), if any "
                             "(default: $OPENAI_API_KEY)")
    parser.add_argument("--prompt", default="Why is the sky blue? Answer in one sentence.")
    parser.add_argument("--html", default="out/explanation.html")
    parser.add_argument("--wait", type=float, default=900, help="seconds to wait for the server")
    args = parser.parse_args()
    client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key=args.api_key)
    deadline = time.time() + args.wait
    while True:
        try:
            model = client.models.list().data[0].id
            break
        except Exception:
            if time.time() > deadline:
                print("the server did not come up", file=sys.stderr)
                return 1
            time.sleep(3)
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=24, temperature=0,
        extra_body={"explain": {"mode": "pa-lrp", "target": "completion", "per_layer": True}},
    )
    explanation = Explanation.model_validate(response.choices[0].model_extra["explanation"])
    print(response.choices[0].message.content)
    explanation.print()
    from pathlib import Path

    Path(args.html).parent.mkdir(parents=True, exist_ok=True)
    Path(args.html).write_text(explanation.to_html())
    print(f"wrote {args.html}; the server keeps running on port {args.port} (Ctrl-C stops it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
